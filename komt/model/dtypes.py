"""Dtypes by name: what a config or a `--dtype` flag may say, and the one meaning of `--dtype auto`.

Every command offers the same choices, `DTYPE_CHOICES`. `auto` is bf16 on CUDA (the model card's) and
forces nothing elsewhere: a loaded checkpoint keeps its own dtype on the CPU (the 7B bf16 checkpoint stays
14.5 GB), a random-weight preset its config's. A command that cannot run a dtype refuses it with one line
(training in fp16: komt.train.config) rather than offering a list of its own.
"""

from __future__ import annotations

import torch

from komt.errors import ConfigError
from komt.model.config import DTYPE_NAMES

DTYPE_FLAGS = ("fp32", "bf16", "fp16")  # the short names a flag takes
DTYPE_CHOICES = ("auto", *DTYPE_FLAGS)  # every --dtype flag's choices

# config.json's names (torch's attribute names), the flags' short ones, and torch's aliases.
DTYPES_BY_NAME = {
    **{name: getattr(torch, name) for name in DTYPE_NAMES},
    "fp32": torch.float32, "float": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16, "half": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """`"bf16"` / `"bfloat16"` / `torch.bfloat16` -> torch.bfloat16; None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES_BY_NAME[dtype.lower()]
    except KeyError:
        raise ConfigError(f"unknown dtype {dtype!r}; use fp32, bf16 or fp16") from None


def resolve_dtype(choice: str, device: torch.device) -> torch.dtype | None:
    """A `--dtype` choice on `device`: `auto` is bf16 on CUDA and None (keep the checkpoint's) elsewhere."""
    if choice == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return parse_dtype(choice)
