"""Kill-and-resume for real: `python -m komt.train` is SIGKILLed mid-run, resumed with --resume, and must end
with the adapter (and the metrics) of a run that was never interrupted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_checkpoint
from training_runs import environment, metrics, sigkill_after
import torch

from komt.model import Transformer, preset
from komt.model.safetensors_file import SafetensorsFile

STEPS, SAVE_EVERY, KILL_AFTER_STEP = 24, 4, 10
# The real 32000-token vocabulary (the tokenizer needs it) on a model narrow enough for quick CPU steps.
SHAPE = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=16)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("resume")
    base = folder / "base"
    base.mkdir()
    torch.manual_seed(0)
    model = Transformer(preset("tiny-mistral-32k", **SHAPE))
    write_checkpoint(model, base, tokenizer=True)
    records = [{"instruction": f"질문 {i}: {'무엇' * (i % 4 + 1)}?", "output": f"답 {i}입니다." * (i % 3 + 1)}
               for i in range(9)]
    data = folder / "data.json"
    data.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return base, data


def command(base: Path, data: Path, output: Path, *extra: str) -> list[str]:
    # dropout stays on (0.05): the resumed run must also restore the RNG that draws its masks
    return [sys.executable, "-m", "komt.train", "--model", str(base), "--data", str(data), "--output", str(output),
            "--max-steps", str(STEPS), "--save-every", str(SAVE_EVERY), "--batch-size", "2", "--grad-accum", "2",
            "--lr", "5e-3", "--warmup-steps", "3", "--seed", "7", *extra]


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_uninterrupted_adapter(setup, tmp_path):
    base, data = setup
    straight = tmp_path / "straight"
    subprocess.run(command(base, data, straight), env=environment(), check=True, capture_output=True, timeout=300)

    killed = tmp_path / "killed"
    sigkill_after(command(base, data, killed), killed, steps=KILL_AFTER_STEP)  # past checkpoint-8, before 12
    assert not (killed / "adapter_model.safetensors").exists()
    logged = len(metrics(killed))
    assert KILL_AFTER_STEP <= logged < STEPS
    newest = max(int(p.name.split("-")[1]) for p in killed.glob("checkpoint-*"))
    assert newest < logged  # steps were lost and must be redone

    resumed = subprocess.run(command(base, data, killed, "--resume"), env=environment(), capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {killed / f'checkpoint-{newest}'}" in resumed.stderr

    a = SafetensorsFile(straight / "adapter_model.safetensors")
    b = SafetensorsFile(killed / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a.keys():
        assert torch.allclose(a.tensor(key), b.tensor(key), atol=1e-6, rtol=0), key
    assert max(a.tensor(k).abs().max().item() for k in a.keys() if "lora_B" in k) > 1e-3  # it trained
    want, got = metrics(straight), metrics(killed)
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    assert [m["loss"] for m in got] == pytest.approx([m["loss"] for m in want], abs=1e-5)
    assert [m["lr"] for m in got] == pytest.approx([m["lr"] for m in want], abs=1e-12)


@pytest.mark.slow
def test_run_sigkilled_before_its_first_checkpoint_is_taken_over_by_a_fresh_run(setup, tmp_path):
    """Nothing was saved, so nothing is lost: a plain rerun (no --resume) starts the run over in that folder."""
    base, data = setup
    short = ("--max-steps", "8", "--save-every", "100")  # the later flags win: no checkpoint before the end
    straight = tmp_path / "straight"
    subprocess.run(command(base, data, straight, *short), env=environment(), check=True, capture_output=True,
                   timeout=300)
    killed = tmp_path / "killed"
    sigkill_after(command(base, data, killed, *short), killed, steps=2)
    assert (killed / "train_config.json").exists() and not list(killed.glob("checkpoint-*"))

    again = subprocess.run(command(base, data, killed, *short), env=environment(), capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr
    assert "stopped before its first checkpoint (nothing was saved): starting it over" in again.stderr
    a = SafetensorsFile(straight / "adapter_model.safetensors")
    b = SafetensorsFile(killed / "adapter_model.safetensors")
    for key in a.keys():
        assert torch.equal(a.tensor(key), b.tensor(key)), key
    assert [m["step"] for m in metrics(killed)] == list(range(1, 9))
    done = subprocess.run(command(base, data, killed, *short, "--resume"), env=environment(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and "is a finished run (8 steps, final weights saved); nothing to do" in done.stderr
