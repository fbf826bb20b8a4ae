"""komt's GGUF writer: what gguf-py's reader (the reference) and komt's reader read back, streaming, atomic."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from komt.errors import CheckpointError
from komt.model.gguf.constants import ARRAY, FLOAT64, INT8, INT64, STRING, UINT8, UINT16, UINT64
from komt.model.gguf.quantize import quantize
from komt.model.gguf.reader import GGUFFile
from komt.model.gguf.writer import ALIGNMENT, TensorToWrite, write_gguf

VT = gguf.GGUFValueType
METADATA = {
    "general.architecture": "llama",
    "t.bool": False,
    "t.int": 7,
    "t.neg": -3,
    "t.big": 2**40,
    "t.float": 0.25,
    "t.str": "한국어 ▁tokens",
    "t.strs": ["<s>", "</s>", "▁안녕"],
    "t.ints": [3, -1, 2],
    "t.floats": [-1000.0, 0.5],
    "t.bools": [True, False],
    "t.nested": [["a", "b"], ["c"]],
    "t.u8": 255, "t.i8": -128, "t.u16": 65535, "t.u64": 2**64 - 1, "t.i64": -(2**63), "t.f64": 0.1,
    "t.u8s": [1, 2, 255],
}
TYPES = {"t.u8": UINT8, "t.i8": INT8, "t.u16": UINT16, "t.u64": UINT64, "t.i64": INT64, "t.f64": FLOAT64,
         "t.u8s": (ARRAY, UINT8)}


def tensors() -> dict[str, tuple[torch.Tensor, str]]:
    g = torch.Generator().manual_seed(0)
    return {
        "blk.0.attn_norm.weight": (torch.randn(64, generator=g), "F32"),
        "blk.0.attn_q.weight": (torch.randn(3, 64, generator=g), "F16"),
        "blk.0.ffn_up.weight": (torch.randn(5, 64, generator=g), "Q8_0"),
        "blk.0.ffn_down.weight": (torch.randn(2, 4, 32, generator=g), "Q4_0"),
        "blk.0.attn_v.weight": (torch.randn(3, 32, generator=g), "BF16"),
    }


def write(path, **kwargs) -> dict[str, torch.Tensor]:
    encoded = {name: quantize(x, t) for name, (x, t) in tensors().items()}
    items = [TensorToWrite(name, tuple(x.shape), t, lambda n=name: encoded[n]) for name, (x, t) in tensors().items()]
    write_gguf(path, METADATA, items, value_types=TYPES, **kwargs)
    return encoded


def test_gguf_py_reads_metadata_and_tensors(tmp_path):
    path = tmp_path / "out.gguf"
    encoded = write(path)
    ref = gguf.GGUFReader(str(path))
    fields = {k: f for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert fields["general.alignment"].contents() == ALIGNMENT and fields["general.alignment"].types == [VT.UINT32]
    for key, value in METADATA.items():
        if key == "t.nested":  # gguf-py's contents() flattens nested arrays
            assert fields[key].contents() == ["a", "b", "c"]
            continue
        got = fields[key].contents()
        assert got == (pytest.approx(value) if isinstance(value, float) else value), key
    assert fields["t.int"].types == [VT.UINT32] and fields["t.neg"].types == [VT.INT32]
    assert fields["t.float"].types == [VT.FLOAT32] and fields["t.ints"].types == [VT.ARRAY, VT.INT32]
    assert fields["t.big"].types == [VT.UINT64]
    assert fields["t.u8"].types == [VT.UINT8] and fields["t.u8s"].types == [VT.ARRAY, VT.UINT8]
    by_name = {t.name: t for t in ref.tensors}
    for name, (x, type_name) in tensors().items():
        t = by_name[name]
        assert t.tensor_type.name == type_name and [int(d) for d in t.shape] == list(reversed(x.shape))
        assert t.data_offset % ALIGNMENT == 0
        assert np.array_equal(np.asarray(t.data).view(np.uint8).reshape(-1), encoded[name].numpy().reshape(-1))
        dense = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(x.shape)
        assert np.allclose(dense, x.numpy(), atol=0.3)  # the right values, to the type's precision


def test_komt_reader_round_trips_values_and_types(tmp_path):
    path = tmp_path / "out.gguf"
    encoded = write(path)
    f = GGUFFile(path)
    assert f.version == 3 and f.data_start % ALIGNMENT == 0
    expected = {k: (float(np.float32(v)) if k == "t.float" else v) for k, v in METADATA.items()}
    assert f.metadata == {"general.alignment": ALIGNMENT, **expected}
    again = tmp_path / "again.gguf"
    items = [TensorToWrite(n, i.shape, i.type.name, lambda n=n: f.raw(n)) for n, i in f.tensors.items()]
    write_gguf(again, f.metadata, items, value_types=f.value_types)
    assert again.read_bytes() == path.read_bytes()  # read -> write is the identity
    assert all(torch.equal(f.raw(n), encoded[n].view(f.raw(n).shape)) for n in encoded)


def test_streams_each_tensor_once_in_order(tmp_path):
    calls = []

    def data(name, x, t):
        def produce():
            calls.append(name)
            return quantize(x, t)
        return produce

    items = [TensorToWrite(n, tuple(x.shape), t, data(n, x, t)) for n, (x, t) in tensors().items()]
    write_gguf(tmp_path / "s.gguf", METADATA, items)
    assert calls == list(tensors())


def test_failure_leaves_no_file_and_keeps_the_old_one(tmp_path):
    path = tmp_path / "out.gguf"
    path.write_bytes(b"old")

    def broken():
        raise RuntimeError("disk full")

    items = [TensorToWrite("a", (32,), "F32", lambda: torch.zeros(32)), TensorToWrite("b", (32,), "F32", broken)]
    with pytest.raises(RuntimeError, match="disk full"):
        write_gguf(path, METADATA, items)
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf"]
    with pytest.raises(CheckpointError, match="128 bytes of data, expected 64"):
        write_gguf(path, METADATA, [TensorToWrite("a", (16,), "F32", lambda: torch.zeros(32))])
    assert path.read_bytes() == b"old"


@pytest.mark.parametrize("bad, message", [
    ([TensorToWrite("a", (4,), "F32", None), TensorToWrite("a", (4,), "F32", None)], "duplicate tensor names"),
    ([TensorToWrite("a", (2, 48), "Q8_0", None)], "does not fit Q8_0 blocks"),
    ([TensorToWrite("a", (4,), "Q9_9", None)], "unknown GGUF type"),
])
def test_bad_tensors_are_refused_before_writing(tmp_path, bad, message):
    with pytest.raises(CheckpointError, match=message):
        write_gguf(tmp_path / "x.gguf", METADATA, bad)
    assert not (tmp_path / "x.gguf").exists()


def test_bad_metadata_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="t.obj"):
        write_gguf(tmp_path / "x.gguf", {"t.obj": object()}, [])
    with pytest.raises(CheckpointError, match="t.small"):
        write_gguf(tmp_path / "x.gguf", {"t.small": 300}, [], value_types={"t.small": UINT8})
    write_gguf(tmp_path / "s.gguf", {"t.s": "x"}, [], value_types={"t.s": STRING})
    assert GGUFFile(tmp_path / "s.gguf").metadata["t.s"] == "x"
