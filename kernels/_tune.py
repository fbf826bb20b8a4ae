"""Block-size sweep behind `python -m kernels.bench --tune`: prints each config's median time.

The winners are written into the `launch_config` functions by hand (and the sweep's output into
kernels/RESULTS.md), so nothing is tuned at run time and a launch never waits for an autotuner.
"""

from __future__ import annotations

import torch
import triton

from kernels._peaks import time_ms

PREFILL_CONFIGS = [  # BLOCK_M, BLOCK_N, num_warps, num_stages
    (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3),
    (128, 32, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3), (64, 64, 4, 4), (128, 32, 8, 4),
]
DECODE_CONFIGS = [(64, 4, 3), (128, 4, 3), (128, 8, 3), (256, 8, 2)]  # BLOCK_N, warps, stages
QUANT_GEMV_CONFIGS = [  # BLOCK_N, BLOCK_K (inputs for int8, bytes for int4; capped by the group), warps, stages
    (32, 256, 4, 4), (64, 256, 4, 4), (64, 128, 4, 4), (128, 128, 4, 4), (128, 64, 4, 4), (64, 256, 8, 4),
    (128, 128, 8, 3), (256, 64, 8, 4), (64, 128, 4, 2), (128, 32, 4, 6),
]
QUANT_GEMM_CONFIGS = [  # BLOCK_M, BLOCK_N, BLOCK_K, warps, stages
    (128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
    (256, 128, 64, 8, 3), (128, 128, 128, 8, 2), (64, 64, 64, 4, 4),
]


def _report(title: str, timings: dict) -> None:
    best = min(timings, key=timings.get)
    print(f"\n## tune: {title}")
    for cfg, ms in sorted(timings.items(), key=lambda kv: kv[1]):
        print(f"  {cfg}: {ms:.3f} ms{'  <- best' if cfg == best else ''}")


def tune_prefill(B: int, Hq: int, Hkv: int, T: int, D: int, window: int | None) -> None:
    from kernels.flash_attention import flash_attention

    q = torch.randn(B, Hq, T, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    timings = {}
    for bm, bn, warps, stages in PREFILL_CONFIGS:
        cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
        try:
            timings[(bm, bn, warps, stages)] = time_ms(lambda: flash_attention(q, k, v, window=window, config=cfg))
        except Exception as err:  # out of shared memory for this config: note it and go on  # noqa: BLE001
            print(f"  config {cfg} failed: {str(err).splitlines()[0][:80]}")
    _report(f"prefill B{B} H{Hq}/{Hkv} T{T} D{D} W{window} (BLOCK_M, BLOCK_N, warps, stages)", timings)


def tune_decode(B: int, S: int, window: int | None = None) -> None:
    from kernels._launch import sm_count
    from kernels.flash_decoding import flash_decoding

    q = torch.randn(B, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(B, 8, S, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    sms = sm_count(q.device)
    timings = {}
    for bn, warps, stages in DECODE_CONFIGS:
        for per_sm in (1, 2, 4):
            n_splits = triton.cdiv(per_sm * sms, B * 8)
            cfg = dict(BLOCK_N=bn, num_warps=warps, num_stages=stages)
            timings[(bn, warps, stages, f"{per_sm}/SM")] = time_ms(
                lambda: flash_decoding(q, k, v, window=window, n_splits=n_splits, config=cfg)
            )
    _report(f"decode B{B} S{S} W{window} (BLOCK_N, warps, stages, programs per SM)", timings)


def tune_rms_norm(M: int, D: int) -> None:
    from kernels.fused_rms_norm import _rms_norm_fwd_kernel

    x = torch.randn(M, D, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(D, device="cuda", dtype=torch.bfloat16)
    y, rstd = torch.empty_like(x), torch.empty(M, device="cuda")
    timings = {}
    for warps in (2, 4, 8, 16):
        def run():
            _rms_norm_fwd_kernel[(M,)](x, w, y, rstd, D, D, D, 1e-5, BLOCK_D=triton.next_power_of_2(D), num_warps=warps)
        timings[warps] = time_ms(run)
    _report(f"rms_norm {M}x{D} bf16 (num_warps)", timings)


def tune() -> None:
    tune_rms_norm(16384, 4096)
    tune_prefill(2, 32, 8, 4096, 128, None)
    tune_prefill(4, 32, 8, 4096, 64, None)
    tune_prefill(1, 32, 8, 8192, 128, 4096)
    tune_decode(1, 16384)
    tune_decode(8, 16384)


def tune_quant(bits: int, group_size: int | None) -> None:
    """The dequantize-matmul tilings on Mistral-7B shapes: GEMV configs x K splits at M = 1, GEMM configs
    at M = 2048 (decode timed from CUDA graphs over rotating weights, as the benchmark does)."""
    from kernels._launch import sm_count
    from kernels._peaks import time_graph_ms
    from kernels._quant import largest_block
    from kernels.bench_quant import ROTATE_BYTES, _quantized, quant_weight_bytes
    from kernels.dequant_matmul_int4 import int4_matmul_forward
    from kernels.dequant_matmul_int8 import int8_matmul_forward

    run = int8_matmul_forward if bits == 8 else int4_matmul_forward
    group_k = None if group_size is None else (group_size if bits == 8 else group_size // 2)
    sms = sm_count(torch.device("cuda"))
    name = f"int{bits} {'per channel' if group_size is None else f'g={group_size}'}"
    for O, I in ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)):
        n_sets = max(2, min(16, -(-ROTATE_BYTES // quant_weight_bytes(O, I, bits, group_size))))
        sets = [_quantized(O, I, bits, group_size) for _ in range(n_sets)]
        x = torch.randn(1, I, device="cuda", dtype=torch.bfloat16)
        timings = {}
        for bn, bk, warps, stages in QUANT_GEMV_CONFIGS:
            block_k = largest_block(group_k, bk)
            for per_sm in (1, 2, 4, 8):
                tiles = triton.cdiv(O, bn)
                cfg = dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
                           n_splits=max(1, triton.cdiv(per_sm * sms, tiles)))
                key = (bn, block_k, warps, stages, f"{per_sm}/SM")
                if key in timings:
                    continue
                try:
                    timings[key] = time_graph_ms([lambda s=s, cfg=cfg: run(x, *s, config=cfg) for s in sets])
                except Exception as err:  # out of registers / shared memory: note it and go on  # noqa: BLE001
                    print(f"  config {cfg} failed: {str(err).splitlines()[0][:80]}")
        _report(f"{name} GEMV M1 {O}x{I} (BLOCK_N, BLOCK_K, warps, stages, programs per SM)", timings)
        x = torch.randn(2048, I, device="cuda", dtype=torch.bfloat16)
        timings = {}
        for bm, bn, bk, warps, stages in QUANT_GEMM_CONFIGS:
            cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=largest_block(group_k, bk if bits == 8 else bk // 2),
                       num_warps=warps, num_stages=stages)
            try:
                timings[(bm, bn, cfg["BLOCK_K"], warps, stages)] = time_ms(lambda: run(x, *sets[0], config=cfg))
            except Exception as err:  # noqa: BLE001
                print(f"  config {cfg} failed: {str(err).splitlines()[0][:80]}")
        _report(f"{name} GEMM M2048 {O}x{I} (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)", timings)
        del sets
