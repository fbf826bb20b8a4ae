"""Write a GGUF v3 file (alignment 32) atomically, streaming one tensor at a time.

The header needs every tensor's name, shape, type and offset before the first data byte, but none of the
data: each `TensorToWrite` carries its shape and type and a `data()` callable that produces its encoded
bytes only when the writer reaches it. So exporting a 7B checkpoint holds one encoded tensor at a time,
and the file appears (via `komt.atomic`) only once it is complete.

Metadata values are plain Python; their GGUF types follow gguf-py's writer, which are the types
llama.cpp's loader checks: bool -> BOOL, int -> UINT32, float -> FLOAT32, str -> STRING, list -> ARRAY
(int elements INT32, float FLOAT32, ...); a negative scalar is INT32, and ints too large for 32 bits take
the 64-bit type. `value_types` overrides a key's type with the reader's descriptor (an id, or
(ARRAY, element type)), so a file read by `GGUFFile` is written back with the same types.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from komt.atomic import atomic_file
from komt.errors import CheckpointError
from komt.jsonutil import is_int
from komt.model.gguf.constants import (
    ARRAY, BOOL, FLOAT32, INT32, INT64, MAGIC, SCALAR_FORMATS, STRING, TENSOR_TYPES_BY_NAME, UINT32, UINT64,
    WRITE_VERSION,
)
from komt.model.gguf.reader import ValueType

ALIGNMENT = 32


@dataclass(frozen=True)
class TensorToWrite:
    """One tensor of the output: torch `shape`, GGUF type name, and a callable giving its bytes (uint8)."""

    name: str
    shape: tuple[int, ...]
    type_name: str
    data: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        t = TENSOR_TYPES_BY_NAME[self.type_name]
        numel = 1
        for d in self.shape:
            numel *= d
        return numel // t.block_size * t.type_size


def _default_int(values: list[int], in_array: bool) -> int:
    if not in_array and all(0 <= v < 2**32 for v in values):
        return UINT32
    if all(-2**31 <= v < 2**31 for v in values):
        return INT32
    return UINT64 if all(0 <= v < 2**64 for v in values) else INT64


def _default_type(value: Any, key: str, in_array: bool = False) -> ValueType:
    if isinstance(value, bool):
        return BOOL
    if isinstance(value, int):
        return _default_int([value], in_array)
    if isinstance(value, float):
        return FLOAT32
    if isinstance(value, str):
        return STRING
    if isinstance(value, (list, tuple)):
        if value and all(is_int(v) for v in value):
            return (ARRAY, _default_int(list(value), in_array=True))
        return (ARRAY, _default_type(value[0], key, in_array=True) if value else INT32)
    raise CheckpointError(f"GGUF metadata {key!r}: cannot write a value of type {type(value).__name__}")


def _string(s: str) -> bytes:
    raw = s.encode("utf-8", errors="surrogateescape")
    return struct.pack("<Q", len(raw)) + raw


def _encode_value(value: Any, vtype: ValueType, key: str) -> bytes:
    """The value's bytes, without its leading type id."""
    if isinstance(vtype, tuple):
        etype = vtype[1]
        if not isinstance(value, (list, tuple)):
            raise CheckpointError(f"GGUF metadata {key!r}: expected a list, got {type(value).__name__}")
        head = struct.pack("<IQ", etype[0] if isinstance(etype, tuple) else etype, len(value))
        if etype == STRING:
            return head + b"".join(_string(v) for v in value)
        if isinstance(etype, tuple) or etype == ARRAY:
            inner = etype if isinstance(etype, tuple) else (ARRAY, INT32)
            return head + b"".join(_encode_value(v, inner, key) for v in value)
        try:
            return head + struct.pack(f"<{len(value)}{SCALAR_FORMATS[etype]}", *value)
        except struct.error as err:
            raise CheckpointError(f"GGUF metadata {key!r}: {err}") from None
    if vtype == STRING:
        return _string(value)
    try:
        return struct.pack("<" + SCALAR_FORMATS[vtype], value)
    except (struct.error, KeyError) as err:
        raise CheckpointError(f"GGUF metadata {key!r}: cannot write {value!r} as type {vtype}: {err}") from None


def _header(metadata: Mapping[str, Any], tensors: list[TensorToWrite],
            value_types: Mapping[str, ValueType]) -> bytes:
    metadata = {"general.alignment": ALIGNMENT, **{k: v for k, v in metadata.items() if k != "general.alignment"}}
    parts = [MAGIC, struct.pack("<IQQ", WRITE_VERSION, len(tensors), len(metadata))]
    for key, value in metadata.items():
        vtype = value_types[key] if key in value_types and key != "general.alignment" else _default_type(value, key)
        type_id = ARRAY if isinstance(vtype, tuple) else vtype
        parts.append(_string(key) + struct.pack("<I", type_id) + _encode_value(value, vtype, key))
    offset = 0
    for t in tensors:
        dims = tuple(reversed(t.shape))  # torch order -> ggml order (row length first)
        type_id = TENSOR_TYPES_BY_NAME[t.type_name].id
        parts.append(_string(t.name) + struct.pack(f"<I{len(dims)}qIQ", len(dims), *dims, type_id, offset))
        offset += -(-t.nbytes // ALIGNMENT) * ALIGNMENT
    header = b"".join(parts)
    return header + b"\0" * (-len(header) % ALIGNMENT)


def write_gguf(path: str | os.PathLike, metadata: Mapping[str, Any], tensors: Iterable[TensorToWrite],
               value_types: Mapping[str, ValueType] | None = None) -> None:
    """Write `metadata` and `tensors` (in order) to `path` as GGUF v3, atomically."""
    tensors = list(tensors)
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise CheckpointError(f"duplicate tensor names in GGUF output: {sorted({n for n in names if names.count(n) > 1})}")
    for t in tensors:
        if t.type_name not in TENSOR_TYPES_BY_NAME:
            raise CheckpointError(f"tensor {t.name!r}: unknown GGUF type {t.type_name!r}")
        if not t.shape or t.shape[-1] % TENSOR_TYPES_BY_NAME[t.type_name].block_size:
            raise CheckpointError(f"tensor {t.name!r}: shape {t.shape} does not fit {t.type_name} blocks")
    header = _header(metadata, tensors, value_types or {})
    with atomic_file(Path(path), "wb") as f:
        f.write(header)
        for t in tensors:
            data = t.data().detach().contiguous().view(torch.uint8).view(-1)
            if data.numel() != t.nbytes:
                raise CheckpointError(f"tensor {t.name!r}: {data.numel()} bytes of data, expected {t.nbytes}")
            f.write(memoryview(data.numpy()))
            f.write(b"\0" * (-t.nbytes % ALIGNMENT))
