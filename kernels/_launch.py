"""Checks shared by the Triton wrappers: where a kernel may run and how big the device is.

Triton kernels run on CUDA tensors, or on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1,
which the tests use). Anything else is refused with a ValueError naming the tensors, rather than a
Triton traceback from deep inside a launch.
"""

from __future__ import annotations

import functools
import os

import torch


def interpreting() -> bool:
    """True when TRITON_INTERPRET is on now (read at each call; triton.jit itself reads it once, when it
    decorates a kernel, i.e. when the kernel's module is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_device(kernel: str, **tensors: torch.Tensor) -> torch.device:
    """All tensors on one device, and that device CUDA (or the CPU under the interpreter)."""
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        listed = ", ".join(f"{name} on {d}" for name, d in devices.items())
        raise ValueError(f"{kernel}: tensors are on different devices ({listed})")
    if first.type == "cuda" or (first.type == "cpu" and interpreting()):
        return first
    raise ValueError(
        f"{kernel}: tensors are on {first}; the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 "
        "for the CPU interpreter); use kernels.reference on the CPU"
    )


def needs_grad(*tensors: torch.Tensor) -> bool:
    """True when autograd will record an op on these tensors: the kernels must then take their backward path."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def cdiv(a: int, b: int) -> int:
    """Ceiling division on host ints (triton.cdiv is a constexpr function: microseconds per call)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (>= 1), on host ints."""
    return 1 << max(n - 1, 0).bit_length()


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors on `device`; the interpreter pretends to have 4 (keeps splits small)."""
    if device.type != "cuda":
        return 4
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
