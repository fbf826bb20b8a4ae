"""`python -m kernels.bench --kernel int8|int4`: the dequantize-matmuls on the 7B Mistral's linear layers.

For each layer shape (O, I) and number of rows M it prints the Triton kernel's time and, against the
bf16 `F.linear` of the same shape and torch's own int8 / int4 weight-only matmuls where this build has
them (`torch._weight_int8pack_mm`, per channel only; `torch._weight_int4pack_mm`, tinygemm's layout):
- decode rows (M = 1, 8): time from a CUDA graph over rotating weight sets (no launch overhead, weights
  read from memory, not L2), GB/s of weight bytes (q + scales + offsets) / time, and that as % of the
  measured copy bandwidth;
- prefill rows (M = 512, 2048): median time, TFLOP/s (2 M O I) and % of the measured bf16 matmul rate.
Each baseline's output is checked once against `kernels.reference` (a layout mix-up would show there,
not as a speedup); a baseline that cannot run shows as '-'.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from kernels.reference import dequantize_int4, dequantize_int8, unpack_int4

QUANT_SHAPES = [(4096, 4096, "q/o"), (1024, 4096, "k/v"), (14336, 4096, "gate/up"), (4096, 14336, "down"),
                (32000, 4096, "lm_head")]  # (O, I, what) of Mistral-7B
DECODE_ROWS, PREFILL_ROWS = (1, 8), (512, 2048)
ROTATE_BYTES = 2**28  # rotate >= 256 MB of weights in the decode graphs: more than any L2


def quant_weight_bytes(O: int, I: int, bits: int, group_size: int | None) -> int:
    """Bytes a decode step reads for one layer's weight: the integers, the fp16 scales (and int4 offsets)."""
    g = I if group_size is None else group_size
    return O * I * bits // 8 + (O * (I // g) * 2) * (1 if bits == 8 else 2)


def _quantized(O: int, I: int, bits: int, g: int | None) -> tuple:
    """Random weights in komt's format on the GPU: (weight, scales[, offsets], group_size)."""
    n_groups = I // (g or I)
    scales = (torch.rand(O, n_groups, device="cuda") / (100 * I**0.5)).half()
    if bits == 8:
        return torch.randint(-127, 128, (O, I), dtype=torch.int8, device="cuda"), scales, g
    packed = torch.randint(0, 256, (O, I // 2), dtype=torch.uint8, device="cuda")
    return packed, scales, (-8 * scales.float()).half(), g


def _dense(bits: int, weights: tuple) -> torch.Tensor:
    return (dequantize_int8 if bits == 8 else dequantize_int4)(*weights)


def _torch_baseline(bits: int, weights: tuple):
    """torch's weight-only matmul on the same weights, as fn(x), or None where this build has none."""
    try:
        if bits == 8:
            q, scales, g = weights
            if g is not None:
                return None  # _weight_int8pack_mm takes one scale per channel only
            s = scales[:, 0].to(torch.bfloat16)
            return lambda x: torch._weight_int8pack_mm(x, q, s)
        packed, scales, offsets, g = weights
        q = unpack_int4(packed).to(torch.int32)  # (O, I)
        tinygemm_in = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)  # torch pairs (2j high, 2j + 1 low)
        tiles = torch._convert_weight_to_int4pack(tinygemm_in, 8)
        zeros = offsets.float() + 8 * scales.float()  # tinygemm computes (q - 8) * scale + zero
        scale_zero = torch.stack([scales.float().T, zeros.T], dim=-1).to(torch.bfloat16).contiguous()  # (I/g, O, 2)
        return lambda x: torch._weight_int4pack_mm(x, tiles, g, scale_zero)
    except (RuntimeError, AttributeError, TypeError) as err:  # not in this build, or not on this GPU
        print(f"  (torch int{bits} baseline unavailable: {str(err).splitlines()[0][:100]})", file=sys.stderr)
        return None


def _checked(fn, x: torch.Tensor, dense: torch.Tensor, name: str):
    """fn if its output matches x @ dense^T within bf16 tolerance, else None (and say so)."""
    if fn is None:
        return None
    try:
        want = x.float() @ dense.T
        err = ((fn(x).float() - want).norm() / want.norm()).item()
    except (RuntimeError, torch.OutOfMemoryError) as e:
        print(f"  ({name} baseline skipped: {str(e).splitlines()[0][:100]})", file=sys.stderr)
        return None
    if err > 2e-2:
        print(f"  ({name} baseline skipped: relative error {err:.3f} against the reference)", file=sys.stderr)
        return None
    return fn


def _try_graph(fns: list) -> float | None:
    """time_graph_ms for a baseline; one that cannot be captured shows as '-'."""
    from kernels._peaks import time_graph_ms

    try:
        return time_graph_ms(fns)
    except (RuntimeError, torch.OutOfMemoryError) as err:
        print(f"  (baseline skipped: {str(err).splitlines()[0][:100]})", file=sys.stderr)
        return None


def bench_quant(peaks, quick: bool, bits: int, group_size: int | None) -> list[dict]:
    import kernels
    from kernels._peaks import time_graph_ms, time_ms
    from kernels.bench import _fmt, _print_table, _try_time

    matmul = kernels.int8_matmul if bits == 8 else kernels.int4_matmul
    shapes = [QUANT_SHAPES[0], QUANT_SHAPES[2]] if quick else QUANT_SHAPES
    rows_list = (DECODE_ROWS[:1] + PREFILL_ROWS[:1]) if quick else DECODE_ROWS + PREFILL_ROWS
    decode_rows, prefill_rows, results = [], [], []
    for O, I, what in shapes:
        wbytes = quant_weight_bytes(O, I, bits, group_size)
        n_sets = max(2, min(16, -(-ROTATE_BYTES // wbytes)))
        sets = [_quantized(O, I, bits, group_size) for _ in range(n_sets)]
        dense = _dense(bits, sets[0])  # (O, I) fp32, what the reference computes with
        n_dense = max(1, -(-ROTATE_BYTES // (2 * O * I)))  # bf16 weights rotated past L2 the same way
        dense_sets = [dense.to(torch.bfloat16)] + [
            torch.randn(O, I, device="cuda", dtype=torch.bfloat16) for _ in range(n_dense - 1)
        ]
        first = _torch_baseline(bits, sets[0])
        torch_sets = [] if first is None else [first] + [_torch_baseline(bits, s) for s in sets[1:]]
        for M in rows_list:
            x = torch.randn(M, I, device="cuda", dtype=torch.bfloat16)
            theirs = _checked(first, x, dense, f"torch int{bits}")
            shape = f"{what} {O}x{I} M{M}"
            if M in DECODE_ROWS:
                ms = time_graph_ms([lambda s=s: matmul(x, *s) for s in sets])
                bf16 = time_graph_ms([lambda w=w: F.linear(x, w) for w in dense_sets])
                torch_ms = None if theirs is None else _try_graph([lambda f=f: f(x) for f in torch_sets])
                gbps = wbytes / ms / 1e6
                decode_rows.append([shape, _fmt(ms), f"{gbps:.0f}", f"{100 * gbps / peaks.copy_gbps:.0f}%",
                                    _fmt(bf16), _fmt(torch_ms), f"{bf16 / ms:.2f}x"])
            else:
                ms = time_ms(lambda: matmul(x, *sets[0]))
                bf16 = time_ms(lambda: F.linear(x, dense_sets[0]))
                torch_ms = None if theirs is None else _try_time(lambda: theirs(x))
                tflops = 2 * M * O * I / ms / 1e9
                prefill_rows.append([shape, _fmt(ms), f"{tflops:.0f}", f"{100 * tflops / peaks.matmul_tflops:.0f}%",
                                     _fmt(bf16), _fmt(torch_ms), f"{bf16 / ms:.2f}x"])
            results.append(dict(kernel=f"int{bits}", shape=shape, triton=ms, baseline=bf16))
        del sets, dense, dense_sets, torch_sets
        torch.cuda.empty_cache()
    g = "per channel" if group_size is None else f"g={group_size}"
    _print_table(f"int{bits} ({g}) dequantize-GEMV, bf16 x, decode rows (graph ms: CUDA-graph replay over rotating "
                 "weights, for every column; GB/s = weight bytes read / time)",
                 ["shape", "graph ms", "GB/s", "% copy", "bf16 linear ms", f"torch int{bits} ms", "vs bf16"],
                 decode_rows)
    _print_table(f"int{bits} ({g}) dequantize-GEMM, bf16 x, prefill rows (TFLOP/s = 2 M O I / time)",
                 ["shape", "triton ms", "TFLOP/s", "% mm peak", "bf16 linear ms", f"torch int{bits} ms", "vs bf16"],
                 prefill_rows)
    return results
