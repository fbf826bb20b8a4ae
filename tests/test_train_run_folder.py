"""What `--output` may already hold (komt/train/run_folder.py): someone else's files are never overwritten, a
run killed before its first checkpoint is taken over, and at most --save-total-limit checkpoints are kept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_checkpoint
import torch

from komt.errors import ConfigError
from komt.model import Transformer, preset
from komt.train import TrainConfig, train
from komt.train.run_folder import inspect_output

SHAPE = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=16)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("run-folder")
    torch.manual_seed(0)
    base = write_checkpoint(Transformer(preset("tiny-mistral-32k", **SHAPE)), folder / "base", tokenizer=True)
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"질문 {i}", "output": f"답 {i}"}, ensure_ascii=False) + "\n"
                            for i in range(4)), encoding="utf-8")
    return base, data


def run(setup, output: Path, **overrides) -> Path:
    base, data = setup
    settings = dict(max_steps=3, batch_size=2, lr=5e-3, warmup_steps=1, save_every=1000, seed=0)
    settings.update(overrides)
    return train(TrainConfig(model=str(base), data=str(data), output=str(output), **settings), log=None)


@pytest.mark.parametrize("name, content", [
    ("train_config.json", '{"learning_rate": 1e-4, "note": "my own experiment"}'),
    ("adapter_config.json", '{"peft_type": "LORA", "r": 16}'),
    ("adapter_model.safetensors", "not ours"),
    ("config.json", '{"model_type": "mistral"}'),
    ("model-00001-of-00002.safetensors", "someone's shard"),
])
def test_files_no_komt_run_wrote_are_never_overwritten(setup, tmp_path, name, content):
    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_text(content)
    for resume in (False, True):
        with pytest.raises(ConfigError, match=rf"--output {out} holds {name}, which no komt run wrote"):
            run(setup, out, resume=resume)
    assert (out / name).read_text() == content and sorted(p.name for p in out.iterdir()) == [name]


def test_a_model_folder_as_output_is_refused(setup):
    base, _ = setup
    with pytest.raises(ConfigError, match="holds config.json, model.safetensors, tokenizer.model, which no komt run wrote"):
        run(setup, base)


def test_unrelated_files_do_not_stop_a_fresh_run(setup, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "NOTES.md").write_text("run log")
    run(setup, out)
    assert (out / "adapter_model.safetensors").is_file() and (out / "NOTES.md").read_text() == "run log"


def test_a_run_stopped_before_its_first_checkpoint_is_taken_over(setup, tmp_path):
    """The folder such a run leaves: its train_config.json and a partial metrics.jsonl, no checkpoint."""
    straight = run(setup, tmp_path / "straight")
    for resume in (False, True):
        out = tmp_path / f"stopped-{resume}"
        out.mkdir()
        config = json.loads((straight / "train_config.json").read_text())
        (out / "train_config.json").write_text(json.dumps({**config, "output": str(out)}))
        (out / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "lo')
        assert inspect_output(out, resume).taken_over
        run(setup, out, resume=resume)
        assert (out / "adapter_model.safetensors").read_bytes() == (straight / "adapter_model.safetensors").read_bytes()
        steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert steps == [1, 2, 3]


def test_save_total_limit_keeps_the_newest_checkpoints(setup, tmp_path):
    out = run(setup, tmp_path / "limited", max_steps=6, save_every=1, save_total_limit=2)
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-4", "checkpoint-5"]
    out = run(setup, tmp_path / "all", max_steps=4, save_every=1, save_total_limit=0)
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == [f"checkpoint-{i}" for i in (1, 2, 3)]


def test_a_checkpointed_run_needs_resume_and_a_finished_one_is_done(setup, tmp_path):
    out = run(setup, tmp_path / "run", max_steps=3, save_every=2)
    (out / "adapter_model.safetensors").unlink()  # killed after checkpoint-2, before the end
    with pytest.raises(ConfigError, match=r"already holds a training run \(newest: checkpoint-2\); pass --resume"):
        run(setup, out, max_steps=3, save_every=2)
    run(setup, out, max_steps=3, save_every=2, resume=True)
    assert inspect_output(out, resume=True).finished_steps == 3
