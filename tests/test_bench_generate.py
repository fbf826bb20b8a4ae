"""Smoke test of `python -m komt.generate.bench` and its random-weight builder (figures are not checked)."""

import re

import pytest
import torch

from komt.generate import bench
from komt.model import preset
from komt.model.checkpoint import random_model


def test_random_model_is_initialised_on_the_target_device():
    config = preset("smollm2-135m", num_hidden_layers=2, vocab_size=256)
    model = random_model(config, torch.device("cpu"), torch.bfloat16, seed=1)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tie survives to_empty
    params = dict(model.named_parameters())
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in params.values())
    assert all(torch.isfinite(p).all() for p in params.values())
    assert torch.equal(params["model.norm.weight"], torch.ones(576, dtype=torch.bfloat16))
    std = params["model.layers.0.mlp.up_proj.weight"].float().std().item()
    assert abs(std - 0.02) < 0.002
    again = random_model(config, torch.device("cpu"), torch.bfloat16, seed=1)
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)  # seeded


def test_bench_prints_a_row_per_run(capsys):
    status = bench.main(["--preset", "tiny-mistral-32k", "--window", "8", "--prompt-len", "5", "--new-tokens", "20",
                         "--repeat", "2", "--device", "cpu"])
    assert status == 0
    out = capsys.readouterr().out
    assert "tiny-mistral-32k (random weights)" in out and "window 8" in out
    rows = [line for line in out.splitlines() if re.match(r"\s+\d+\s+[\d.]+\s", line)]
    assert len(rows) == 2
    assert re.search(r"decode tok/s: best [\d.]+, median [\d.]+ .*peak memory \d+ MB \(RSS\)", out)


def test_bench_batch_and_bad_values(capsys):
    assert bench.main(["--preset", "tiny-mistral-32k", "--batch-size", "3", "--new-tokens", "4", "--repeat", "1",
                       "--device", "cpu"]) == 0
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--preset", "tiny-mistral-32k", "--new-tokens", "0"])
    assert exit_info.value.code == 2
    assert "error: argument --new-tokens: must be a positive integer, got '0'" in capsys.readouterr().err
