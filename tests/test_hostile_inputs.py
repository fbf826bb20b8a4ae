"""Broken and hostile checkpoints: each is one line of ConfigError/CheckpointError, never a traceback, never
a silent load, never a hang.

The cases are generated: every header field of a safetensors entry crossed with the wrong kinds of value
(string, float, negative, boolean, ...), every integer field of config.json likewise, then the one-off
cases (index paths leaving the folder, FIFOs, overlapping byte ranges, a tensor in two shards, integer
weights, 10^7 layers, deep nesting). Each is applied to a writable copy of tiny-mistral and loaded with
`komt.load_model` under a 20 s `signal.alarm`, so a case that blocks (a FIFO opened for reading) or
crawls (building 10^7 layers) fails the test instead of hanging the suite.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

import komt
from conftest import FIXTURES, write_shards
from komt.errors import CheckpointError, ConfigError, TokenizerError

ROOT = Path(__file__).resolve().parents[1]
DEEP = "[" * 100_000 + "]" * 100_000  # past the JSON parser's recursion limit
A_TENSOR = "model.layers.0.mlp.up_proj.weight"  # (176, 64) float32 in tiny-mistral


@pytest.fixture
def folder(tmp_path) -> Path:
    """A writable copy of tiny-mistral, inside tmp_path/ckpt (so tmp_path is "outside the folder")."""
    target = tmp_path / "ckpt"
    target.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(FIXTURES / "tiny-mistral" / name, target / name)
    return target


class Timeout(Exception):
    pass


@pytest.fixture
def alarm():
    """Fail instead of hanging: SIGALRM after 20 s raises Timeout (also out of a blocking open())."""

    def ring(signum, frame):
        raise Timeout("a load that should fail at once did not finish in 20 s")

    previous = signal.signal(signal.SIGALRM, ring)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


# ---- how cases change a checkpoint ----------------------------------------------------------------------

def read_header(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def write_header(path: Path, header: dict | str, body: bytes) -> None:
    text = header if isinstance(header, str) else json.dumps(header)
    raw = text.encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def edit_header(change: Callable[[dict], object]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        path = folder / "model.safetensors"
        header, body = read_header(path)
        result = change(header)
        write_header(path, result if isinstance(result, str) else header, body)

    return apply


def set_entry_field(field: str, value) -> Callable[[Path], None]:
    return edit_header(lambda h: h[A_TENSOR].__setitem__(field, value))


def edit_config(change: Callable[[dict], object]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        path = folder / "config.json"
        raw = json.loads(path.read_text())
        result = change(raw)
        path.write_text(result if isinstance(result, str) else json.dumps(raw))

    return apply


def set_config(key: str, value) -> Callable[[Path], None]:
    return edit_config(lambda raw: raw.__setitem__(key, value))


def config_text(text: str) -> Callable[[Path], None]:
    return lambda folder: (folder / "config.json").write_text(text)


def sharded(weight_map_of: Callable[[dict], object], index_name: str = "model.safetensors.index.json"):
    """Two real shards plus an index whose weight_map is whatever `weight_map_of(real_map)` returns."""

    return lambda folder: write_shards(folder, 2, weight_map_of=weight_map_of, index_name=index_name)


def outside_shard(name: str) -> Callable[[Path], None]:
    """An index pointing one tensor at `name`; a real copy of the weights waits outside the folder."""

    def apply(folder: Path) -> None:
        shutil.copy(folder / "model.safetensors", folder.parent / "x.safetensors")
        sharded(lambda m: {n: name for n in m})(folder)

    return apply


def replace_tensor(name: str, value: torch.Tensor) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        state = load_file(folder / "model.safetensors")
        state[name] = value
        save_file(state, folder / "model.safetensors")

    return apply


def tensor_in_two_shards(folder: Path) -> None:
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    save_file(state, folder / "model-00001-of-00002.safetensors")
    save_file({"model.norm.weight": state["model.norm.weight"]}, folder / "model-00002-of-00002.safetensors")
    weight_map = {n: "model-00001-of-00002.safetensors" for n in state}
    weight_map["model.norm.weight"] = "model-00002-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def overlapping_ranges(header: dict) -> None:
    a, b = header["model.layers.0.input_layernorm.weight"], header["model.layers.0.post_attention_layernorm.weight"]
    b["data_offsets"] = list(a["data_offsets"])  # same shape and dtype: the sizes still check out


def fifo(name: str) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        (folder / name).unlink(missing_ok=True)
        os.mkfifo(folder / name)

    return apply


def fifo_bin(folder: Path) -> None:
    (folder / "model.safetensors").unlink()
    os.mkfifo(folder / "pytorch_model.bin")


def fifo_index(folder: Path) -> None:
    sharded(lambda m: m)(folder)
    (folder / "model.safetensors.index.json").unlink()
    os.mkfifo(folder / "model.safetensors.index.json")


# ---- the cases: (id, change, error type, message fragment) ------------------------------------------------

CASES: list[tuple[str, Callable[[Path], None], type, str]] = []

# Every field of a safetensors header entry, crossed with the wrong kinds of value.
_BAD_FIELD_VALUES = {
    "dtype": [("int", 5), ("null", None), ("list", ["F32"]), ("unknown", "F8_E4M3")],
    "shape": [("string", "176,64"), ("float", [176.0, 64]), ("negative", [-176, -64]), ("bool", [True, 64]),
              ("nested", [[176], 64]), ("huge", [2**64, 0])],
    "data_offsets": [("string", "0,45056"), ("float", [0.0, 45056.0]), ("negative", [-45056, 0]),
                     ("bool", [False, True]), ("three", [0, 1, 2]), ("reversed", [45056, 0])],
}
_FIELD_FRAGMENT = {"dtype": "is not one of", "shape": "shape must be a list of non-negative integers",
                   "data_offsets": "data_offsets must be two non-negative integers"}
for _field, _values in _BAD_FIELD_VALUES.items():
    for _kind, _value in _values:
        _fragment = _FIELD_FRAGMENT[_field]
        if _field == "data_offsets" and _kind == "reversed":
            _fragment = "inconsistent offsets"
        CASES.append((f"header-{_field}-{_kind}", set_entry_field(_field, _value), CheckpointError, _fragment))

CASES += [
    ("header-entry-not-object", edit_header(lambda h: h.__setitem__(A_TENSOR, [1, 2])), CheckpointError,
     "expected an object"),
    ("header-metadata-not-object", edit_header(lambda h: h.__setitem__("__metadata__", ["pt"])), CheckpointError,
     "__metadata__ is not an object"),
    ("header-not-object", edit_header(lambda h: "[1, 2]"), CheckpointError, "not a JSON object"),
    ("header-deeply-nested", edit_header(lambda h: DEEP), CheckpointError, "nested too deeply"),
    ("header-nan", edit_header(lambda h: '{"a": NaN}'), CheckpointError, "NaN is not a JSON number"),
    ("header-duplicate-tensor",
     edit_header(lambda h: json.dumps(h)[:-1] + f', "{A_TENSOR}": ' + json.dumps(h[A_TENSOR]) + "}"),
     CheckpointError, "appears twice"),
    ("header-overlapping-ranges", edit_header(overlapping_ranges), CheckpointError, "overlap in the file"),
    ("weights-int32", replace_tensor(A_TENSOR, torch.zeros(176, 64, dtype=torch.int32)), CheckpointError,
     "is int32; weights must be floating point"),
    ("weights-bool", replace_tensor(A_TENSOR, torch.zeros(176, 64, dtype=torch.bool)), CheckpointError,
     "is bool; weights must be floating point"),
    ("weights-int64", replace_tensor("model.norm.weight", torch.ones(64, dtype=torch.int64)), CheckpointError,
     "is int64; weights must be floating point"),
    ("tensor-in-two-shards", tensor_in_two_shards, CheckpointError, "is also in model-00001-of-00002.safetensors"),
]

# Index files.
CASES += [
    ("index-dotdot", outside_shard("../x.safetensors"), CheckpointError, "is outside the checkpoint folder"),
    ("index-absolute", outside_shard("/etc/passwd"), CheckpointError, "is outside the checkpoint folder"),
    ("index-absolute-safetensors", outside_shard(str(Path("/tmp") / "x.safetensors")), CheckpointError,
     "is outside the checkpoint folder"),
    ("index-nested-dotdot", outside_shard("sub/../../x.safetensors"), CheckpointError,
     "is outside the checkpoint folder"),
    ("index-wrong-suffix", sharded(lambda m: {n: "pytorch_model.bin" for n in m}), CheckpointError,
     "is not a .safetensors file"),
    ("index-weight-map-list", sharded(lambda m: list(m.values())), CheckpointError, "'weight_map' object"),
    ("index-weight-map-string", sharded(lambda m: "model-00001-of-00002.safetensors"), CheckpointError,
     "'weight_map' object"),
    ("index-weight-map-int-values", sharded(lambda m: {n: 1 for n in m}), CheckpointError,
     "must be a file name, got 1"),
    ("index-weight-map-null-values", sharded(lambda m: {n: None for n in m}), CheckpointError,
     "must be a file name, got None"),
    ("index-empty", sharded(lambda m: {}), CheckpointError, "lists no shards"),
    ("index-deeply-nested", lambda f: (sharded(lambda m: m)(f),
                                       (f / "model.safetensors.index.json").write_text(DEEP)),
     CheckpointError, "nested too deeply"),
]

# Every integer field of config.json, crossed with the wrong kinds of value.
_INT_FIELDS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "max_position_embeddings"]
_BAD_INTS = [("zero", 0), ("negative", -4), ("float", 4.0), ("string", "4"), ("bool", True), ("huge", 2**63),
             ("list", [4])]
for _key in _INT_FIELDS:
    for _kind, _value in _BAD_INTS:
        if _key == "num_key_value_heads" and _kind == "zero":
            continue  # covered below: 0 is not "absent"
        CASES.append((f"config-{_key}-{_kind}", set_config(_key, _value), ConfigError,
                      f"{_key} must be a positive integer"))

CASES += [
    ("config-num_key_value_heads-zero", set_config("num_key_value_heads", 0), ConfigError,
     "num_key_value_heads must be a positive integer"),
    ("config-heads-zero-no-head-dim", set_config("num_attention_heads", 0), ConfigError,
     "num_attention_heads must be a positive integer"),
    ("config-head-dim-odd", edit_config(lambda r: r.update(head_dim=15, hidden_size=60)), ConfigError,
     "head_dim must be even"),
    ("config-hidden-not-multiple-of-heads", set_config("num_attention_heads", 3), ConfigError,
     "hidden_size 64 is not a multiple of num_attention_heads 3"),
    ("config-head-dim-string", set_config("head_dim", "16"), ConfigError, "head_dim must be a positive integer"),
    ("config-eos-empty-list", set_config("eos_token_id", []), ConfigError, "eos_token_id is an empty list"),
    ("config-eos-string", set_config("eos_token_id", "x"), ConfigError, "eos_token_id must be a token id"),
    ("config-eos-bool", set_config("eos_token_id", True), ConfigError, "eos_token_id must be a token id"),
    ("config-eos-past-vocab", set_config("eos_token_id", 5000), ConfigError,
     "eos_token_id must be a token id in [0, 1024)"),
    ("config-bos-negative", set_config("bos_token_id", -1), ConfigError, "bos_token_id must be a token id"),
    ("config-rope-scaling-string", set_config("rope_scaling", "linear"), ConfigError,
     "rope_scaling must be an object or null"),
    ("config-rope-parameters-list", set_config("rope_parameters", [1]), ConfigError,
     "rope_parameters must be an object or null"),
    ("config-rope-theta-zero", set_config("rope_theta", 0), ConfigError, "rope_theta must be a finite number > 0"),
    ("config-rope-theta-negative", set_config("rope_theta", -10000.0), ConfigError,
     "rope_theta must be a finite number > 0"),
    ("config-rope-theta-string-nan", set_config("rope_theta", "NaN"), ConfigError,
     "rope_theta must be a finite number > 0"),
    ("config-rope-theta-json-nan", edit_config(lambda r: json.dumps(r | {"rope_theta": float("nan")})),
     ConfigError, "NaN is not a JSON number"),
    ("config-rope-theta-json-inf", edit_config(lambda r: json.dumps(r).replace('"rope_theta": 10000.0',
                                                                               '"rope_theta": 1e400')),
     ConfigError, "is out of range"),
    ("config-rope-theta-bool", set_config("rope_theta", True), ConfigError, "rope_theta must be a finite number"),
    ("config-rms-norm-eps-zero", set_config("rms_norm_eps", 0), ConfigError,
     "rms_norm_eps must be a finite number > 0"),
    ("config-rms-norm-eps-negative", set_config("rms_norm_eps", -1e-5), ConfigError,
     "rms_norm_eps must be a finite number > 0"),
    ("config-sliding-window-bool", set_config("sliding_window", True), ConfigError,
     "sliding_window must be a positive integer or null"),
    ("config-sliding-window-zero", set_config("sliding_window", 0), ConfigError,
     "sliding_window must be a positive integer or null"),
    ("config-tie-string", set_config("tie_word_embeddings", "false"), ConfigError,
     "tie_word_embeddings must be true or false"),
    ("config-torch-dtype-int", set_config("torch_dtype", 16), ConfigError, "torch_dtype must be one of"),
    ("config-torch-dtype-unknown", set_config("torch_dtype", "int4"), ConfigError, "torch_dtype must be one of"),
    ("config-model-type-list", set_config("model_type", ["mistral"]), ConfigError, "unsupported model_type"),
    ("config-not-object", config_text("[1, 2, 3]"), ConfigError, "expected a JSON object, got list"),
    ("config-deeply-nested", config_text(DEEP), ConfigError, "nested too deeply"),
    ("config-duplicate-key", edit_config(lambda r: json.dumps(r)[:-1] + ', "vocab_size": 7}'), ConfigError,
     "'vocab_size' appears twice"),
    ("config-not-utf8", lambda f: (f / "config.json").write_bytes(b'{"vocab_size": "\xff"}'), ConfigError,
     "not valid JSON"),
    ("config-is-a-folder", lambda f: ((f / "config.json").unlink(), (f / "config.json").mkdir()), ConfigError,
     "is a folder, not a regular file"),
]

# Hangs, before: open() on a FIFO blocks; 10^7 layers took minutes to build on the meta device.
CASES += [
    ("fifo-model-safetensors", fifo("model.safetensors"), CheckpointError, "is a FIFO, not a regular file"),
    ("fifo-config", fifo("config.json"), ConfigError, "is a FIFO, not a regular file"),
    ("fifo-pytorch-model-bin", fifo_bin, CheckpointError, "is a FIFO, not a regular file"),
    ("fifo-index", fifo_index, CheckpointError, "is a FIFO, not a regular file"),
    ("config-ten-million-layers", set_config("num_hidden_layers", 10**7), CheckpointError,
     "config.json says num_hidden_layers 10000000 but the weights hold only 2"),
    ("config-three-layers", set_config("num_hidden_layers", 3), CheckpointError,
     "says num_hidden_layers 3 but the weights hold only 2"),
]


@pytest.mark.parametrize("change, error, fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_checkpoint_is_one_line_error(folder, alarm, change, error, fragment):
    change(folder)
    with pytest.raises(error) as info:
        komt.load_model(folder)
    message = str(info.value)
    assert fragment in message, message
    assert "\n" not in message and len(message) < 400, message


def test_case_ids_are_unique():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids))


# ---- decisions that load --------------------------------------------------------------------------------

def test_symlinked_shards_pointing_outside_the_folder_load(folder, tmp_path):
    """The Hugging Face cache's snapshot files are symlinks into ../../blobs: the folder's own entries may
    point anywhere (its owner put them there); only the names an index writes must stay inside."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (folder / "model.safetensors").rename(blobs / "0123abcd")
    (folder / "model.safetensors").symlink_to(blobs / "0123abcd")
    expected = load_file(FIXTURES / "tiny-mistral" / "expected.safetensors")
    with torch.no_grad():
        logits = komt.load_model(folder)(expected["input_ids"])
    torch.testing.assert_close(logits, expected["logits"], atol=1e-4, rtol=0)


def test_eos_list_takes_the_first_and_null_ids_take_the_defaults(folder):
    set_config("eos_token_id", [2, 7])(folder)
    assert komt.load_model(folder).config.eos_token_id == 2
    edit_config(lambda r: r.update(eos_token_id=None, bos_token_id=None, rope_scaling=None))(folder)
    config = komt.load_model(folder).config
    assert (config.bos_token_id, config.eos_token_id) == (1, 2)


# ---- the tokenizer against the model's vocabulary -----------------------------------------------------

def test_tokenizer_file_that_is_a_fifo_is_refused(tmp_path, alarm):
    os.mkfifo(tmp_path / "tokenizer.model")
    with pytest.raises(TokenizerError, match="is a FIFO, not a regular file"):
        komt.load_tokenizer(tmp_path)


def test_tokenizer_larger_than_the_embedding_is_refused_smaller_warns(capsys):
    from komt.generate.vocab import check_tokenizer_fits

    with pytest.raises(TokenizerError, match="has 32000 tokens but the model's embedding only 1024"):
        check_tokenizer_fits(32000, 1024, "tokenizer.model")
    check_tokenizer_fits(32000, 49152, "tokenizer.model")
    assert capsys.readouterr().err == (
        "komt: warning: tokenizer.model has 32000 tokens and the model's embedding 49152; if the output is "
        "garbled, the tokenizer belongs to another model (pass --tokenizer)\n")
    check_tokenizer_fits(32000, 32000)
    assert capsys.readouterr().err == ""


def _cli(args, timeout=60):
    return subprocess.run([sys.executable, "-m", "komt.generate", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)


def test_cli_refuses_a_tokenizer_larger_than_the_model(folder):
    """tiny-mistral's embedding has 1024 rows; Mistral's tokenizer has 32000 ids (garbage before, exit 0)."""
    result = _cli(["--model", str(folder), "--tokenizer", str(FIXTURES / "tokenizer"), "--prompt", "hi",
                   "--device", "cpu"])
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and "has 32000 tokens but the model's embedding only 1024" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_cli_fifo_checkpoint_is_an_error_not_a_hang(folder):
    fifo("model.safetensors")(folder)
    set_config("vocab_size", 32000)(folder)  # the real tokenizer's size: the FIFO is the only fault
    shutil.copy(FIXTURES / "tokenizer" / "tokenizer.model", folder / "tokenizer.model")
    result = _cli(["--model", str(folder), "--prompt", "hi", "--device", "cpu", "--max-new-tokens", "3"])
    assert result.returncode == 2
    assert result.stderr == f"error: {folder / 'model.safetensors'}: is a FIFO, not a regular file; pass the real file\n"
