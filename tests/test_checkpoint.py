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
from conftest import write_shards
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


# --- layouts -------------------------------------------------------------------------------------------

def test_sharded_safetensors_load_identically(mistral, expected):
    write_shards(mistral, 3)
    torch.testing.assert_close(logits_of(komt.load_model(mistral), expected), expected["logits"], atol=1e-4, rtol=0)


def test_bin_shards_load_directly_and_convert(mistral, expected):
    write_shards(mistral, 2, fmt="bin")
    direct = logits_of(komt.load_model(mistral), expected)
    torch.testing.assert_close(direct, expected["logits"], atol=1e-4, rtol=0)
    bins_before = {p.name: p.read_bytes() for p in mistral.glob("*.bin")}

    written = convert_to_safetensors(mistral, log=lambda _: None)
    assert [p.name for p in written] == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    assert {p.name: p.read_bytes() for p in mistral.glob("*.bin")} == bins_before  # untouched
    assert not list(mistral.glob(".*komt-tmp-*"))  # no temp files left
    converted = logits_of(komt.load_model(mistral), expected)  # safetensors now preferred
    torch.testing.assert_close(converted, direct, atol=0, rtol=0)


def test_single_bin_file_loads(mistral, expected):
    state = state_of(mistral)
    (mistral / "model.safetensors").unlink()
    torch.save(state, mistral / "pytorch_model.bin")
    torch.testing.assert_close(logits_of(komt.load_model(mistral), expected), expected["logits"], atol=1e-4, rtol=0)


def test_convert_cli(mistral):
    write_shards(mistral, 2, fmt="bin")
    run = subprocess.run([sys.executable, "-m", "komt.convert", str(mistral)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert (mistral / "model.safetensors.index.json").exists()
    again = subprocess.run([sys.executable, "-m", "komt.convert", str(mistral)], capture_output=True, text=True)
    assert again.returncode == 2  # like every other entry point
    assert again.stderr == f"error: {mistral}: already has safetensors weights; nothing to convert\n"


def test_convert_killed_mid_write_leaves_a_temp_file_the_next_run_removes(mistral, tmp_path):
    """A real SIGKILL while a shard is being written: the temp file is named for its target and the next
    conversion deletes it (its writer's flock died with it), then converts as if nothing happened."""
    write_shards(mistral, 2, fmt="bin")
    # Slow the writer down so that the kill lands mid-write: each tensor's bytes wait 0.2 s.
    slow = tmp_path / "slow_convert.py"
    slow.write_text(
        "import sys, time\n"
        "import komt.model.safetensors_file as st\n"
        "real = st.atomic_file\n"
        "class Slow:\n"
        "    def __init__(self, f): self.f = f\n"
        "    def write(self, b): time.sleep(0.2); print('wrote', flush=True); return self.f.write(b)\n"
        "    def __getattr__(self, name): return getattr(self.f, name)\n"
        "from contextlib import contextmanager\n"
        "@contextmanager\n"
        "def slow_atomic(path, mode='w'):\n"
        "    with real(path, mode) as f: yield Slow(f)\n"
        "st.atomic_file = slow_atomic\n"
        "from komt.convert import main\n"
        "sys.exit(main([sys.argv[1]]))\n")
    writer = subprocess.Popen([sys.executable, str(slow), str(mistral)], stdout=subprocess.PIPE, text=True)
    for _ in range(6):  # the length, the header, then tensors: past the first 8 KiB buffer, inside shard 1
        assert writer.stdout.readline() == "wrote\n"
    writer.kill()
    writer.wait(timeout=30)
    writer.stdout.close()
    stale = list(mistral.glob(".model-00001-of-00002.safetensors.komt-tmp-*"))
    assert len(stale) == 1 and stale[0].stat().st_size > 0
    assert not (mistral / "model-00001-of-00002.safetensors").exists()

    run = subprocess.run([sys.executable, "-m", "komt.convert", str(mistral)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert f"removed {stale[0].name}, left by an interrupted conversion" in run.stderr
    assert not list(mistral.glob(".*komt-tmp-*"))
    converted = load_file(mistral / "model-00001-of-00002.safetensors")
    assert converted.keys() == torch.load(mistral / "pytorch_model-00001-of-00002.bin").keys()


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


def _rewrite(folder: Path, state: dict, config_changes: dict, drop: tuple[str, ...] = ()) -> None:
    save_file(state, folder / "model.safetensors")
    raw = json.loads((folder / "config.json").read_text())
    for key in drop:
        raw.pop(key, None)
    raw |= config_changes
    (folder / "config.json").write_text(json.dumps(raw))


def test_bf16_file_without_torch_dtype_stays_bf16(mistral):
    """dtype=None keeps the tensors' own dtype; the config's torch_dtype (absent here) does not override it."""
    _rewrite(mistral, {k: v.to(torch.bfloat16) for k, v in state_of(mistral).items()}, {}, drop=("torch_dtype",))
    assert {p.dtype for p in komt.load_model(mistral).parameters()} == {torch.bfloat16}


def test_bf16_file_whose_config_says_float32_stays_bf16(mistral):
    _rewrite(mistral, {k: v.to(torch.bfloat16) for k, v in state_of(mistral).items()}, {"torch_dtype": "float32"})
    assert {p.dtype for p in komt.load_model(mistral).parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("declared, want", [({"torch_dtype": "float16"}, torch.float16),
                                            ({"dtype": "bfloat16"}, torch.bfloat16), ({}, torch.float32)])
def test_a_file_that_mixes_dtypes_takes_the_config_dtype_else_fp32(mistral, expected, declared, want):
    state = state_of(mistral)
    mixed = {k: v.to(torch.bfloat16) if i % 2 else v for i, (k, v) in enumerate(sorted(state.items()))}
    _rewrite(mistral, mixed, declared, drop=("torch_dtype",))
    model = komt.load_model(mistral)
    assert {p.dtype for p in model.parameters()} == {want}
    logits = logits_of(model, expected)
    assert (logits - expected["logits"]).abs().max() < 0.1  # bf16-rounded weights: close, not equal


def test_a_saved_rope_inv_freq_does_not_make_a_file_mixed(mistral):
    """Old Llama exports keep RoPE's inv_freq in fp32 beside fp16 weights; it is skipped, so not counted."""
    state = {k: v.to(torch.float16) for k, v in state_of(mistral).items()}
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    _rewrite(mistral, state, {}, drop=("torch_dtype",))
    assert {p.dtype for p in komt.load_model(mistral).parameters()} == {torch.float16}


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
    with pytest.raises(CheckpointError, match=r"HF_HUB_OFFLINE is set \(unset it to download\); download it "
                                              r"with `hf download org/absent`, or pass a local checkpoint folder"):
        komt.load_model("org/absent")


def test_download_advice_suggests_the_hub_extra_only_when_huggingface_hub_is_missing(monkeypatch):
    """huggingface_hub >= 0.34 installs `hf`, not `huggingface-cli`; the extra is advice only for those without it."""
    import importlib.util

    from komt.model.hub import how_to_download

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "huggingface_hub" else real_find_spec(name, *a))
    assert how_to_download("org/m") == ("install huggingface_hub (pip install 'komt[hub]') and run "
                                        "`hf download org/m`, or pass a local checkpoint folder with --model")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    assert how_to_download("org/m") == "download it with `hf download org/m`, or pass a local checkpoint folder with --model"


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
    write_shards(mistral, 3)
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
