"""`python -m komt.train` on bad input: a one-line `error: ...`, exit status 2, never a traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_checkpoint

from komt.model import Transformer, preset
from komt.train.cli import build_train_parser, config_from_args, main

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "tests" / "fixtures" / "tokenizer" / "tokenizer.model"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("base")
    model = Transformer(preset("tiny-mistral-32k", hidden_size=32, intermediate_size=64, num_attention_heads=2,
                               num_key_value_heads=1, head_dim=16))
    write_checkpoint(model, folder, tokenizer=True)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "data.jsonl"
    path.write_text(json.dumps({"instruction": "안녕", "output": "네"}, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def error_of(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith("error: ")
    return last


@pytest.mark.parametrize(
    "flags, message",
    [
        ([], "the following arguments are required: --model, --data, --output"),
        (["--batch-size", "0"], "argument --batch-size: must be a positive integer, got '0'"),
        (["--grad-accum", "two"], "argument --grad-accum: must be a positive integer, got 'two'"),
        (["--lr", "0"], "argument --lr: must be a number in (0, inf), got '0'"),
        (["--lora-dropout", "1"], "argument --lora-dropout: must be a number in [0, 1), got '1'"),
        (["--eval-split", "1.5"], "argument --eval-split: must be a number in [0, 1), got '1.5'"),
        (["--warmup-steps", "-3"], "argument --warmup-steps: must be a non-negative integer, got '-3'"),
        (["--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'"),
        (["--max-steps", "3", "--epochs", "1"], "argument --epochs: not allowed with argument --max-steps"),
        (["--lora-r", "0"], "argument --lora-r: must be a positive integer, got '0'"),
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    ],
)
def test_bad_flags_are_one_line_errors(flags, message, capsys):
    argv = ["--model", "m", "--data", "d", "--output", "o", *flags] if flags else []
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err


def test_bad_files_are_one_line_errors(base, data, tmp_path, capsys):
    out = str(tmp_path / "out")
    common = ["--max-steps", "1", "--output", out]
    assert "no such folder" in error_of(["--model", str(tmp_path / "no" / "model"), "--data", str(data), *common], capsys)
    assert "no such data file" in error_of(["--model", str(base), "--data", str(tmp_path / "x.jsonl"), *common], capsys)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"\n', encoding="utf-8")
    assert f"{bad}:2: not valid JSON" in error_of(["--model", str(base), "--data", str(bad), *common], capsys)
    no_tok = tmp_path / "no-tok"
    shutil.copytree(base, no_tok)
    (no_tok / "tokenizer.model").unlink()
    assert "has no tokenizer.model" in error_of(["--model", str(no_tok), "--data", str(data), *common], capsys)
    assert "LoRA target 'qproj' matches no linear layer" in error_of(
        ["--model", str(base), "--data", str(data), "--lora-targets", "qproj", *common], capsys)
    assert "--resume: no checkpoint" in error_of(["--model", str(base), "--data", str(data), "--resume", *common], capsys)
    assert not (tmp_path / "out").exists()  # nothing is written before every input has been checked


def test_tokenizer_flag_points_at_a_tokenizer_elsewhere(base, data, tmp_path, capsys):
    no_tok = tmp_path / "no-tok"
    shutil.copytree(base, no_tok)
    (no_tok / "tokenizer.model").unlink()
    argv = ["--model", str(no_tok), "--data", str(data), "--output", str(tmp_path / "out"), "--max-steps", "1",
            "--tokenizer", str(TOKENIZER)]
    assert main(argv) == 0
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_flags_map_onto_the_config_and_defaults_are_the_komt_recipe():
    args = build_train_parser().parse_args(["--model", "m", "--data", "d", "--output", "o"])
    config = config_from_args(args)
    assert (config.lora_r, config.lora_alpha, config.lora_dropout, config.max_seq_len) == (8, 32, 0.05, 2048)
    assert config.lora_targets == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    args = build_train_parser().parse_args(["--model", "m", "--data", "d", "--output", "o", "--epochs", "2.5",
                                            "--grad-checkpointing", "--lora-targets", "q_proj", "v_proj"])
    config = config_from_args(args)
    assert config.epochs == 2.5 and config.grad_checkpointing and config.lora_targets == ("q_proj", "v_proj")


def test_module_entry_point_exits_2_with_one_line():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-m", "komt.train", "--model", "m", "--data", "d", "--output", "o",
                             "--batch-size", "-1"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2
    assert result.stderr == "error: argument --batch-size: must be a positive integer, got '-1'\n"
    help_text = subprocess.run([sys.executable, "-m", "komt.train", "--help"], capture_output=True, text=True,
                               env=env, timeout=120)
    assert help_text.returncode == 0 and "--save-every" in help_text.stdout and "(default: 8)" in help_text.stdout


def test_prompt_format_flag_reaches_the_config(capsys):
    args = build_train_parser().parse_args(["--model", "m", "--data", "d", "--output", "o", "--prompt-format", "template"])
    assert config_from_args(args).prompt_format == "template"
    assert config_from_args(build_train_parser().parse_args(["--model", "m", "--data", "d", "--output", "o"])).prompt_format == "auto"
    assert "argument --prompt-format: invalid choice: 'chatml'" in error_of(
        ["--model", "m", "--data", "d", "--output", "o", "--prompt-format", "chatml"], capsys)
