"""The paged decode kernel (kernels/paged_decoding.py) against its reference, and the reference against plain
attention over each sequence's keys laid out contiguously.

Without a GPU the kernel runs in Triton's CPU interpreter (the `interpret_without_gpu` fixture of
tests/conftest.py turns it on for this module's tests only), over 16-slot blocks.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
import kernels  # noqa: E402
from kernels.reference import attention_reference, paged_attention_reference  # noqa: E402

pytestmark = pytest.mark.usefixtures("interpret_without_gpu")  # the CPU interpreter, for this module only

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
BS = 16


def paged_cache(lengths, Hkv, D, dtype, *, shared_prefix_blocks=0, dropped=(), seed=0):
    """Sequences of the given lengths scattered into a pool of shuffled blocks.

    Returns (k_pool, v_pool, tables, contiguous [(k, v)] per sequence). Sequences after the first share its
    first `shared_prefix_blocks` physical blocks (and so its keys there); `dropped` is (sequence, logical
    block) entries set to 0, as a sliding window releases them.
    """
    g = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-n // BS) for n in lengths)
    n_blocks = 1 + sum(-(-n // BS) for n in lengths)
    order = (torch.randperm(n_blocks - 1, generator=g) + 1).tolist()  # block 0 is the null block
    k_pool = torch.randn(Hkv, n_blocks * BS, D, generator=g)
    v_pool = torch.randn(Hkv, n_blocks * BS, D, generator=g)
    tables = torch.zeros(len(lengths), max_blocks, dtype=torch.long)
    for r, n in enumerate(lengths):
        for i in range(-(-n // BS)):
            tables[r, i] = tables[0, i] if r > 0 and i < shared_prefix_blocks else order.pop()
    contiguous = []
    for r, n in enumerate(lengths):
        slots = (tables[r, torch.arange(n) // BS] * BS + torch.arange(n) % BS)
        contiguous.append((k_pool[:, slots], v_pool[:, slots]))  # (Hkv, n, D) each
    for r, i in dropped:
        tables[r, i] = 0
    to = lambda t: t.to(dtype).to(DEVICE)  # noqa: E731
    return to(k_pool), to(v_pool), tables.to(DEVICE), [(to(k), to(v)) for k, v in contiguous]


CASES = [
    # lengths, Hq, Hkv, D, window, shared prefix blocks
    ([37, 5, 64], 4, 4, 32, None, 0),  # GQA 1, ragged last blocks
    ([70, 70, 33], 8, 2, 64, None, 2),  # GQA 4, a shared prefix
    ([50, 81], 4, 1, 16, 20, 0),  # a window across block edges
    ([16, 17, 1], 2, 2, 128, 9, 0),  # exact block, one past it, a lone token
]


def _queries(lengths, Hq, D, dtype, seed=1):
    """One decode query per sequence at its last position, plus two chunk-like queries inside sequence 0."""
    g = torch.Generator().manual_seed(seed)
    rows = list(range(len(lengths))) + [0, 0]
    q_pos = [n - 1 for n in lengths] + [max(lengths[0] - 9, 0), lengths[0] // 2]
    q = torch.randn(len(rows), Hq, D, generator=g).to(dtype).to(DEVICE)
    return q, torch.tensor(rows, device=DEVICE), torch.tensor(q_pos, device=DEVICE)


@pytest.mark.parametrize("lengths, Hq, Hkv, D, window, shared", CASES)
def test_reference_equals_attention_over_each_sequence_laid_out_contiguously(lengths, Hq, Hkv, D, window, shared):
    k_pool, v_pool, tables, contiguous = paged_cache(lengths, Hkv, D, torch.float32, shared_prefix_blocks=shared)
    q, rows, q_pos = _queries(lengths, Hq, D, torch.float32)
    got = paged_attention_reference(q, k_pool, v_pool, tables, rows, q_pos, block_size=BS, window=window)
    for n in range(q.shape[0]):
        k, v = contiguous[int(rows[n])]
        want = attention_reference(q[n][None, :, None], k[None], v[None], window=window,
                                   q_pos=q_pos[n].view(1, 1), k_pos=torch.arange(k.shape[1], device=DEVICE)[None])
        torch.testing.assert_close(got[n], want[0, :, 0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lengths, Hq, Hkv, D, window, shared", CASES)
def test_kernel_equals_reference(lengths, Hq, Hkv, D, window, shared, dtype):
    k_pool, v_pool, tables, _ = paged_cache(lengths, Hkv, D, dtype, shared_prefix_blocks=shared)
    q, rows, q_pos = _queries(lengths, Hq, D, dtype)
    got = kernels.paged_attention(q, k_pool, v_pool, tables, rows, q_pos, block_size=BS, window=window)
    want = paged_attention_reference(q, k_pool, v_pool, tables, rows, q_pos, block_size=BS, window=window)
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])


def test_blocks_not_held_are_skipped_and_nothing_visible_gives_zeros():
    lengths = [60, 40]
    k_pool, v_pool, tables, _ = paged_cache(lengths, 2, 32, torch.float32, dropped=[(0, 0), (0, 1), (1, 2)])
    q, rows, q_pos = _queries(lengths, 4, 32, torch.float32)
    got = kernels.paged_attention(q, k_pool, v_pool, tables, rows, q_pos, block_size=BS)
    want = paged_attention_reference(q, k_pool, v_pool, tables, rows, q_pos, block_size=BS)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    empty = kernels.paged_attention(q[:1], k_pool, v_pool, tables, rows[:1], torch.tensor([20], device=DEVICE),
                                         block_size=BS)  # positions 0..20 of sequence 0: blocks 0, 1 dropped
    assert torch.equal(empty, torch.zeros_like(empty))


def test_bad_inputs_are_refused():
    k_pool, v_pool, tables, _ = paged_cache([20], 2, 32, torch.float32)
    q, rows, q_pos = _queries([20], 4, 32, torch.float32)
    with pytest.raises(ValueError, match="block size must be powers of two"):
        kernels.paged_attention(q, k_pool, v_pool, tables, rows, q_pos, block_size=8)
    with pytest.raises(ValueError, match=r"rows \[N\], q_pos \[N\]"):
        kernels.paged_attention(q, k_pool, v_pool, tables, rows[:1], q_pos, block_size=BS)
    with pytest.raises(ValueError, match="integer"):
        kernels.paged_attention(q, k_pool, v_pool, tables.float(), rows, q_pos, block_size=BS)
