"""kernels.rms_norm (Triton) against kernels.reference.rms_norm_reference, forward and backward.

Without a GPU the kernels run in Triton's CPU interpreter, for this module's tests only (the
`interpret_without_gpu` fixture of tests/conftest.py).
Tolerances: fp32 1e-5; bf16 and fp16 one rounding of the output (the kernel and the reference differ
only in the order of the fp32 sum of squares).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
import kernels  # noqa: E402
from kernels.reference import rms_norm_reference  # noqa: E402

pytestmark = pytest.mark.usefixtures("interpret_without_gpu")  # the CPU interpreter, for this module only

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FWD_TOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _inputs(shape, dtype, weight_dtype=None, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3).to(dtype).to(device)
    weight = (1 + 0.5 * torch.randn(shape[-1], generator=g)).to(weight_dtype or dtype).to(device)
    return x, weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 5, 100), (7, 64), (2, 1000)])
def test_rms_norm_forward_matches_reference(dtype, shape):
    x, weight = _inputs(shape, dtype)
    y = kernels.rms_norm(x, weight, 1e-6)
    assert y.dtype == dtype and y.shape == x.shape
    tol = FWD_TOL[dtype]
    torch.testing.assert_close(y, rms_norm_reference(x, weight, 1e-6), atol=tol, rtol=tol)


def test_rms_norm_fp32_weight_on_bf16_rows_returns_bf16_like_the_reference():
    x, weight = _inputs((4, 48), torch.bfloat16, weight_dtype=torch.float32)
    y = kernels.rms_norm(x, weight, 1e-5)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, rms_norm_reference(x, weight, 1e-5), atol=1.6e-2, rtol=1.6e-2)


def test_rms_norm_reads_a_non_contiguous_view():
    x, _ = _inputs((6, 40, 5), torch.float32)
    _, weight = _inputs((5, 40), torch.float32, seed=1)
    view = x.transpose(1, 2)  # (6, 40, 5) -> (6, 5, 40): rows are strided
    y = kernels.rms_norm(view, weight, 1e-6)
    torch.testing.assert_close(y, rms_norm_reference(view, weight, 1e-6), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_rms_norm_gradients_match_autograd_on_the_reference(dtype, tol):
    # 37 rows over the interpreter's 16 backward programs: several rows per program, a ragged last one
    x, weight = _inputs((37, 72), dtype, seed=3)
    dy = torch.randn(37, 72, generator=torch.Generator().manual_seed(4)).to(dtype).to(DEVICE)

    def grads(fn):
        xr, wr = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
        fn(xr, wr, 1e-6).backward(dy)
        return xr.grad, wr.grad

    dx, dw = grads(kernels.rms_norm)
    # the reference in fp32 is the ground truth; compare in fp32 with a per-dtype tolerance
    rx, rw = grads(lambda a, w, e: rms_norm_reference(a.float(), w.float(), e).to(dtype))
    assert dx.dtype == dtype and dw.dtype == dtype
    torch.testing.assert_close(dx.float(), rx.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(dw.float(), rw.float(), atol=tol * 10, rtol=tol)


def test_rms_norm_gradient_only_for_x_when_weight_is_frozen():
    x, weight = _inputs((5, 32), torch.float32, seed=5)
    x.requires_grad_()
    kernels.rms_norm(x, weight, 1e-6).sum().backward()
    xr = x.detach().clone().requires_grad_()
    rms_norm_reference(xr, weight, 1e-6).sum().backward()
    assert weight.grad is None
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-5, rtol=1e-5)


def test_rms_norm_rejects_mismatched_weight_and_int_input_with_shapes():
    x, weight = _inputs((4, 32), torch.float32)
    with pytest.raises(ValueError, match=r"\(4, 32\).*\(31,\)"):
        kernels.rms_norm(x, weight[:31], 1e-6)
    with pytest.raises(ValueError, match="int64"):
        kernels.rms_norm(torch.ones(4, 32, dtype=torch.long, device=DEVICE), weight, 1e-6)


def test_rms_norm_refuses_cpu_tensors_outside_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA"):
        kernels.rms_norm(torch.randn(2, 8), torch.ones(8), 1e-6)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(4096, 4096), (3, 517, 5120), (64, 8192)])
def test_rms_norm_cuda_real_sizes(dtype, shape):
    x, weight = _inputs(shape, dtype, device="cuda")
    tol = FWD_TOL[dtype]
    torch.testing.assert_close(kernels.rms_norm(x, weight, 1e-5), rms_norm_reference(x, weight, 1e-5), atol=tol, rtol=tol)


@cuda
@pytest.mark.cuda
def test_rms_norm_cuda_gradients_real_size():
    x, weight = _inputs((2048, 4096), torch.bfloat16, device="cuda", seed=6)
    dy = torch.randn(2048, 4096, device="cuda").to(torch.bfloat16)
    xs = [x.detach().clone().requires_grad_() for _ in range(2)]
    ws = [weight.detach().float().clone().requires_grad_() for _ in range(2)]
    kernels.rms_norm(xs[0], ws[0], 1e-5).backward(dy)
    rms_norm_reference(xs[1].float(), ws[1], 1e-5).backward(dy.float())
    torch.testing.assert_close(xs[0].grad.float(), xs[1].grad.float(), atol=5e-2, rtol=5e-2)
    rel = (ws[0].grad - ws[1].grad).norm() / ws[1].grad.norm()
    assert rel < 1e-2
