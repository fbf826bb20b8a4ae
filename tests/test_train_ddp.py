"""Data parallel for real: `torchrun --nproc-per-node 2` on the CPU (gloo) trains the adapter that one process
trains with the same global batch, and reports the same losses (train and eval)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_checkpoint
import torch

from komt.model import Transformer, preset
from komt.model.safetensors_file import SafetensorsFile
from komt.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=16)
SETTINGS = dict(max_steps=4, lr=1e-2, warmup_steps=1, lora_dropout=0.0, save_every=2, eval_split=0.2,
                eval_every=2, seed=3)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("ddp")
    base = folder / "base"
    base.mkdir()
    torch.manual_seed(0)
    model = Transformer(preset("tiny-mistral-32k", **SHAPE))
    write_checkpoint(model, base, tokenizer=True)
    records = [{"instruction": f"문제 {i}{'?' * i}", "output": "정답은 " + "가나다라"[: i % 4 + 1]} for i in range(10)]
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return base, data


def flags(settings: dict) -> list[str]:
    out = []
    for key, value in settings.items():
        out += ["--" + key.replace("_", "-"), str(value)]
    return out


@pytest.mark.slow
def test_two_processes_train_like_one_with_the_same_global_batch(setup, tmp_path):
    base, data = setup
    two = tmp_path / "two"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "komt.train", "--model", str(base), "--data", str(data), "--output", str(two),
           "--device", "cpu", "--batch-size", "2", *flags(SETTINGS)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "global batch 4 = 2 x 1 accumulation x 2 process(es)" in result.stderr

    one = train(TrainConfig(model=str(base), data=str(data), output=str(tmp_path / "one"), batch_size=4,
                            device="cpu", **SETTINGS), log=None)

    a = SafetensorsFile(two / "adapter_model.safetensors")
    b = SafetensorsFile(one / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a.keys():
        assert torch.allclose(a.tensor(key), b.tensor(key), atol=1e-5, rtol=0), key
    assert max(b.tensor(k).abs().max().item() for k in b.keys() if "lora_B" in k) > 1e-2  # it trained
    m2 = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    m1 = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    assert [m["loss"] for m in m2] == pytest.approx([m["loss"] for m in m1], abs=1e-5)
    assert [m.get("eval_loss") for m in m2] == pytest.approx([m.get("eval_loss") for m in m1], abs=1e-5)
    assert m1[1]["eval_loss"] > 0 and m1[3]["eval_loss"] > 0
    state = torch.load(two / "checkpoint-2" / "trainer_state.pt", weights_only=True)
    assert len(state["rng"]) == 2 and state["run"]["world_size"] == 2
