"""`python -m komt.train merge`: the merged checkpoint gives the logits of base + adapter, whole or sharded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import komt
from komt.errors import CheckpointError
from komt.model.safetensors_file import SafetensorsFile
from komt.train.cli import main
from komt.train.merge import merge_adapter

FIXTURES = Path(__file__).parent / "fixtures"
BASE, ADAPTER = FIXTURES / "tiny-mistral", FIXTURES / "tiny-mistral-lora"


@pytest.fixture(scope="module")
def expected():
    f = SafetensorsFile(ADAPTER / "expected.safetensors")
    return f.tensor("input_ids"), f.tensor("logits")


@pytest.fixture
def base_with_tokenizer(tmp_path) -> Path:
    folder = tmp_path / "base"
    shutil.copytree(BASE, folder)
    shutil.copy(FIXTURES / "tokenizer" / "tokenizer.model", folder / "tokenizer.model")
    return folder


def logits(folder: Path, input_ids: torch.Tensor, adapter: Path | None = None) -> torch.Tensor:
    with torch.no_grad():
        return komt.load_model(folder, adapter=adapter)(input_ids)


def test_merged_checkpoint_equals_base_plus_adapter(base_with_tokenizer, tmp_path, expected):
    input_ids, want = expected
    out = merge_adapter(base_with_tokenizer, ADAPTER, tmp_path / "merged", log=None)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "tokenizer.model"]
    assert (out / "tokenizer.model").read_bytes() == (base_with_tokenizer / "tokenizer.model").read_bytes()
    merged = logits(out, input_ids)
    assert torch.allclose(merged, want, atol=1e-4, rtol=0)
    assert torch.allclose(merged, logits(BASE, input_ids, adapter=ADAPTER), atol=1e-4, rtol=0)
    assert not any(".lora_" in k for k in SafetensorsFile(out / "model.safetensors").keys())
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"


def test_large_merges_are_sharded_with_an_index(tmp_path, expected):
    input_ids, want = expected
    out = merge_adapter(BASE, ADAPTER, tmp_path / "merged", max_shard_bytes=300_000, log=None)
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(
        SafetensorsFile(out / s).nbytes(k) for s in shards for k in SafetensorsFile(out / s).keys())
    assert not (out / "model.safetensors").exists()
    assert torch.allclose(logits(out, input_ids), want, atol=1e-4, rtol=0)


def test_merge_to_bf16(tmp_path, expected):
    input_ids, want = expected
    out = merge_adapter(BASE, ADAPTER, tmp_path / "merged", dtype="bf16", log=None)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    f = SafetensorsFile(out / "model.safetensors")
    assert {f.dtype(k) for k in f.keys()} == {torch.bfloat16}
    assert (logits(out, input_ids) - want).abs().max() < 0.1  # bf16 rounding only


def test_merge_refuses_a_non_empty_output_and_leaves_it_alone(tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not an empty folder"):
        merge_adapter(BASE, ADAPTER, out, log=None)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_merge_cli(tmp_path, capsys, expected):
    input_ids, want = expected
    assert main(["merge", "--model", str(BASE), "--adapter", str(ADAPTER), "--output", str(tmp_path / "m")]) == 0
    assert torch.allclose(logits(tmp_path / "m", input_ids), want, atol=1e-4, rtol=0)
    assert main(["merge", "--model", str(BASE), "--adapter", str(tmp_path / "nope"), "--output",
                 str(tmp_path / "m2")]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"error: {tmp_path / 'nope'}: adapter is not a folder"
    assert not (tmp_path / "m2").exists() and not list(tmp_path.glob(".m2.*"))
