"""Read a GGUF file (v2, v3) with a memory map: metadata as plain Python values, tensors as zero-copy views.

The layout (little-endian throughout):

    "GGUF"  u32 version  u64 n_tensors  u64 n_kv
    n_kv x      key: string  value_type: u32  value          (string = u64 length + UTF-8 bytes;
                                                              array = u32 element type + u64 count + elements)
    n_tensors x name: string  n_dims: u32  dims: u64[n_dims]  type: u32  offset: u64
    padding to `general.alignment` (default 32)
    tensor data; each tensor at data_start + offset, offsets aligned

`dims` run fastest-first (ggml's ne[0] is the row length), so a torch shape is `dims` reversed: a Hugging
Face weight [O, I] is stored with dims (I, O).

Why this reader rather than gguf-py's `GGUFReader`: that one is a test-only reference for komt, and it
trusts the file. Here every count, length, dimension and offset is checked against the file size before
anything is allocated, so a truncated, corrupt or hostile file (a count of 2^63, an offset past the end,
tensors overlapping, a type id ggml never defined, a FIFO instead of a file) is a one-line
`CheckpointError`, never a traceback, a hang or a giant allocation. The map is private (ACCESS_COPY), as
`safetensors_file.py`'s: nothing written to a tensor view reaches the file.
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from komt.errors import CheckpointError
from komt.model.gguf.constants import (
    ARRAY, BOOL, DEFAULT_ALIGNMENT, INT64, MAGIC, SCALAR_FORMATS, STRING, SUPPORTED_VERSIONS, TENSOR_TYPES, UINT32,
    UINT64, TensorType,
)

MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 8  # nested arrays deeper than this are not a real file
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
          12: "<f8"}
_FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

# A value's GGUF type, kept so a writer can reproduce a file: a type id, or (ARRAY, element type).
ValueType = int | tuple


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry: where its bytes are and how to read them."""

    name: str
    dims: tuple[int, ...]  # ggml order, fastest first (dims[0] = row length)
    type: TensorType
    offset: int  # relative to the data section
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """The torch shape: dims reversed ([O, I] for a linear weight)."""
        return tuple(reversed(self.dims))

    @property
    def n_rows(self) -> int:
        rows = 1
        for d in self.dims[1:]:
            rows *= d
        return rows

    @property
    def row_bytes(self) -> int:
        return self.dims[0] // self.type.block_size * self.type.type_size


class _Cursor:
    """Reads fields front to back from the mapped header, failing with the file's name on any overrun."""

    def __init__(self, buf: memoryview, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def fail(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: corrupt or truncated GGUF file: {what}")

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise self.fail(f"{what} runs past the end of the file (at byte {self.pos})")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, vtype: int, what: str) -> Any:
        fmt = "<" + SCALAR_FORMATS[vtype]
        (value,) = struct.unpack(fmt, self.take(struct.calcsize(fmt), what))
        return value

    def u32(self, what: str) -> int:
        return self.scalar(UINT32, what)

    def u64(self, what: str) -> int:
        return self.scalar(UINT64, what)

    def string(self, what: str) -> str:
        n = self.u64(f"length of {what}")
        # surrogateescape: a vocabulary entry that is not valid UTF-8 still reads (and writes back) exactly.
        return bytes(self.take(n, what)).decode("utf-8", errors="surrogateescape")

    def value(self, vtype: int, what: str, depth: int = 0) -> tuple[Any, ValueType]:
        if vtype == STRING:
            return self.string(what), STRING
        if vtype == ARRAY:
            return self.array(what, depth + 1)
        if vtype in SCALAR_FORMATS:
            return self.scalar(vtype, what), vtype
        raise self.fail(f"{what} has unknown value type {vtype}")

    def array(self, what: str, depth: int) -> tuple[list, ValueType]:
        if depth > MAX_ARRAY_DEPTH:
            raise self.fail(f"{what} nests arrays deeper than {MAX_ARRAY_DEPTH}")
        etype = self.u32(f"element type of {what}")
        count = self.u64(f"length of {what}")
        if etype in _NUMPY:  # fixed-size elements: one bounds check, one vectorised read
            raw = self.take(count * np.dtype(_NUMPY[etype]).itemsize, f"{count} elements of {what}")
            values = np.frombuffer(raw, dtype=_NUMPY[etype]).tolist()
            return ([bool(v) for v in values] if etype == BOOL else values), (ARRAY, etype)
        if etype not in (STRING, ARRAY):
            raise self.fail(f"{what} has unknown element type {etype}")
        # every string or nested array takes at least 8 bytes, so a huge count fails here, before the loop
        if count * 8 > len(self.buf) - self.pos:
            raise self.fail(f"{what} claims {count} elements, more than the file holds")
        items, inner = [], etype
        for i in range(count):
            item, inner = self.value(etype, f"{what}[{i}]", depth)
            items.append(item)
        return items, (ARRAY, inner if etype == ARRAY else STRING)


class GGUFFile:
    """A memory-mapped GGUF file: `metadata` (plain Python values), `value_types`, and tensors by name."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._map = _map_file(self.path)
        cur = _Cursor(memoryview(self._map), self.path)
        if bytes(cur.take(4, "magic")) != MAGIC:
            raise CheckpointError(f"{self.path}: not a GGUF file (no 'GGUF' magic)")
        self.version = cur.u32("version")
        if self.version == 1:
            raise CheckpointError(f"{self.path}: GGUF v1 is not supported (re-convert it with a current llama.cpp)")
        if self.version not in SUPPORTED_VERSIONS:
            raise CheckpointError(f"{self.path}: unsupported GGUF version {self.version} (komt reads v2 and v3)")
        n_tensors = cur.u64("tensor count")
        n_kv = cur.u64("metadata count")
        # each entry takes at least 8 (key length) + 4 (type) bytes, each tensor info at least 8 + 4 + 4 + 8
        if n_kv * 12 + n_tensors * 24 > len(self._map) - cur.pos:
            raise cur.fail(f"{n_kv} metadata entries and {n_tensors} tensors cannot fit in {len(self._map)} bytes")
        self.metadata: dict[str, Any] = {}
        self.value_types: dict[str, ValueType] = {}
        for i in range(n_kv):
            key = cur.string(f"metadata key {i}")
            if key in self.metadata:
                raise cur.fail(f"duplicate metadata key {key!r}")
            vtype = cur.u32(f"type of {key!r}")
            self.metadata[key], self.value_types[key] = cur.value(vtype, f"metadata {key!r}")
        self.alignment = self._alignment()
        infos = [self._tensor_info(cur, i) for i in range(n_tensors)]
        self.data_start = -(-cur.pos // self.alignment) * self.alignment
        self.tensors: dict[str, TensorInfo] = {}
        for info in infos:
            if info.name in self.tensors:
                raise cur.fail(f"duplicate tensor name {info.name!r}")
            self.tensors[info.name] = info
        self._check_layout(infos)

    def _alignment(self) -> int:
        if "general.alignment" not in self.metadata:
            return DEFAULT_ALIGNMENT
        value = self.metadata["general.alignment"]
        if self.value_types["general.alignment"] != UINT32 or value <= 0 or value & (value - 1):
            raise CheckpointError(f"{self.path}: general.alignment must be a power-of-two u32, got {value!r}")
        return value

    def _tensor_info(self, cur: _Cursor, i: int) -> TensorInfo:
        name = cur.string(f"name of tensor {i}")
        n_dims = cur.u32(f"dimension count of {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        dims = tuple(cur.scalar(INT64, f"dimensions of {name!r}") for _ in range(n_dims))
        type_id = cur.u32(f"type of {name!r}")
        offset = cur.u64(f"offset of {name!r}")
        if type_id not in TENSOR_TYPES:
            raise cur.fail(f"tensor {name!r} has unknown type id {type_id}")
        ttype = TENSOR_TYPES[type_id]
        if any(d < 0 for d in dims):
            raise cur.fail(f"tensor {name!r} has a negative dimension {dims}")
        if dims[0] % ttype.block_size:
            raise cur.fail(f"tensor {name!r} row length {dims[0]} is not a multiple of {ttype.name}'s block {ttype.block_size}")
        numel = 1
        for d in dims:
            numel *= d  # Python ints: no overflow; absurd sizes fail the bounds check in _check_layout
        nbytes = numel // ttype.block_size * ttype.type_size
        return TensorInfo(name, dims, ttype, offset, nbytes)

    def _check_layout(self, infos: list[TensorInfo]) -> None:
        data_size = len(self._map) - self.data_start
        if infos and data_size < 0:
            raise CheckpointError(f"{self.path}: truncated GGUF file: no data section after the header")
        end = 0
        for info in sorted(infos, key=lambda t: t.offset):
            if info.offset % self.alignment:
                raise CheckpointError(f"{self.path}: tensor {info.name!r} offset {info.offset} is not aligned to {self.alignment}")
            if info.offset + info.nbytes > data_size:
                raise CheckpointError(f"{self.path}: truncated: tensor {info.name!r} {info.dims} ends past the end of the file")
            if info.offset < end:
                raise CheckpointError(f"{self.path}: corrupt GGUF file: tensor {info.name!r} overlaps the tensor before it")
            end = info.offset + info.nbytes

    def raw(self, name: str) -> torch.Tensor:
        """The tensor's bytes as uint8 [rows..., row_bytes] (torch order), a zero-copy view of the map."""
        info = self.tensors[name]
        shape = (*reversed(info.dims[1:]), info.row_bytes)
        if info.nbytes == 0:
            return torch.empty(shape, dtype=torch.uint8)
        flat = torch.frombuffer(self._map, dtype=torch.uint8, count=info.nbytes, offset=self.data_start + info.offset)
        return flat.view(shape)

    def float_tensor(self, name: str) -> torch.Tensor:
        """An F32 / F16 / BF16 tensor in its own dtype and torch shape, a zero-copy view of the map."""
        info = self.tensors[name]
        if info.type.name not in _FLOAT_DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name!r} is {info.type.name}, not a float type")
        return self.raw(name).view(_FLOAT_DTYPES[info.type.name]).view(info.shape)

    def release(self, name: str) -> None:
        """Drop the mapped pages of a tensor that has been copied elsewhere (as SafetensorsFile.release)."""
        info = self.tensors[name]
        start = (self.data_start + info.offset) // mmap.PAGESIZE * mmap.PAGESIZE
        stop = self.data_start + info.offset + info.nbytes
        if stop > start and hasattr(self._map, "madvise"):
            self._map.madvise(mmap.MADV_DONTNEED, start, stop - start)


def _map_file(path: Path) -> mmap.mmap:
    """A private map of a regular file; anything else (folder, FIFO, device) is refused before opening,
    since opening a FIFO blocks until a writer appears."""
    try:
        st = os.stat(path)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read: {err.strerror or err}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise CheckpointError(f"{path}: is {kind}, expected a .gguf file")
    if st.st_size < 24:
        raise CheckpointError(f"{path}: truncated GGUF file ({st.st_size} bytes)")
    try:
        with open(path, "rb") as f:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot read: {getattr(err, 'strerror', None) or err}") from None
