"""Which device a command runs on: the one asked for, checked against this machine, or CUDA when there is one.

Every entry point (generate, its benchmark, serve, eval, train) defaults the same way, and a misspelt or
absent device is one ConfigError here, at the edge, instead of a torch RuntimeError/AssertionError from
the first allocation.
"""

from __future__ import annotations

import torch

from komt.errors import ConfigError


def default_device() -> torch.device:
    """CUDA when this machine has it, else the CPU: what every command runs on without `--device`."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def parse_device(device: str | torch.device | None) -> torch.device:
    """`"cuda:1"` -> torch.device, checked against this machine; None is the CPU (`load_model`'s default)."""
    if device is None:
        return torch.device("cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"unknown device {str(device)!r:.40}; use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device}: CUDA is not available on this machine; use cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {device}: MPS is not available on this machine; use cpu")
    return parsed


def requested_device(flag: str | None) -> torch.device:
    """A `--device` flag's device: the flag's, checked, or `default_device()` when it is not given."""
    return parse_device(flag) if flag else default_device()
