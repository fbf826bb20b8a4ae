"""The training loop on a tiny Mistral with the real 32000-token vocabulary and tokenizer: loss falls, a few
examples are learned until greedy generation answers them, and how the global batch is cut (accumulation,
activation checkpointing) does not change the adapter."""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import pytest
from conftest import FIXTURES, write_checkpoint
import torch

import komt
from komt.errors import ConfigError, TokenizerError
from komt.generate import generate
from komt.generate.prompt import format_prompt
from komt.model import Transformer, preset
from komt.model.safetensors_file import SafetensorsFile, write_safetensors
from komt.train import TrainConfig, train

TOKENIZER = Path(__file__).parent / "fixtures" / "tokenizer" / "tokenizer.model"
RECORDS = [
    {"instruction": "한국의 수도는?", "output": "서울입니다."},
    {"instruction": "1 더하기 1은?", "output": "2입니다."},
    {"instruction": "What is red?", "output": "A color."},
    {"messages": [{"role": "user", "content": "안녕"}, {"role": "assistant", "content": "네, 안녕하세요!"}]},
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A random tiny-mistral-32k checkpoint folder with the real tokenizer."""
    folder = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    model = Transformer(preset("tiny-mistral-32k"))
    write_checkpoint(model, folder, tokenizer=True)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "data.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in RECORDS), encoding="utf-8")
    return path


def run(base: Path, data: Path, output: Path, log=None, **overrides) -> Path:
    settings = dict(max_steps=4, batch_size=4, lr=5e-3, warmup_steps=1, save_every=1000, seed=0)
    settings.update(overrides)
    return train(TrainConfig(model=str(base), data=str(data), output=str(output), **settings), log=log)


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    f = SafetensorsFile(folder / "adapter_model.safetensors")
    return {k: f.tensor(k).clone() for k in f.keys()}


def assert_same_adapter(a: Path, b: Path, atol: float) -> None:
    ta, tb = adapter_tensors(a), adapter_tensors(b)
    assert ta.keys() == tb.keys()
    worst = max((ta[k] - tb[k]).abs().max().item() for k in ta)
    assert worst <= atol, f"adapters differ by {worst}"


def test_loss_falls_and_every_step_is_logged(base, data, tmp_path):
    log = io.StringIO()
    out = train(TrainConfig(model=str(base), data=str(data), output=str(tmp_path / "run"), max_steps=12,
                            batch_size=4, lr=1e-2, warmup_steps=2, save_every=1000, seed=0), log=log)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 13))
    assert all({"step", "loss", "lr", "tokens_per_s", "grad_norm"} <= m.keys() for m in metrics)
    assert metrics[0]["lr"] == pytest.approx(5e-3) and metrics[1]["lr"] == pytest.approx(1e-2)
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 2.0
    text = log.getvalue()
    assert "trainable params: 16,384 of" in text and "adapter saved to" in text
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["base_model_name_or_path"] == str(base)
    assert (adapter_config["r"], adapter_config["lora_alpha"], adapter_config["lora_dropout"]) == (8, 32, 0.05)
    assert json.loads((out / "train_config.json").read_text())["max_steps"] == 12


def test_overfit_few_examples_until_greedy_generation_answers(base, data, tmp_path):
    out = run(base, data, tmp_path / "run", max_steps=40, lr=1e-2, warmup_steps=0, lora_dropout=0.0)
    model = komt.load_model(base, adapter=out)
    tokenizer = komt.load_tokenizer(base)
    for record in RECORDS[:3]:
        ids = generate(model, format_prompt(tokenizer, record["instruction"]), max_new_tokens=16,
                       eos_id=tokenizer.eos_id)
        assert tokenizer.decode(ids) == record["output"]
    # the base model alone does not know the answers
    plain = komt.load_model(base)
    ids = generate(plain, format_prompt(tokenizer, RECORDS[0]["instruction"]), max_new_tokens=8)
    assert tokenizer.decode(ids) != RECORDS[0]["output"]


def test_same_seed_same_adapter_other_seed_other_adapter(base, data, tmp_path):
    a = run(base, data, tmp_path / "a", max_steps=3)
    b = run(base, data, tmp_path / "b", max_steps=3)
    c = run(base, data, tmp_path / "c", max_steps=3, seed=1)
    assert_same_adapter(a, b, atol=0.0)
    with pytest.raises(AssertionError):
        assert_same_adapter(a, c, atol=1e-3)


def test_accumulation_and_activation_checkpointing_do_not_change_the_adapter(base, data, tmp_path):
    """Global batch 4 as 1 x 4, 2 x 2 (+ checkpointing) or 4 x 1: the same token-mean loss, the same updates."""
    whole = run(base, data, tmp_path / "whole", batch_size=4, grad_accum=1, lora_dropout=0.0)
    halves = run(base, data, tmp_path / "halves", batch_size=2, grad_accum=2, lora_dropout=0.0,
                 grad_checkpointing=True)
    singles = run(base, data, tmp_path / "singles", batch_size=1, grad_accum=4, lora_dropout=0.0)
    assert_same_adapter(whole, halves, atol=2e-5)
    assert_same_adapter(whole, singles, atol=2e-5)


def test_eval_split_logs_eval_loss(base, data, tmp_path):
    out = run(base, data, tmp_path / "run", max_steps=4, batch_size=3, eval_split=0.25, eval_every=2)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "eval_loss" in m] == [2, 4]
    assert all(0 < m["eval_loss"] < 20 for m in metrics if "eval_loss" in m)


def test_checkpoints_are_complete_peft_adapters(base, data, tmp_path):
    out = run(base, data, tmp_path / "run", max_steps=5, save_every=2)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-2", "checkpoint-4"]
    state = torch.load(out / "checkpoint-4" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 4 and state["data_position"] == {"epoch": 4, "batch": 0}
    assert {"optimizer", "scheduler", "rng", "run"} <= state.keys()
    komt.load_model(base, adapter=out / "checkpoint-4")  # loads as an adapter on its own
    assert not list(out.glob(".checkpoint-*"))


def test_output_of_a_finished_run_is_refused_and_resume_says_it_is_done(base, data, tmp_path):
    out = run(base, data, tmp_path / "run", max_steps=2)
    with pytest.raises(ConfigError, match=r"already holds a finished training run \(2 steps\)"):
        run(base, data, out, max_steps=2)
    before = (out / "adapter_model.safetensors").read_bytes(), (out / "metrics.jsonl").read_text()
    log = io.StringIO()
    assert run(base, data, out, log=log, max_steps=2, resume=True) == out
    assert "is a finished run (2 steps, final weights saved); nothing to do" in log.getvalue()
    assert ((out / "adapter_model.safetensors").read_bytes(), (out / "metrics.jsonl").read_text()) == before


def test_resume_with_different_settings_is_refused(base, data, tmp_path):
    out = run(base, data, tmp_path / "run", max_steps=3, save_every=2)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (out / name).unlink()  # as if killed after checkpoint-2
    with pytest.raises(ConfigError, match=r"--resume: .*checkpoint-2 was trained with lr 0.005, this run has 0.001"):
        run(base, data, out, max_steps=3, save_every=2, lr=1e-3, resume=True)
    with pytest.raises(ConfigError, match="total_steps 3"):
        run(base, data, out, max_steps=5, save_every=2, resume=True)


def test_a_finished_run_cannot_be_resumed_with_other_settings(base, data, tmp_path):
    out = run(base, data, tmp_path / "run", max_steps=3)
    with pytest.raises(ConfigError, match=r"--resume: .* is a finished run trained with max_steps 3, this run has 5"):
        run(base, data, out, max_steps=5, resume=True)


def test_tokenizer_larger_than_the_model_vocabulary_is_refused(data, tmp_path):
    folder = tmp_path / "small-vocab"
    folder.mkdir()
    model = Transformer(preset("tiny-mistral-32k", vocab_size=1000))
    (folder / "config.json").write_text(json.dumps(model.config.to_hf_dict()))
    write_safetensors(folder / "model.safetensors", list(model.state_dict().items()))
    with pytest.raises(TokenizerError, match="has 32000 tokens but the model's embedding only 1000"):
        run(folder, data, tmp_path / "run", tokenizer=str(TOKENIZER))


def test_loss_curve_png_when_matplotlib_is_installed(base, data, tmp_path):
    pytest.importorskip("matplotlib")
    out = run(base, data, tmp_path / "run", max_steps=3, batch_size=3, eval_split=0.25, eval_every=1)
    png = (out / "loss_curve.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000


def test_loss_curve_is_skipped_with_a_note_without_matplotlib(base, data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    log = io.StringIO()
    out = train(TrainConfig(model=str(base), data=str(data), output=str(tmp_path / "run"), max_steps=1), log=log)
    assert "matplotlib is not installed; skipping the loss curve" in log.getvalue()
    assert not (out / "loss_curve.png").exists() and (out / "adapter_model.safetensors").exists()


@pytest.mark.cuda
def test_bf16_autocast_training_on_cuda_matches_what_it_learns(base, data, tmp_path):
    out = run(base, data, tmp_path / "run", max_steps=40, lr=1e-2, warmup_steps=0, lora_dropout=0.0, device="cuda",
              grad_checkpointing=True)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 2.0
    f = SafetensorsFile(out / "adapter_model.safetensors")
    assert {f.dtype(k) for k in f.keys()} == {torch.float32}  # fp32 master weights under bf16 autocast
    model = komt.load_model(base, adapter=out, device="cuda", dtype="bf16")
    tokenizer = komt.load_tokenizer(base)
    ids = generate(model, format_prompt(tokenizer, RECORDS[0]["instruction"]), max_new_tokens=16,
                   eos_id=tokenizer.eos_id)
    assert tokenizer.decode(ids) == RECORDS[0]["output"]


def test_a_checkpoint_with_a_chat_template_trains_in_it(tmp_path):
    """A tiny random Mistral with SmolLM2's tokenizer files: auto picks the template and the loss falls."""
    folder = tmp_path / "smol"
    torch.manual_seed(0)
    write_checkpoint(Transformer(preset("tiny-mistral-32k", vocab_size=49152, hidden_size=32, intermediate_size=64,
                                        num_attention_heads=2, num_key_value_heads=1)), folder)
    for file in (FIXTURES / "smollm2-tokenizer").glob("*.j*"):
        shutil.copy(file, folder)
    records = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}]}] * 8
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    log = io.StringIO()
    out = train(TrainConfig(model=str(folder), data=str(data), output=str(tmp_path / "run"), max_steps=6,
                            batch_size=4, lr=1e-2, warmup_steps=1, save_every=1000, seed=0), log=log)
    assert "prompt format: template (" in log.getvalue()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["loss"] < metrics[0]["loss"]
