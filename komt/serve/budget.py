"""How big the paged KV cache is, and whether one request fits in it, decided once at start.

The cache is sized from a budget, not from max batch x context: `--kv-cache-tokens N` says it in tokens;
otherwise `--kv-cache-fraction F` of the memory free after loading the model (default 0.9 on CUDA,
vLLM's `gpu_memory_utilization`; 0.25 of the available RAM on the CPU, which other processes share,
and there never more than max batch x the longest request). Requests take blocks as their tokens
arrive, so short answers hold little and the rest serves other requests and the prefix cache.

A server whose budget cannot hold one request of the longest allowed length is refused at start with
one line (a config claiming a 10^9-token context would otherwise ask for terabytes, or fail at the
first long prompt). With a sliding window a request holds at most the window plus one prefill chunk.
"""

from __future__ import annotations

import os

import torch

from komt.errors import ConfigError
from komt.generate.paged_cache import bytes_per_token
from komt.model.config import ModelConfig

CUDA_FRACTION, CPU_FRACTION = 0.9, 0.25


def request_blocks(n_tokens: int, block_size: int, window: int | None, chunk: int) -> int:
    """The most blocks one request of `n_tokens` positions holds at once, prefilling `chunk` tokens a step."""
    whole = -(-n_tokens // block_size)
    if window is None:
        return whole
    return min(whole, -(-(window - 1 + chunk) // block_size) + 1)  # the window behind the chunk, and the chunk


def available_bytes(device: torch.device) -> int:
    """Memory free for the cache now: CUDA's free memory, or the CPU's MemAvailable."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def kv_cache_blocks(
    config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    *,
    block_size: int,
    max_model_len: int,
    max_batch: int,
    chunk: int,
    tokens: int | None = None,
    fraction: float | None = None,
) -> int:
    """Blocks of the paged cache (the null block included), or a ConfigError naming the flags to change."""
    per_token = bytes_per_token(config, dtype)
    if tokens is None:
        default = CUDA_FRACTION if device.type == "cuda" else CPU_FRACTION
        budget = int((fraction or default) * available_bytes(device)) // per_token
        if device.type != "cuda":
            budget = min(budget, max_batch * max_model_len)
        source = f"{fraction or default:g} of the free memory ({budget} tokens at {per_token} bytes each)"
    else:
        budget, source = tokens, f"--kv-cache-tokens {tokens}"
    need = request_blocks(max_model_len, block_size, config.sliding_window, chunk)
    n_blocks = budget // block_size
    if n_blocks < need:
        raise ConfigError(f"the KV cache budget, {source}, holds {n_blocks * block_size} tokens but one request of "
                          f"--max-model-len {max_model_len} tokens needs {need * block_size}: lower --max-model-len "
                          f"or raise --kv-cache-tokens / --kv-cache-fraction")
    return n_blocks + 1  # and the null block
