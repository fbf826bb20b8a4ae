"""What the int8 and int4 dequantize-matmuls share: the tiling chosen by M, the K split, the checks, the launch.

Both kernels (`kernels.int8_matmul` in dequant_matmul_int8.py, `kernels.int4_matmul` in
dequant_matmul_int4.py) compute y [M, O] = x [M, I] W^T for a weight stored as small integers plus fp16
scales per group of g inputs, each in one Triton kernel with two tilings:

- decode (M <= DECODE_ROWS, a dequantize-GEMV): BLOCK_M = 16 covers every row in one MMA tile (rows past
  M are masked), long K steps (up to 256 bytes of weight per row) and BLOCK_N so that a step loads at
  least 16 bytes of weight per thread (64..128 channels). The kernel is bound by the
  weight bytes it reads, so what matters is having enough loads in flight on every multiprocessor: when
  the O tiles alone give fewer than PROGRAMS_PER_SM programs per SM (the 4096-wide o_proj gives 64
  programs for 132 SMs), K is split across programs as well.
- prefill (M > DECODE_ROWS, a dequantize-GEMM): 128 x 128 output tiles, K steps of 64 inputs (int8) or
  32 bytes (int4): bound by the MMA like any GEMM; K is split only when the output tiles do not fill
  one wave of the SMs (a small M on a narrow k/v projection).
fp32 x takes smaller tiles (its IEEE fp32 dots run on the FMA units and hold more registers: the bf16
tile sizes spill there, as compiling for sm_90 shows).

A K step never straddles a scale group: BLOCK_K divides the group (in the kernel's own units along K:
inputs for int8, bytes for int4), so each step reads one scale (and offset) per output channel.
Split programs write fp32 partials [n_splits, M, O] that one torch sum reduces: two passes, no
atomics, so the result does not depend on the order in which programs finish.

The block sizes are first choices, not yet swept on a GPU (`python -m kernels.bench --kernel int8|int4
--tune` does that sweep); `config=` on the launchers overrides them.
"""

from __future__ import annotations

import torch

from kernels._launch import cdiv, interpreting, sm_count

DECODE_ROWS = 16  # up to this many rows of x take the decode tiling (one 16-row MMA tile holds them all)
PROGRAMS_PER_SM = 4  # the decode tiling splits K until about this many programs run per multiprocessor
MAX_ELEMENTS = 2**31  # the kernels index with int32 offsets


def largest_block(group_k: int | None, cap: int) -> int:
    """The largest power of two <= cap that divides group_k (cap itself per channel, group_k None)."""
    block = cap
    while group_k is not None and group_k % block:
        block //= 2
    return block


def launch_config(M: int, O: int, K: int, group_k: int | None, dtype: torch.dtype, device: torch.device,
                  k_caps: dict) -> dict:
    """Block sizes, K split and launch options for M rows, O channels and K units along K.

    group_k: the group size in K units (None: per channel). k_caps: the largest BLOCK_K of each tiling
    ("decode", "prefill", and the same for fp32 x, whose IEEE dots hold more registers), in K units.
    """
    decode = M <= DECODE_ROWS
    fp32 = dtype == torch.float32
    if device.type != "cuda":  # the interpreter: small blocks, so the tests' shapes span several of them
        cfg = dict(BLOCK_M=16 if decode else 32, BLOCK_N=16 if decode else 32, num_warps=1, num_stages=1)
        cfg["BLOCK_K"] = largest_block(group_k, 16)
    elif decode:
        cfg = dict(BLOCK_M=16, num_warps=4, num_stages=3 if fp32 else 4)
        cfg["BLOCK_K"] = largest_block(group_k, k_caps["decode_fp32" if fp32 else "decode"])
        # at least 16 bytes of weight per thread and step (2048 for 4 warps), so loads are 16-byte vectors
        cfg["BLOCK_N"] = 32 if fp32 else max(64, 2048 // cfg["BLOCK_K"])
    else:
        cfg = dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=2) if fp32 else \
            dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)
        cfg["BLOCK_K"] = largest_block(group_k, k_caps["prefill_fp32" if fp32 else "prefill"])
    tiles = cdiv(M, cfg["BLOCK_M"]) * cdiv(O, cfg["BLOCK_N"])
    target = (PROGRAMS_PER_SM if decode else 1) * sm_count(device)
    cfg["n_splits"] = max(1, min(cdiv(target, tiles), cdiv(K, cfg["BLOCK_K"])))
    return cfg


def split_k(K: int, block_k: int, n_splits: int) -> tuple[int, int]:
    """(n_splits, split_len): K cut into at most n_splits runs of whole BLOCK_K steps, none of them empty."""
    steps = cdiv(K, block_k)
    split_len = cdiv(steps, max(1, min(n_splits, steps))) * block_k
    return cdiv(K, split_len), split_len


def check_inputs(fmt: str, x: torch.Tensor, I: int, **stored: torch.Tensor) -> torch.device:
    """x a fp16/bf16/fp32 [..., I] tensor; the stored tensors frozen, unit stride along I, int32-indexable."""
    from kernels._launch import check_device
    from kernels.reference import check_matmul_input

    check_matmul_input(x, I, fmt)
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"{fmt}: x must be fp16, bf16 or fp32, got {x.dtype}")
    device = check_device(fmt, x=x, **stored)
    for name, t in stored.items():
        if t.stride(-1) != 1 and t.shape[-1] != 1:
            raise ValueError(f"{fmt}: {name} must have unit stride along its last dim, got strides {t.stride()} "
                             "(call .contiguous() once when loading it)")
        if t.requires_grad:
            raise ValueError(f"{fmt}: {name} requires grad; the kernels differentiate x only (the weight is frozen)")
        if t.numel() >= MAX_ELEMENTS:
            raise ValueError(f"{fmt}: {name} has {t.numel()} elements; the kernels index with int32 (< 2^31)")
    if x.numel() >= MAX_ELEMENTS:
        raise ValueError(f"{fmt}: x has {x.numel()} elements; the kernels index with int32 (< 2^31)")
    return device


def launch_tiled(launch, x: torch.Tensor, O: int, K: int, group_k: int | None, k_caps: dict,
                 config: dict | None) -> torch.Tensor:
    """Run `launch(x2, y, grid, split_len, EXACT_DOT, cfg)` over the rows of x [..., I]; return y [..., O].

    `launch` is the format's kernel call; this picks the tiling (or takes `config`), allocates the
    output (fp32 partials when K is split) and reduces the partials.
    """
    I = x.shape[-1]
    x2 = x.reshape(-1, I)  # (..., I) -> (M, I)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    out_shape = (*x.shape[:-1], O)
    if M == 0 or O == 0:
        return x.new_empty(out_shape)
    cfg = dict(config or launch_config(M, O, K, group_k, x.dtype, x.device, k_caps))
    block_k = cfg["BLOCK_K"]
    if block_k < 16 or block_k & (block_k - 1) or (group_k is not None and group_k % block_k):
        raise ValueError(f"config BLOCK_K={block_k} must be a power of two >= 16 dividing the group ({group_k})")
    n_splits, split_len = split_k(K, block_k, cfg.pop("n_splits", 1))
    y = torch.empty((n_splits, M, O), dtype=x.dtype if n_splits == 1 else torch.float32, device=x.device)
    grid = (cdiv(M, cfg["BLOCK_M"]), cdiv(O, cfg["BLOCK_N"]), n_splits)
    launch(x2, y, grid, split_len, x.dtype == torch.float32 or interpreting(), cfg)
    y = y[0] if n_splits == 1 else y.sum(dim=0).to(x.dtype)  # (n_splits, M, O) -> (M, O)
    return y.view(out_shape)
