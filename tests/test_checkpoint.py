"""Checkpoint layouts (single, sharded, .bin, converted, hub cache), dtypes, and every bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import komt
from komt.errors import CheckpointError, ConfigError
from komt.model.convert import convert_to_safetensors
from komt.model.hub import cached_snapshot, resolve_model_path
from komt.model.safetensors_file import SafetensorsFile, write_safetensors


@pytest.fixture
def mistral(fixtures, tmp_path) -> Path:
    """A writable copy of tiny-mistral."""
    folder = tmp_path / "tiny-mistral"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(fixtures / "tiny-mistral" / name, folder / name)
    return folder


@pytest.fixture
def expected(fixtures):
    return load_file(fixtures / "tiny-mistral" / "expected.safetensors")


def logits_of(model, expected) -> torch.Tensor:
    with torch.no_grad():
        return model(expected["input_ids"])


def state_of(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def shard_state(state: dict, n: int) -> list[dict]:
    names = sorted(state)
    return [{k: state[k] for k in names[i::n]} for i in range(n)]


def write_sharded_safetensors(folder: Path, state: dict, n: int = 3) -> None:
    (folder / "model.safetensors").unlink()
    weight_map = {}
    for k, part in enumerate(shard_state(state, n), start=1):
        filename = f"model-{k:05d}-of-{n:05d}.safetensors"
        save_file(part, folder / filename)
        weight_map.update({name: filename for name in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def write_bin_shards(folder: Path, state: dict, n: int = 2) -> None:
    (folder / "model.safetensors").unlink()
    weight_map = {}
    for k, part in enumerate(shard_state(state, n), start=1):
        filename = f"pytorch_model-{k:05d}-of-{n:05d}.bin"
        torch.save(part, folder / filename)
        weight_map.update({name: filename for name in part})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


# --- layouts -------------------------------------------------------------------------------------------

def test_sharded_safetensors_load_identically(mistral, expected):
    write_sharded_safetensors(mistral, state_of(mistral))
    torch.testing.assert_close(logits_of(komt.load_model(mistral), expected), expected["logits"], atol=1e-4, rtol=0)


def test_bin_shards_load_directly_and_convert(mistral, expected):
    write_bin_shards(mistral, state_of(mistral))
    direct = logits_of(komt.load_model(mistral), expected)
    torch.testing.assert_close(direct, expected["logits"], atol=1e-4, rtol=0)
    bins_before = {p.name: p.read_bytes() for p in mistral.glob("*.bin")}

    written = convert_to_safetensors(mistral, log=lambda _: None)
    assert [p.name for p in written] == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    assert {p.name: p.read_bytes() for p in mistral.glob("*.bin")} == bins_before  # untouched
    assert not list(mistral.glob(".*tmp"))  # no temp files left
    converted = logits_of(komt.load_model(mistral), expected)  # safetensors now preferred
    torch.testing.assert_close(converted, direct, atol=0, rtol=0)


def test_single_bin_file_loads(mistral, expected):
    state = state_of(mistral)
    (mistral / "model.safetensors").unlink()
    torch.save(state, mistral / "pytorch_model.bin")
    torch.testing.assert_close(logits_of(komt.load_model(mistral), expected), expected["logits"], atol=1e-4, rtol=0)


def test_convert_cli(mistral):
    write_bin_shards(mistral, state_of(mistral))
    run = subprocess.run([sys.executable, "-m", "komt.convert", str(mistral)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert (mistral / "model.safetensors.index.json").exists()
    again = subprocess.run([sys.executable, "-m", "komt.convert", str(mistral)], capture_output=True, text=True)
    assert again.returncode != 0 and again.stderr.startswith("error:") and "Traceback" not in again.stderr


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoint_keeps_its_dtype(mistral, expected, dtype):
    state = {k: v.to(dtype) for k, v in state_of(mistral).items()}
    save_file(state, mistral / "model.safetensors")
    raw = json.loads((mistral / "config.json").read_text())
    raw["torch_dtype"] = str(dtype).replace("torch.", "")
    (mistral / "config.json").write_text(json.dumps(raw))
    model = komt.load_model(mistral)
    assert model.lm_head.weight.dtype == dtype
    logits = logits_of(model, expected)
    assert logits.dtype == torch.float32
    # Half-precision weights and activations: close to the fp32 reference, not equal.
    assert (logits - expected["logits"]).abs().max() < 0.1
    as_fp32 = komt.load_model(mistral, dtype="fp32")
    assert as_fp32.lm_head.weight.dtype == torch.float32


def test_dtype_argument_converts(fixtures, expected):
    model = komt.load_model(fixtures / "tiny-mistral", dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_same_dtype_cpu_load_is_zero_copy(fixtures):
    """Weights already in the target dtype are used in place from the memory map (no second copy).

    (layout="plain": the CPU layouts re-lay some fp32 weights out for decoding, after loading.)"""
    model = komt.load_model(fixtures / "tiny-mistral", layout="plain")
    mapped = SafetensorsFile(fixtures / "tiny-mistral" / "model.safetensors")
    assert not model.lm_head.weight.untyped_storage().resizable()  # a frombuffer view, not an allocated copy
    torch.testing.assert_close(model.lm_head.weight, mapped.tensor("lm_head.weight"))


def test_our_writer_is_read_by_the_reference_reader(tmp_path):
    tensors = [("a", torch.randn(3, 5)), ("b", torch.arange(7, dtype=torch.int64)),
               ("c", torch.randn(2, 2).to(torch.bfloat16)), ("empty", torch.zeros(0, 4))]
    write_safetensors(tmp_path / "x.safetensors", tensors)
    loaded = load_file(tmp_path / "x.safetensors")
    for name, t in tensors:
        assert torch.equal(loaded[name], t)


# --- hub ids -------------------------------------------------------------------------------------------

def make_fake_hub_cache(root: Path, repo_id: str, source: Path, revision: str = "abc123") -> Path:
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for f in source.iterdir():
        shutil.copy(f, snapshot / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def test_hub_id_resolves_from_local_cache_without_network(fixtures, tmp_path, monkeypatch, expected):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = make_fake_hub_cache(tmp_path / "hub", "davidkim205/komt-mistral-7b-v1", fixtures / "tiny-mistral")
    assert resolve_model_path("davidkim205/komt-mistral-7b-v1") == snapshot
    model = komt.load_model("davidkim205/komt-mistral-7b-v1")
    torch.testing.assert_close(logits_of(model, expected), expected["logits"], atol=1e-4, rtol=0)


def test_hf_home_layout_and_newest_snapshot_without_ref(fixtures, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    snapshot = make_fake_hub_cache(tmp_path / "hf" / "hub", "org/model", fixtures / "tiny-llama")
    (snapshot.parent.parent / "refs" / "main").unlink()
    assert cached_snapshot("org/model") == snapshot


def test_uncached_hub_id_offline_says_how_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="huggingface-cli download org/absent"):
        komt.load_model("org/absent")


# --- bad input -----------------------------------------------------------------------------------------

def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such folder"):
        komt.load_model(tmp_path / "nope")


def test_no_config(mistral):
    (mistral / "config.json").unlink()
    with pytest.raises(ConfigError, match="no config.json"):
        komt.load_model(mistral)


def test_no_weights(mistral):
    (mistral / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        komt.load_model(mistral)


def test_truncated_safetensors(mistral):
    data = (mistral / "model.safetensors").read_bytes()
    (mistral / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        komt.load_model(mistral)


def test_corrupt_safetensors_header(mistral):
    data = bytearray((mistral / "model.safetensors").read_bytes())
    data[8:20] = b"garbage!!!!!"
    (mistral / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        komt.load_model(mistral)


def test_missing_tensor_is_named(mistral):
    state = state_of(mistral)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, mistral / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        komt.load_model(mistral)


def test_unexpected_tensor_is_named(mistral):
    state = state_of(mistral) | {"model.layers.9.extra.weight": torch.zeros(2)}
    save_file(state, mistral / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.9\.extra\.weight'"):
        komt.load_model(mistral)


def test_shape_mismatch_names_tensor_expected_and_got(mistral):
    state = state_of(mistral)
    state["model.norm.weight"] = torch.ones(63)
    save_file(state, mistral / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight.*\(63,\), expected \(64,\)"):
        komt.load_model(mistral)


def test_unsupported_model_type(mistral):
    raw = json.loads((mistral / "config.json").read_text()) | {"model_type": "falcon"}
    (mistral / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="falcon"):
        komt.load_model(mistral)


def test_missing_shard_named_in_index(mistral):
    write_sharded_safetensors(mistral, state_of(mistral))
    (mistral / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors is missing"):
        komt.load_model(mistral)


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_with_code_is_refused(mistral):
    (mistral / "model.safetensors").unlink()
    torch.save({"x": Evil()}, mistral / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refused"):
        komt.load_model(mistral)


def test_corrupt_bin(mistral):
    (mistral / "model.safetensors").unlink()
    (mistral / "pytorch_model.bin").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        komt.load_model(mistral)
