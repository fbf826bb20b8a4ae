"""kernels.bench: the FLOP count it reports, and its behaviour on a machine without a GPU."""

from __future__ import annotations

import pytest
import torch

from kernels.bench import main, visible_pairs
from kernels.reference import attention_mask


@pytest.mark.parametrize("T,S,causal,window", [(9, 9, True, None), (5, 12, True, 3), (7, 7, False, None), (4, 9, False, 2)])
def test_visible_pairs_counts_the_mask(T, S, causal, window):
    assert visible_pairs(T, S, causal, window) == int(attention_mask(T, S, causal=causal, window=window).sum())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_bench_without_cuda_says_so_and_exits_non_zero(capsys):
    assert main(["--quick"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
