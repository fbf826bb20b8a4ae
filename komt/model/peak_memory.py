"""Peak memory of this process, as every benchmark reports it (load, generation, training).

On CUDA it is the caching allocator's maximum (`torch.cuda.max_memory_allocated`); on the CPU the
process's peak resident set, VmHWM in /proc/self/status (Linux), else `getrusage`'s ru_maxrss. Both
include everything the process holds, so a benchmark that compares settings runs each in its own process
or resets the counter first.
"""

from __future__ import annotations

from pathlib import Path

import torch


def reset_peak_memory(device: torch.device) -> None:
    """Start the peak over from what is held now (on the CPU: Linux >= 4.0; elsewhere nothing happens)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:  # "5" resets the kernel's peak-RSS counter (VmHWM) for this process
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def peak_memory_bytes(device: torch.device) -> int:
    """Peak since the start (or the last reset): CUDA allocator bytes, or the peak resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource  # not on Windows

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
