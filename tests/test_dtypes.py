"""komt.model.dtypes: one set of --dtype choices and one meaning of `auto`, for every command."""

from __future__ import annotations

import argparse

import pytest
import torch

from komt.errors import ConfigError
from komt.model.dtypes import DTYPE_CHOICES, parse_dtype, resolve_dtype


def test_auto_is_bf16_on_cuda_and_the_checkpoints_own_elsewhere():
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cpu")) is None  # load_model(dtype=None): the checkpoint's own
    assert resolve_dtype("fp32", torch.device("cuda")) == torch.float32
    assert resolve_dtype("fp16", torch.device("cpu")) == torch.float16


def test_every_name_of_a_dtype_parses_to_it():
    for names, dtype in ((("fp32", "float32", "float", "FP32"), torch.float32),
                         (("bf16", "bfloat16"), torch.bfloat16), (("fp16", "float16", "half"), torch.float16)):
        assert {parse_dtype(name) for name in names} == {dtype}
    assert parse_dtype(None) is None and parse_dtype(torch.bfloat16) is torch.bfloat16
    with pytest.raises(ConfigError, match="unknown dtype 'fp8'; use fp32, bf16 or fp16"):
        parse_dtype("fp8")


def _dtype_choices(parser: argparse.ArgumentParser) -> tuple:
    (action,) = [a for a in parser._actions if "--dtype" in a.option_strings or "--load-dtype" in a.option_strings]
    return tuple(action.choices), action.default


def test_every_command_offers_the_same_dtype_choices_with_auto_by_default():
    from komt.eval.cli import build_parser as eval_parser
    from komt.generate.bench import build_parser as bench_parser
    from komt.generate.cli import build_parser as generate_parser
    from komt.serve.cli import build_parser as serve_parser
    from komt.train.bench import build_parser as train_bench_parser
    from komt.train.cli import build_dpo_parser, build_merge_parser, build_train_parser

    for build in (generate_parser, bench_parser, serve_parser, eval_parser, build_train_parser, build_dpo_parser,
                  build_merge_parser, train_bench_parser):
        assert _dtype_choices(build()) == (DTYPE_CHOICES, "auto"), build.__module__


def test_training_refuses_fp16_in_one_line_and_reads_auto_as_every_command_does():
    from komt.train.config import TrainConfig
    from komt.train.model_prep import training_dtype

    with pytest.raises(ConfigError, match="^--dtype fp16 cannot train: fp16 needs loss scaling"):
        TrainConfig(model="m", data="d", output="o", dtype="fp16")
    assert training_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert training_dtype("auto", torch.device("cpu")) == torch.float32  # auto forces none there: fp32 training
    assert training_dtype("bf16", torch.device("cpu")) == torch.bfloat16
