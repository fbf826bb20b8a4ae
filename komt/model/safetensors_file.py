"""Read and write the safetensors format with a memory map and no second copy of the weights.

The format (https://github.com/huggingface/safetensors) is an 8-byte little-endian header length N,
N bytes of JSON `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`,
then the raw tensor bytes, offsets relative to the end of the header.

Why not `safetensors.torch.load_file`: komt must load a 14.5 GB checkpoint on a 24 GiB machine. Here each
tensor is a zero-copy view of a private memory map; the loader converts it to the target dtype/device and,
when that made a copy, tells the kernel it can drop the mapped pages (`release`). Writing streams one
tensor at a time, so converting a shard never holds the shard twice. Every header field is checked
against the file size, so a truncated or corrupt file is a one-line `CheckpointError`, not a segfault.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path
from typing import Iterable, Iterator

import torch

from komt.atomic import atomic_file
from komt.errors import CheckpointError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's own limit


class SafetensorsFile:
    """A memory-mapped safetensors file whose tensors are read by name, lazily and without copying."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < 8:
                    raise CheckpointError(f"{self.path}: truncated safetensors file ({size} bytes)")
                (header_len,) = struct.unpack("<Q", f.read(8))
                if header_len > min(size - 8, _MAX_HEADER):
                    raise CheckpointError(f"{self.path}: corrupt or truncated safetensors header")
                header_bytes = f.read(header_len)
                # ACCESS_COPY: a private mapping, so nothing written to a tensor ever reaches the file.
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except OSError as err:
            raise CheckpointError(f"{self.path}: cannot read: {err.strerror or err}") from None
        try:
            header = json.loads(header_bytes)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not JSON)") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header")
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + header_len
        self._entries = header
        data_size = size - self._data_start
        for name, entry in header.items():
            self._check_entry(name, entry, data_size)

    def _check_entry(self, name: str, entry: dict, data_size: int) -> None:
        try:
            dtype = DTYPES[entry["dtype"]]
            begin, end = entry["data_offsets"]
            numel = 1
            for dim in entry["shape"]:
                numel *= int(dim)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{self.path}: corrupt header entry for tensor {name!r}") from None
        if end > data_size:
            raise CheckpointError(f"{self.path}: truncated: tensor {name!r} ends past the end of the file")
        if not 0 <= begin <= end or end - begin != numel * dtype.itemsize:
            raise CheckpointError(f"{self.path}: corrupt header: tensor {name!r} has inconsistent offsets")

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self._entries[name]["dtype"]]

    def nbytes(self, name: str) -> int:
        begin, end = self._entries[name]["data_offsets"]
        return end - begin

    def tensor(self, name: str) -> torch.Tensor:
        """A CPU tensor viewing the mapped bytes (no copy)."""
        entry = self._entries[name]
        dtype = DTYPES[entry["dtype"]]
        begin, end = entry["data_offsets"]
        if begin == end:
            return torch.empty(entry["shape"], dtype=dtype)
        flat = torch.frombuffer(self._map, dtype=dtype, count=(end - begin) // dtype.itemsize,
                                offset=self._data_start + begin)
        return flat.view(entry["shape"])

    def release(self, name: str) -> None:
        """Drop the mapped pages of a tensor that has been copied elsewhere, so peak memory stays at one
        copy of the weights. Only for tensors no longer viewed: the pages read back from disk anyway."""
        begin, end = self._entries[name]["data_offsets"]
        start = (self._data_start + begin) // mmap.PAGESIZE * mmap.PAGESIZE
        stop = self._data_start + end
        if stop > start and hasattr(self._map, "madvise"):
            self._map.madvise(mmap.MADV_DONTNEED, start, stop - start)


def write_safetensors(
    path: str | Path, tensors: Iterable[tuple[str, torch.Tensor]], metadata: dict[str, str] | None = None
) -> None:
    """Write (name, tensor) pairs to `path` atomically, streaming one tensor at a time.

    The iterable is consumed twice (once for the header, once for the bytes), so pass a list or a
    re-iterable; tensors may be lazy views (memory-mapped), only one is materialised at a time.
    """
    path = Path(path)
    items = list(tensors)
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, t in items:
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)  # data starts 8-byte aligned, as the spec advises
    with atomic_file(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for _, t in items:
            data = t.detach().to("cpu").contiguous().view(-1).view(torch.uint8)
            f.write(memoryview(data.numpy()))


def iter_tensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    f = SafetensorsFile(path)
    for name in f.keys():
        yield name, f.tensor(name)
