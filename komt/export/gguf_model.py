"""Export a Hugging Face-format checkpoint folder as a GGUF model that llama.cpp loads.

Which type each tensor gets follows llama.cpp's own tools for the requested type:

- f32 / f16 / bf16 / q8_0: convert_hf_to_gguf.py (`--outtype`). 1-D tensors and every `*_norm.weight` stay
  F32; every other weight, token_embd and output included, takes the requested type; a row that is not a
  whole number of Q8_0 blocks (32) falls back to F16, as the converter's QuantError fallback does.
- q4_0: the converter cannot write it; llama.cpp makes it with `llama-quantize ... Q4_0` from an f16/f32
  file. That tool keeps norms F32, writes the 2-D weights Q4_0, falls back to F16 for rows not a multiple
  of 32, and gives output.weight (and token_embd when the model ties them) more bits: Q6_K, or Q8_0
  when the row is not a multiple of 256. komt writes no K-quants, so that tensor is Q8_0 here
  (byte-identical to llama-quantize's for rows not a multiple of 256, one step more precise otherwise).

q/k weights are permuted into llama.cpp's RoPE row order (`names.to_gguf_rows`) before they are encoded.
Tensors are read from the checkpoint's memory map and encoded one at a time while the file is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from komt.errors import CheckpointError, ConfigError
from komt.export.tokenizer import tokenizer_metadata
from komt.model.checkpoint import iter_state
from komt.model.config import ModelConfig
from komt.model.gguf.config import metadata_from_config
from komt.model.gguf.constants import TENSOR_TYPES_BY_NAME
from komt.model.gguf.names import gguf_name, parameter_shapes, rope_heads, to_gguf_rows
from komt.model.gguf.quantize import quantize
from komt.model.gguf.writer import TensorToWrite, write_gguf

EXPORT_TYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0"}
_SKIPPED_SUFFIXES = (".rotary_emb.inv_freq",)  # recomputed, never learned (old Llama exports carry it)


def tensor_type(name: str, shape: tuple[int, ...], export_type: str, tied: bool) -> str:
    """The GGUF type llama.cpp's tools give tensor `name` (a llama.cpp name) for `export_type` (module docstring)."""
    if len(shape) <= 1 or name.endswith("_norm.weight"):
        return "F32"
    wanted = EXPORT_TYPES[export_type]
    if export_type == "q4_0" and (name == "output.weight" or (tied and name == "token_embd.weight")):
        wanted = "Q8_0"
    if shape[-1] % TENSOR_TYPES_BY_NAME[wanted].block_size:
        return "F16"
    return wanted


def encoder(value: torch.Tensor, type_name: str, n_rope_heads: int | None) -> Callable[[], torch.Tensor]:
    """A callable giving the tensor's GGUF bytes, computed only when the writer reaches it."""

    def encode() -> torch.Tensor:
        x = value
        if n_rope_heads is not None:
            x = to_gguf_rows(x, n_rope_heads)
        return quantize(x, type_name)

    return encode


def export_gguf(src: str | Path, out: str | Path, export_type: str = "f16", tokenizer: str | Path | None = None,
                name: str | None = None) -> list[tuple[str, str]]:
    """Write the checkpoint in `src` to `out` as GGUF; returns [(gguf tensor name, type)] in file order."""
    src = Path(src)
    if export_type not in EXPORT_TYPES:
        raise ConfigError(f"unknown GGUF type {export_type!r}; use one of {', '.join(EXPORT_TYPES)}")
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a checkpoint folder")
    config = ModelConfig.from_file(src / "config.json")
    expected = parameter_shapes(config)
    tensors: list[TensorToWrite] = []
    seen: set[str] = set()
    for hf, value in iter_state(src):
        if hf.endswith(_SKIPPED_SUFFIXES) or (config.tie_word_embeddings and hf == "lm_head.weight"):
            continue
        if hf not in expected:
            raise CheckpointError(f"{src}: tensor {hf!r} is not a parameter of this {config.model_type} model")
        if tuple(value.shape) != expected[hf]:
            raise CheckpointError(f"{src}: tensor {hf!r} has shape {tuple(value.shape)}, expected {expected[hf]}")
        if not value.is_floating_point():
            raise CheckpointError(f"{src}: tensor {hf!r} is {value.dtype}; export takes float checkpoints "
                                  "(a quantized komt checkpoint cannot be exported yet)")
        gguf = gguf_name(hf)
        ttype = tensor_type(gguf, tuple(value.shape), export_type, config.tie_word_embeddings)
        tensors.append(TensorToWrite(gguf, tuple(value.shape), ttype, encoder(value, ttype, rope_heads(hf, config))))
        seen.add(hf)
    missing = sorted(set(expected) - seen)
    if missing:
        raise CheckpointError(f"{src}: missing tensor {missing[0]!r} ({len(missing)} missing)")
    metadata = metadata_from_config(config, name or src.resolve().name, EXPORT_TYPES[export_type])
    metadata.update(tokenizer_metadata(src, config, Path(tokenizer) if tokenizer else None))
    write_gguf(out, metadata, tensors)
    return [(t.name, t.type_name) for t in tensors]
