"""Benchmark of the Triton kernels against PyTorch: `python -m kernels.bench [--kernel K] [--plot F] [--quick]`.

Prints one table per kernel: the shape, the Triton kernel's median time, what it achieves (GB/s for the
memory-bound RMSNorm and decode, TFLOP/s for prefill), that as a percentage of this GPU's measured peak
(`kernels._peaks`), and the times of the PyTorch baselines with the speedup over the best of them.
`--kernel int8|int4` (with `--group-size`) runs the dequantize-matmuls (`kernels.bench_quant`); they are
not part of `all`, each being a table per format and group size.
Needs a CUDA GPU: without one it says so on stderr and exits with status 2 (the kernels' correctness
tests run on the CPU under TRITON_INTERPRET=1: `pytest tests/test_kernels_*.py`).
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels.reference import attention_reference, rms_norm_reference

RMS_SHAPES = [(4096, 4096), (16384, 4096), (65536, 4096), (16384, 8192)]
PREFILL_SHAPES = [(2, 32, 8, T, 128) for T in (1024, 2048, 4096, 8192)] + [(4, 32, 8, 4096, 64)]  # B, Hq, Hkv, T, D
WINDOW_SHAPES = [(1, 32, 8, T, 128, 4096) for T in (4096, 8192, 16384)]  # B, Hq, Hkv, T, D, W
DECODE_SHAPES = [(1, 32, 8, 16384, 128, None), (8, 32, 8, 16384, 128, None), (1, 32, 8, 65536, 128, None),
                 (8, 32, 8, 4096, 128, None), (1, 32, 8, 16384, 128, 4096)]  # B, Hq, Hkv, S, D, W


def visible_pairs(T: int, S: int, causal: bool, window: int | None) -> int:
    """(query, key) pairs that attention computes: query t at position S - T + t (closed form per row)."""
    total = 0
    for i in range(S - T, S):
        hi = min(i + 1, S) if causal else S
        lo = max(i - window + 1, 0) if window is not None else 0
        total += max(hi - lo, 0)
    return total


def _print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    print(f"\n## {title}")
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))


def _fmt(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.3f}"


def _try_time(fn) -> float | None:
    """Time a baseline; a baseline that cannot run this shape (out of memory, unsupported) shows as '-'."""
    from kernels._peaks import time_ms

    try:
        return time_ms(fn)
    except (RuntimeError, torch.OutOfMemoryError) as err:  # a baseline's failure is a data point, not a crash
        print(f"  (baseline skipped: {str(err).splitlines()[0][:100]})", file=sys.stderr)
        torch.cuda.empty_cache()
        return None


def bench_rms_norm(peaks, quick: bool) -> list[dict]:
    import kernels
    from kernels._peaks import host_us, time_ms

    compiled = torch.compile(rms_norm_reference, dynamic=False)
    rows, results = [], []
    for M, D in RMS_SHAPES[1:2] if quick else RMS_SHAPES:
        x = torch.randn(M, D, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(D, device="cuda", dtype=torch.bfloat16)
        ms = time_ms(lambda: kernels.rms_norm(x, w, 1e-5))
        host = host_us(lambda: kernels.rms_norm(x, w, 1e-5))
        eager = time_ms(lambda: rms_norm_reference(x, w, 1e-5))
        comp = _try_time(lambda: compiled(x, w, 1e-5))
        gbps = (2 * M * D + D) * 2 / ms / 1e6
        best = min(t for t in (eager, comp) if t is not None)
        rows.append([f"{M}x{D} bf16", _fmt(ms), f"{host:.0f}", f"{gbps:.0f}", f"{100 * gbps / peaks.copy_gbps:.0f}%",
                     _fmt(eager), _fmt(comp), f"{best / ms:.2f}x"])
        results.append(dict(kernel="rms_norm", shape=f"{M}x{D}", triton=ms, baseline=best))
    _print_table("RMSNorm forward (bf16 rows; GB/s = bytes read + written / time)",
                 ["shape", "triton ms", "host us", "GB/s", "% copy", "eager ms", "compile ms", "vs best"], rows)
    return results


def _sdpa_flash(q, k, v, causal=True):
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def bench_prefill(peaks, quick: bool) -> list[dict]:
    import kernels
    from kernels._peaks import host_us, time_ms

    rows, results = [], []
    shapes = [PREFILL_SHAPES[1], PREFILL_SHAPES[3]] if quick else PREFILL_SHAPES
    for B, Hq, Hkv, T, D in shapes:
        q = torch.randn(B, Hq, T, D, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        ke, ve = (t.repeat_interleave(Hq // Hkv, dim=1) for t in (k, v))  # SDPA's flash kernel wants Hq == Hkv
        ms = time_ms(lambda: kernels.attention(q, k, v))
        host = host_us(lambda: kernels.attention(q, k, v), calls=20)
        sdpa = _try_time(lambda: _sdpa_flash(q, ke, ve))
        eager = _try_time(lambda: attention_reference(q, k, v)) if T <= 2048 else None
        tflops = 4 * D * visible_pairs(T, T, True, None) * B * Hq / ms / 1e9
        rows.append([f"B{B} H{Hq}/{Hkv} T{T} D{D}", _fmt(ms), f"{host:.0f}", f"{tflops:.0f}", f"{100 * tflops / peaks.matmul_tflops:.0f}%",
                     _fmt(sdpa), _fmt(eager), "-" if sdpa is None else f"{sdpa / ms:.2f}x"])
        results.append(dict(kernel="prefill", shape=f"T{T} D{D}", triton=ms, baseline=sdpa))
        del q, k, v, ke, ve
    _print_table("Causal prefill attention, bf16 (TFLOP/s over visible pairs, 4*D flops each)",
                 ["shape", "triton ms", "host us", "TFLOP/s", "% mm peak", "sdpa flash ms", "eager ms", "vs sdpa"], rows)
    return results


def bench_window(peaks, quick: bool) -> list[dict]:
    import kernels
    from kernels._peaks import time_ms
    from kernels.reference import attention_mask

    rows, results = [], []
    for B, Hq, Hkv, T, D, W in WINDOW_SHAPES:
        q = torch.randn(B, Hq, T, D, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        ke, ve = (t.repeat_interleave(Hq // Hkv, dim=1) for t in (k, v))
        ms = time_ms(lambda: kernels.attention(q, k, v, window=W))
        mask = attention_mask(T, T, window=W, device="cuda")
        masked = _try_time(lambda: F.scaled_dot_product_attention(q, ke, ve, attn_mask=mask))
        flash = _try_time(lambda: _sdpa_flash(q, ke, ve))
        tflops = 4 * D * visible_pairs(T, T, True, W) * B * Hq / ms / 1e9
        rows.append([f"T{T} W{W}", _fmt(ms), f"{1000 * ms / T:.3f}", f"{tflops:.0f}",
                     f"{100 * tflops / peaks.matmul_tflops:.0f}%", _fmt(masked), _fmt(flash),
                     "-" if masked is None else f"{masked / ms:.2f}x"])
        results.append(dict(kernel="window", shape=f"T{T} W{W}", triton=ms, baseline=masked))
        del q, k, v, ke, ve, mask
    _print_table("Sliding-window prefill, bf16, B1 H32/8 D128 (ms/1k tok should stay flat past W)",
                 ["shape", "triton ms", "ms/1k tok", "TFLOP/s", "% mm peak", "sdpa+mask ms", "sdpa causal ms", "vs mask"],
                 rows)
    return results


def bench_backward(peaks, quick: bool) -> list[dict]:
    """Forward + backward of causal attention (what a training step pays), against SDPA's flash backend."""
    import kernels
    from kernels._peaks import time_ms

    rows, results = [], []
    shapes = [PREFILL_SHAPES[1]] if quick else PREFILL_SHAPES[:3]
    for B, Hq, Hkv, T, D in shapes:
        q = torch.randn(B, Hq, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        dout = torch.randn_like(q)

        def triton_step():
            return torch.autograd.grad(kernels.attention(q, k, v), (q, k, v), dout)

        def sdpa_step():  # K/V repeated per query head inside the step, as a GQA model must do for it
            ke, ve = (t.repeat_interleave(Hq // Hkv, dim=1) for t in (k, v))
            return torch.autograd.grad(_sdpa_flash(q, ke, ve), (q, k, v), dout)

        ms = time_ms(triton_step)
        sdpa = _try_time(sdpa_step)
        tflops = 4 * 3.5 * D * visible_pairs(T, T, True, None) * B * Hq / ms / 1e9  # fwd 2 dots, bwd 5: 3.5x fwd
        rows.append([f"B{B} H{Hq}/{Hkv} T{T} D{D}", _fmt(ms), f"{tflops:.0f}", f"{100 * tflops / peaks.matmul_tflops:.0f}%",
                     _fmt(sdpa), "-" if sdpa is None else f"{sdpa / ms:.2f}x"])
        results.append(dict(kernel="fwd+bwd", shape=f"T{T} D{D}", triton=ms, baseline=sdpa))
        del q, k, v, dout
    _print_table("Causal attention forward + backward, bf16 (TFLOP/s counts 7 dots of 2*D flops per visible pair)",
                 ["shape", "triton ms", "TFLOP/s", "% mm peak", "sdpa flash ms", "vs sdpa"], rows)
    return results


def bench_decode(peaks, quick: bool) -> list[dict]:
    import kernels
    from kernels._peaks import host_us, time_graph_ms, time_ms

    compiled = torch.compile(attention_reference, dynamic=False)
    rows, results = [], []
    for B, Hq, Hkv, S, D, W in DECODE_SHAPES[:2] if quick else DECODE_SHAPES:
        kv_bytes = 2 * B * Hkv * S * D * 2
        n_sets = max(1, min(4, -(-4 * 2**28 // kv_bytes)))  # rotate >= 1 GiB of K/V (or 4 sets) past L2
        sets = [(torch.randn(B, Hq, 1, D, device="cuda", dtype=torch.bfloat16),
                 *(torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(2)))
                for _ in range(n_sets)]
        q, k, v = sets[0]
        kw, vw = (k, v) if W is None else (k[:, :, -W:], v[:, :, -W:])  # SDPA on the visible keys only
        ms = time_ms(lambda: kernels.attention(q, k, v, window=W))
        host = host_us(lambda: kernels.attention(q, k, v, window=W))
        graph = time_graph_ms([lambda s=s: kernels.attention(*s, window=W) for s in sets])
        sdpa = _try_time(lambda: F.scaled_dot_product_attention(q, kw, vw, enable_gqa=True))
        sdpa_graph = time_graph_ms([
            lambda s=s: F.scaled_dot_product_attention(
                s[0], s[1] if W is None else s[1][:, :, -W:], s[2] if W is None else s[2][:, :, -W:], enable_gqa=True)
            for s in sets])
        eager = _try_time(lambda: attention_reference(q, k, v, window=W))
        comp = _try_time(lambda: compiled(q, k, v, window=W))
        keys = S if W is None else min(S, W)
        moved = (2 * B * Hkv * keys * D + 2 * B * Hq * D) * 2
        gbps, graph_gbps = moved / ms / 1e6, moved / graph / 1e6
        rows.append([f"B{B} S{S}" + ("" if W is None else f" W{W}"), _fmt(ms), f"{host:.0f}", f"{gbps:.0f}",
                     _fmt(graph), f"{100 * graph_gbps / peaks.copy_gbps:.0f}%", _fmt(sdpa), _fmt(sdpa_graph),
                     _fmt(eager), _fmt(comp), "-" if sdpa is None else f"{sdpa / ms:.2f}x", f"{sdpa_graph / graph:.2f}x"])
        results.append(dict(kernel="decode", shape=f"B{B} S{S}", triton=ms, baseline=sdpa))
        del q, k, v, kw, vw, sets
    _print_table("Decode attention (T=1), bf16, H32/8 D128 (GB/s = K/V bytes read / time; graph = CUDA-graph replay, "
                 "no launch overhead)",
                 ["shape", "triton ms", "host us", "GB/s", "graph ms", "graph % copy", "sdpa ms", "sdpa graph ms",
                  "eager ms", "compile ms", "vs sdpa", "graph vs sdpa"], rows)
    return results


PAGED_SHAPES = [(1, 32, 8, 4096, 128), (8, 32, 8, 4096, 128), (32, 32, 8, 2048, 128), (8, 32, 8, 16384, 128)]
PAGED_BLOCK = 16  # tokens per KV block (komt.serve's default)


def bench_paged(peaks, quick: bool) -> list[dict]:
    """Decode over a block-paged cache: the Triton kernel reading block tables, against the torch path (gather
    each row's blocks, then SDPA with a mask: what komt.generate.paged_cache does) and against flash-decoding
    over the same keys stored contiguously (what paging costs)."""
    import kernels
    from kernels._peaks import time_ms

    rows, results = [], []
    for B, Hq, Hkv, S, D in PAGED_SHAPES[:2] if quick else PAGED_SHAPES:
        n_blocks = B * S // PAGED_BLOCK + 1
        k_pool, v_pool = (torch.randn(Hkv, n_blocks * PAGED_BLOCK, D, device="cuda", dtype=torch.bfloat16)
                          for _ in range(2))
        tables = (torch.randperm(n_blocks - 1, device="cuda")[: B * S // PAGED_BLOCK] + 1).view(B, -1)  # shuffled
        rows_ = torch.arange(B, device="cuda")
        q_pos = torch.full((B,), S - 1, device="cuda")
        q = torch.randn(B, Hq, D, device="cuda", dtype=torch.bfloat16)
        slots = (tables[:, :, None] * PAGED_BLOCK + torch.arange(PAGED_BLOCK, device="cuda")).view(B, S)

        def gather_sdpa():
            # (Hkv, B*S, D) -> (Hkv, B, S, D) -> (B, Hkv, S, D)
            k = k_pool.index_select(1, slots.flatten()).view(Hkv, B, S, D).transpose(0, 1)
            v = v_pool.index_select(1, slots.flatten()).view(Hkv, B, S, D).transpose(0, 1)
            return F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)

        kc = k_pool.index_select(1, slots.flatten()).view(Hkv, B, S, D).transpose(0, 1).contiguous()
        vc = v_pool.index_select(1, slots.flatten()).view(Hkv, B, S, D).transpose(0, 1).contiguous()
        ms = time_ms(lambda: kernels.paged_attention(q, k_pool, v_pool, tables, rows_, q_pos, block_size=PAGED_BLOCK))
        gathered = _try_time(gather_sdpa)
        contiguous = _try_time(lambda: kernels.attention(q[:, :, None], kc, vc))
        moved = (2 * B * Hkv * S * D + 2 * B * Hq * D) * 2
        gbps = moved / ms / 1e6
        rows.append([f"B{B} S{S}", _fmt(ms), f"{gbps:.0f}", f"{100 * gbps / peaks.copy_gbps:.0f}%", _fmt(gathered),
                     _fmt(contiguous), "-" if gathered is None else f"{gathered / ms:.2f}x",
                     "-" if contiguous is None else f"{contiguous / ms:.2f}x"])
        results.append(dict(kernel="paged", shape=f"B{B} S{S}", triton=ms, baseline=gathered))
        del k_pool, v_pool, kc, vc
    _print_table(f"Paged decode attention, bf16, H32/8 D128, blocks of {PAGED_BLOCK} (GB/s = K/V bytes read / time)",
                 ["shape", "triton ms", "GB/s", "% copy", "gather+sdpa ms", "contiguous flash-dec ms",
                  "vs gather", "vs contiguous"], rows)
    return results


def plot(results: list[dict], path: str) -> None:
    """Bar chart of the speedup of each Triton kernel over its best baseline, one bar per shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in results if r["baseline"]]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(shown)), 4))
    ax.bar(range(len(shown)), [r["baseline"] / r["triton"] for r in shown])
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(shown)), [f"{r['kernel']}\n{r['shape']}" for r in shown], rotation=60, fontsize=7)
    ax.set_ylabel("speedup over the best PyTorch baseline")
    fig.tight_layout()
    fig.savefig(path)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", default="all",
                        choices=["rms_norm", "attention", "backward", "decode", "paged", "int8", "int4", "all"])
    parser.add_argument("--group-size", type=int, metavar="G",
                        help="int8/int4: inputs per scale (int8 default: per channel; int4 default: 32)")
    parser.add_argument("--plot", metavar="FILE.png", help="also save a speedup chart (needs matplotlib)")
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    parser.add_argument("--tune", action="store_true", help="sweep block sizes first and print the best (slow)")
    args = parser.parse_args(argv)
    if args.group_size is not None and args.kernel not in ("int8", "int4"):
        parser.error("--group-size goes with --kernel int8 or int4")
    if args.group_size is not None and (args.group_size < 1 or 2048 % args.group_size
                                        or args.group_size % (16 if args.kernel == "int8" else 32)):
        parser.error(f"--group-size must divide 2048 (every I of the benchmark's shapes) and be a multiple of "
                     f"{16 if args.kernel == 'int8' else 32} for {args.kernel}, got {args.group_size}")
    if not torch.cuda.is_available():
        print("error: kernels.bench needs a CUDA GPU and PyTorch sees none; the kernels' tests run on the CPU "
              "with TRITON_INTERPRET=1: pytest tests/test_kernels_*.py", file=sys.stderr)
        return 2
    from kernels._peaks import measure_peaks

    peaks = measure_peaks(torch.device("cuda"))
    print(f"# {peaks.device_name}: measured copy {peaks.copy_gbps:.0f} GB/s (read + write), "
          f"bf16 matmul {peaks.matmul_tflops:.0f} TFLOP/s; torch {torch.__version__}")
    bits = {"int8": 8, "int4": 4}.get(args.kernel)
    group_size = args.group_size if args.group_size is not None or bits == 8 else 32
    if args.tune:
        from kernels._tune import tune, tune_quant

        if bits:
            tune_quant(bits, group_size)
        else:
            tune()
    results = []
    if args.kernel in ("rms_norm", "all"):
        results += bench_rms_norm(peaks, args.quick)
    if args.kernel in ("attention", "all"):
        results += bench_prefill(peaks, args.quick)
        results += bench_window(peaks, args.quick)
    if args.kernel in ("backward", "all"):
        results += bench_backward(peaks, args.quick)
    if args.kernel in ("decode", "all"):
        results += bench_decode(peaks, args.quick)
    if args.kernel in ("paged", "all"):
        results += bench_paged(peaks, args.quick)
    if bits:
        from kernels.bench_quant import bench_quant

        results += bench_quant(peaks, args.quick, bits, group_size)
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
