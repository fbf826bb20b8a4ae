"""kernels.bench: the FLOP and byte counts it reports, its torch baselines, and its behaviour without a GPU."""

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


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
@pytest.mark.parametrize("kernel", ["int8", "int4"])
def test_quant_bench_without_cuda_says_so_and_exits_non_zero(capsys, kernel):
    assert main(["--kernel", kernel, "--quick"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--group-size", "32"], ["--kernel", "int4", "--group-size", "48"],
                                  ["--kernel", "int8", "--group-size", "8"]])
def test_quant_bench_refuses_group_sizes_it_cannot_run(capsys, argv):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2 and "--group-size" in capsys.readouterr().err


@pytest.mark.parametrize("bits,group_size", [(8, None), (8, 32), (4, 32), (4, 128)])
def test_quant_weight_bytes_counts_every_stored_tensor(bits, group_size):
    from kernels.bench_quant import quant_weight_bytes

    O, I = 48, 256
    g = group_size or I
    stored = [torch.zeros(O, I if bits == 8 else I // 2, dtype=torch.int8 if bits == 8 else torch.uint8),
              torch.zeros(O, I // g, dtype=torch.float16)] + ([torch.zeros(O, I // g, dtype=torch.float16)] if bits == 4 else [])
    assert quant_weight_bytes(O, I, bits, group_size) == sum(t.numel() * t.element_size() for t in stored)


def test_torch_int8_baseline_computes_the_reference_where_torch_has_it():
    """The benchmark compares against torch._weight_int8pack_mm only if it computes the same product."""
    from kernels.bench_quant import _checked, _torch_baseline
    from kernels.reference import dequantize_int8, int8_matmul_reference

    q = torch.randint(-127, 128, (64, 256), dtype=torch.int8)
    scales = (torch.rand(64, 1) / 100).half()
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    fn = _checked(_torch_baseline(8, (q, scales, None)), x, dequantize_int8(q, scales), "torch int8")
    assert fn is not None
    torch.testing.assert_close(fn(x), int8_matmul_reference(x, q, scales), atol=2e-2, rtol=2e-2)
