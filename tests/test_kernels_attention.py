"""kernels.attention (Triton prefill + flash-decoding) against kernels.reference.attention_reference.

Without a GPU the kernels run in Triton's CPU interpreter (the `interpret_without_gpu` fixture of
tests/conftest.py turns it on for this module's tests only), with 16-slot blocks so that T and S below
straddle several blocks and end ragged.
Tolerances: fp32 1e-4 (fp32 IEEE dots; exp2 differs from exp by rounding); bf16 2e-2 (bf16 output
rounding, and on the GPU p is rounded to bf16 before the P @ V product, as in FlashAttention-2).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
import kernels  # noqa: E402
from kernels.flash_attention import flash_attention  # noqa: E402
from kernels.flash_decoding import flash_decoding  # noqa: E402
from kernels.reference import attention_reference  # noqa: E402

pytestmark = pytest.mark.usefixtures("interpret_without_gpu")  # the CPU interpreter, for this module only

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _qkv(B, Hq, Hkv, T, S, D, dtype, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T, D, generator=g)
    k = torch.randn(B, Hkv, S, D, generator=g)
    v = torch.randn(B, Hkv, S, D, generator=g)
    return (t.to(dtype).to(device) for t in (q, k, v))


def _close(out, ref, dtype):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


def _rolling_positions(n_written: int, slots: int) -> torch.Tensor:
    """k_pos of a rolling buffer of `slots` after `n_written` tokens: slot s holds the latest p with p % slots == s."""
    pos = torch.full((slots,), -1, dtype=torch.long)
    for p in range(n_written):
        pos[p % slots] = p
    return pos


PREFILL_CASES = [
    # B, Hq, Hkv, T, S, D, window, causal
    (2, 4, 4, 37, 37, 64, None, True),  # GQA 1, odd T == S
    (1, 4, 2, 33, 33, 128, None, True),  # GQA 2, D 128
    (2, 8, 2, 29, 40, 64, 5, True),  # GQA 4, prefill on a cache, window < T
    (1, 4, 2, 19, 19, 64, 64, True),  # window > T: same as plain causal
    (1, 4, 1, 21, 35, 128, 9, True),  # GQA 4, D 128, window < T < S
    (1, 2, 1, 23, 23, 64, None, False),  # not causal
    (2, 4, 2, 40, 40, 64, 20, True),  # window wider than a block: unmasked interior blocks inside the band
    (1, 2, 2, 26, 26, 64, 9, False),  # window without causality: the band reaches into the future
    (1, 2, 1, 20, 20, 16, None, True),  # smallest head dim
    (1, 2, 2, 18, 25, 256, 11, True),  # largest head dim
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,Hq,Hkv,T,S,D,window,causal", PREFILL_CASES)
def test_prefill_matches_reference(B, Hq, Hkv, T, S, D, window, causal, dtype):
    q, k, v = _qkv(B, Hq, Hkv, T, S, D, dtype)
    out = kernels.attention(q, k, v, causal=causal, window=window)
    _close(out, attention_reference(q, k, v, causal=causal, window=window), dtype)


DECODE_CASES = [
    # B, Hq, Hkv, S, D, window
    (2, 4, 4, 40, 64, 7),  # GQA 1, S well past the window
    (1, 4, 2, 37, 128, None),  # GQA 2, D 128, whole cache
    (2, 8, 2, 33, 64, 4),  # GQA 4
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,Hq,Hkv,S,D,window", DECODE_CASES)
def test_decode_matches_reference(B, Hq, Hkv, S, D, window, dtype):
    q, k, v = _qkv(B, Hq, Hkv, 1, S, D, dtype, seed=1)
    out = kernels.attention(q, k, v, window=window)
    _close(out, attention_reference(q, k, v, window=window), dtype)


@pytest.mark.parametrize("n_splits", [1, 2, 3])
def test_decode_result_does_not_depend_on_the_number_of_splits(n_splits):
    q, k, v = _qkv(1, 4, 2, 1, 39, 64, torch.float32, seed=2)
    out = flash_decoding(q, k, v, n_splits=n_splits)
    _close(out, attention_reference(q, k, v), torch.float32)


def test_decode_split_with_only_empty_slots_adds_nothing():
    q, k, v = _qkv(2, 4, 2, 1, 40, 64, torch.float32, seed=10)
    k_pos = torch.arange(40, device=DEVICE).repeat(2, 1)
    k_pos[0, :16] = -1  # the whole first split of row 0 is empty (16-slot blocks on the interpreter)
    k_pos[1, 30:] = -1  # and the tail of row 1
    q_pos = torch.tensor([[39], [29]], device=DEVICE)
    out = flash_decoding(q, k, v, q_pos=q_pos, k_pos=k_pos, n_splits=3)
    _close(out, attention_reference(q, k, v, q_pos=q_pos, k_pos=k_pos), torch.float32)


def test_decode_with_window_equals_full_attention_over_the_last_W_keys():
    q, k, v = _qkv(2, 4, 2, 1, 40, 64, torch.float32, seed=3)
    windowed = kernels.attention(q, k, v, window=6)
    last_w = kernels.attention(q, k[:, :, -6:].contiguous(), v[:, :, -6:].contiguous())
    torch.testing.assert_close(windowed, last_w, atol=1e-5, rtol=1e-5)


def _rolling_cache_batch(T: int, slots: int, window: int, seed: int):
    """Two batch rows of a rolling-buffer cache with different histories, slots shuffled, empty slots."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(slots, generator=g)
    k_pos = torch.stack([_rolling_positions(45, slots), _rolling_positions(3 + T, slots)])[:, perm]
    q_pos = torch.stack([torch.arange(45 - T, 45), torch.arange(3, 3 + T)])  # the newest T of each row
    assert (k_pos[1] < 0).any() and (k_pos[0] >= 0).all()
    return q_pos.to(DEVICE), k_pos.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,D,Hq,Hkv", [(5, 64, 4, 2), (1, 64, 4, 1), (1, 128, 2, 2), (17, 128, 4, 4)])
def test_explicit_positions_rolling_buffer_matches_reference(T, D, Hq, Hkv, dtype):
    slots, window = 24, 12
    q_pos, k_pos = _rolling_cache_batch(T, slots, window, seed=T + D)
    q, k, v = _qkv(2, Hq, Hkv, T, slots, D, dtype, seed=4)
    out = kernels.attention(q, k, v, window=window, q_pos=q_pos, k_pos=k_pos)
    _close(out, attention_reference(q, k, v, window=window, q_pos=q_pos, k_pos=k_pos), dtype)


@pytest.mark.parametrize("T,S,window", [(37, 37, None), (13, 30, 6), (1, 33, 5)])
def test_explicit_in_order_positions_equal_the_implicit_layout(T, S, window):
    q, k, v = _qkv(2, 4, 2, T, S, 64, torch.float32, seed=5)
    q_pos = torch.arange(S - T, S, device=DEVICE).expand(2, T)
    k_pos = torch.arange(S, device=DEVICE).expand(2, S)
    implicit = kernels.attention(q, k, v, window=window)  # block skipping + unmasked interior blocks
    explicit = kernels.attention(q, k, v, window=window, q_pos=q_pos, k_pos=k_pos)  # every block masked
    torch.testing.assert_close(implicit, explicit, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("T", [1, 6])
def test_query_with_no_visible_key_returns_zeros(T):
    q, k, v = _qkv(1, 2, 1, T, 20, 64, torch.float32, seed=6)
    q_pos = torch.tensor([[3, 12, 3, 12, 3, 12][:T]], device=DEVICE)  # rows at 3 see nothing, at 12 see 10..12
    k_pos = torch.arange(10, 30, device=DEVICE)[None, :]
    k_pos[0, 5] = -1  # and one empty slot
    out = kernels.attention(q, k, v, q_pos=q_pos, k_pos=k_pos)
    assert torch.isfinite(out).all()
    _close(out, attention_reference(q, k, v, q_pos=q_pos, k_pos=k_pos), torch.float32)
    blind = (q_pos[0] == 3).nonzero().flatten()
    assert torch.equal(out[:, :, blind], torch.zeros_like(out[:, :, blind]))
    if T > 1:
        assert out[:, :, 1].abs().sum() > 0


def test_more_queries_than_keys_leaves_early_rows_zero():
    q, k, v = _qkv(1, 2, 2, 20, 9, 64, torch.float32, seed=7)  # queries at positions -11..8
    out = kernels.attention(q, k, v)
    _close(out, attention_reference(q, k, v), torch.float32)
    assert torch.equal(out[:, :, :11], torch.zeros_like(out[:, :, :11]))


def test_custom_scale_and_strided_inputs():
    q, k, v = _qkv(1, 4, 2, 18, 18, 64, torch.float32, seed=8)
    # the model hands over views of (B, T, H, D) projections: (B, T, H, D) -> (B, H, T, D)
    qs, ks, vs = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not qs.is_contiguous()
    out = kernels.attention(qs, ks, vs, scale=0.05, window=7)
    _close(out, attention_reference(q, k, v, scale=0.05, window=7), torch.float32)


GRAD_CASES = [
    # B, Hq, Hkv, T, S, D, window, causal, dtype
    (1, 4, 2, 9, 12, 64, 5, True, torch.float32),  # GQA 2, queries on a cache, window < T
    (2, 4, 4, 21, 21, 16, None, True, torch.float32),  # GQA 1, T == S, ragged blocks
    (1, 8, 2, 19, 33, 32, 7, True, torch.float32),  # GQA 4, window < T < S: blocks skipped both ways
    (1, 2, 1, 17, 17, 16, None, False, torch.float32),  # not causal
    (1, 2, 2, 18, 18, 16, 6, False, torch.float32),  # window reaching into the future
    (1, 4, 2, 1, 20, 64, None, True, torch.float32),  # one query row (a decode step with grad)
    (1, 4, 2, 20, 20, 128, None, True, torch.float32),  # D 128
    (1, 4, 2, 17, 17, 64, 6, True, torch.bfloat16),
]


def _grads(fn, q, k, v, dout, **options):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    fn(*leaves, **options).backward(dout)
    return [t.grad for t in leaves]


@pytest.mark.parametrize("B, Hq, Hkv, T, S, D, window, causal, dtype", GRAD_CASES)
def test_triton_backward_matches_reference_autograd(B, Hq, Hkv, T, S, D, window, causal, dtype):
    q, k, v = _qkv(B, Hq, Hkv, T, S, D, dtype, seed=9)
    dout = torch.randn(B, Hq, T, D, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    options = dict(window=window, causal=causal)
    want = _grads(attention_reference, *(t.float() for t in (q, k, v)), dout.float(), **options)
    got = _grads(kernels.attention, q, k, v, dout, **options)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    for name, g, w in zip("qkv", got, want):
        assert g.dtype == dtype and g.shape == w.shape, name
        torch.testing.assert_close(g.float(), w, atol=tol, rtol=tol, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("window", [1, 2, 3, 8, 15, 16, 17, 32])
def test_triton_backward_over_window_sizes_at_block_edges(window):
    """Windows around the 16-slot block size: the band's first and last blocks are skipped exactly."""
    q, k, v = _qkv(1, 2, 1, 33, 34, 16, torch.float32, seed=window)  # S - T = 1: bounds land on block edges
    dout = torch.randn(1, 2, 33, 16).to(DEVICE)
    for causal in (True, False):
        got = _grads(kernels.attention, q, k, v, dout, window=window, causal=causal)
        want = _grads(attention_reference, q, k, v, dout, window=window, causal=causal)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


def test_triton_backward_with_rolling_buffer_positions():
    """Unordered slots, an empty slot and a window: the backward masks by position like the forward."""
    q, k, v = _qkv(2, 4, 2, 5, 12, 32, torch.float32, seed=3)
    k_pos = torch.stack([_rolling_positions(15, 12), _rolling_positions(7, 12)]).to(DEVICE)  # row 1: 5 empty slots
    q_pos = torch.stack([torch.arange(10, 15), torch.arange(2, 7)]).to(DEVICE)
    dout = torch.randn(2, 4, 5, 32).to(DEVICE)
    options = dict(window=8, q_pos=q_pos, k_pos=k_pos)
    for g, w in zip(_grads(kernels.attention, q, k, v, dout, **options),
                    _grads(attention_reference, q, k, v, dout, **options)):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


def test_a_row_with_no_visible_key_gets_zero_gradients():
    q, k, v = _qkv(1, 2, 1, 3, 6, 16, torch.float32, seed=4)
    k_pos = torch.tensor([[-1, -1, -1, 3, 4, 5]], device=DEVICE)
    q_pos = torch.tensor([[0, 4, 5]], device=DEVICE)  # query 0 sees nothing: keys start at position 3
    dout = torch.ones(1, 2, 3, 16, device=DEVICE)
    dq, dk, dv = _grads(kernels.attention, q, k, v, dout, q_pos=q_pos, k_pos=k_pos)
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()
    assert (dq[:, :, 0] == 0).all() and (dk[:, :, :3] == 0).all() and (dv[:, :, :3] == 0).all()
    want = _grads(attention_reference, q, k, v, dout, q_pos=q_pos, k_pos=k_pos)
    for g, w in zip((dq, dk, dv), want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


def test_forward_log_sum_exp_matches_the_scores():
    q, k, v = _qkv(1, 2, 1, 7, 9, 16, torch.float32, seed=5)
    _, lse = flash_attention(q, k, v, window=4, return_lse=True)
    scores = (q @ k.repeat_interleave(2, dim=1).transpose(-1, -2)) * 16**-0.5  # (B, Hq, T, S)
    visible = kernels.attention_mask(7, 9, window=4)
    want = torch.where(visible, scores, float("-inf")).logsumexp(-1) * 1.4426950408889634  # log2 domain
    torch.testing.assert_close(lse, want, atol=1e-5, rtol=1e-5)


def test_bad_inputs_raise_value_errors_naming_shapes():
    q, k, v = _qkv(1, 3, 2, 4, 4, 64, torch.float32)
    with pytest.raises(ValueError, match=r"\(1, 3, 4, 64\)"):
        kernels.attention(q, k, v)
    q, k, v = _qkv(1, 2, 2, 4, 4, 48, torch.float32)
    with pytest.raises(ValueError, match="D=48"):
        kernels.attention(q, k, v)
    q, k, v = _qkv(1, 2, 2, 4, 4, 64, torch.float32)
    with pytest.raises(ValueError, match="float32.*bfloat16"):
        kernels.attention(q, k.bfloat16(), v)
    with pytest.raises(ValueError, match=r"k_pos \[B, S=4\]"):
        kernels.attention(q, k, v, q_pos=torch.zeros(1, 4, dtype=torch.long), k_pos=torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="window"):
        kernels.attention(q, k, v, window=-1)


def test_cpu_tensors_are_refused_outside_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = _qkv(1, 2, 2, 4, 4, 64, torch.float32, device="cpu")
    with pytest.raises(ValueError, match="CUDA"):
        kernels.attention(q, k, v)


# ---- the same grid at real sizes on a GPU ------------------------------------------------------------

CUDA_PREFILL = [
    # B, Hq, Hkv, T, S, D, window
    (2, 8, 8, 1000, 1000, 64, None),
    (1, 32, 8, 2048, 2048, 128, None),
    (2, 16, 8, 777, 1531, 128, 256),
    (1, 8, 2, 1537, 1537, 128, 4096),
    (1, 16, 4, 3001, 3001, 64, 513),
    (1, 8, 4, 1025, 1025, 256, None),
    (2, 4, 2, 999, 999, 32, 100),
]


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,Hq,Hkv,T,S,D,window", CUDA_PREFILL)
def test_cuda_prefill_real_sizes(B, Hq, Hkv, T, S, D, window, dtype):
    q, k, v = _qkv(B, Hq, Hkv, T, S, D, dtype, device="cuda")
    out = flash_attention(q, k, v, window=window)
    _close(out, attention_reference(q, k, v, window=window), dtype)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,Hq,Hkv,S,D,window", [(1, 32, 8, 16384, 128, None), (4, 32, 8, 16381, 128, 4096), (3, 8, 8, 5000, 64, None)])
def test_cuda_decode_real_sizes(B, Hq, Hkv, S, D, window, dtype):
    q, k, v = _qkv(B, Hq, Hkv, 1, S, D, dtype, device="cuda")
    _close(kernels.attention(q, k, v, window=window), attention_reference(q, k, v, window=window), dtype)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("B,Hq,Hkv,T,D,window", [(1, 32, 8, 1024, 128, None), (2, 8, 2, 777, 64, 256)])
def test_cuda_backward_real_sizes(B, Hq, Hkv, T, D, window):
    q, k, v = _qkv(B, Hq, Hkv, T, T, D, torch.bfloat16, device="cuda")
    dout = torch.randn(B, Hq, T, D, device="cuda", dtype=torch.bfloat16)
    want = _grads(attention_reference, *(t.float() for t in (q, k, v)), dout.float(), window=window)
    for g, w in zip(_grads(kernels.attention, q, k, v, dout, window=window), want):
        torch.testing.assert_close(g.float(), w, atol=5e-2, rtol=5e-2)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("T", [1, 300])
def test_cuda_rolling_buffer_positions(T):
    slots, window = 4096, 4096
    g = torch.Generator().manual_seed(T)
    perm = torch.randperm(slots, generator=g)
    k_pos = torch.stack([_rolling_positions(10000, slots), _rolling_positions(1000 + T, slots)])[:, perm]
    q_pos = torch.stack([torch.arange(10000 - T, 10000), torch.arange(1000, 1000 + T)])
    q, k, v = _qkv(2, 32, 8, T, slots, 128, torch.bfloat16, device="cuda")
    q_pos, k_pos = q_pos.cuda(), k_pos.cuda()
    out = kernels.attention(q, k, v, window=window, q_pos=q_pos, k_pos=k_pos)
    _close(out, attention_reference(q, k, v, window=window, q_pos=q_pos, k_pos=k_pos), torch.bfloat16)
