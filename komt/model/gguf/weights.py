"""A GGUF file as komt's model: its `ModelConfig`, its metadata, and its weights under Hugging Face names.

`read_gguf_weights` is what `load_model("x.gguf")` calls. It yields one tensor at a time from the memory
map, already in Hugging Face layout ([O, I] weights, q/k rows in HF's RoPE order), as either

- a dense tensor: F32 / F16 / BF16 tensors (a zero-copy view of the map when the dtype already matches and
  no permutation applies) and every type without an exact canonical form, dequantized to `dtype`;
- a `QuantizedTensor` (QUANT_SPEC.md) for Q8_0 (int8, g 32) and Q4_0 / Q4_1 (int4, g 32): the file's own
  scales and quants, re-laid out, never requantized. `keep_quantized=False` dequantizes them too.

The q/k permutation moves whole rows, so it is applied to the block bytes before either path (no
dequantize-permute-requantize round). `rope_freqs.weight` (Llama-3 RoPE scaling factors) has no HF
parameter: it is skipped when every factor is 1 and is a ConfigError otherwise, since komt's RoPE
has no scaling.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import torch

from komt.errors import CheckpointError, ConfigError
from komt.model.config import ModelConfig
from komt.model.gguf.canonical import CANONICAL_TYPES, QuantizedTensor, from_gguf
from komt.model.gguf.config import config_from_metadata
from komt.model.gguf.names import IGNORED, from_gguf_rows, hf_name, parameter_shapes, rope_heads
from komt.model.gguf.quants import dequantize
from komt.model.gguf.reader import GGUFFile, TensorInfo

_FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

GGUFValue = torch.Tensor | QuantizedTensor


def read_gguf_config(gguf: GGUFFile) -> ModelConfig:
    """The ModelConfig of an opened file (vocab from token_embd, tied when output.weight is absent)."""
    if gguf.metadata.get("general.type") == "adapter":
        raise CheckpointError(f"{gguf.path}: is a LoRA adapter GGUF (general.type = adapter), not a model")
    embed = gguf.tensors.get("token_embd.weight")
    if embed is None or len(embed.dims) != 2:
        raise CheckpointError(f"{gguf.path}: no 2-D token_embd.weight (not a llama.cpp language model)")
    return config_from_metadata(gguf.metadata, vocab_size=embed.dims[1],
                                tied="output.weight" not in gguf.tensors, source=str(gguf.path))


def read_gguf_weights(
    path: str | os.PathLike, dtype: torch.dtype | None = None, keep_quantized: bool = True
) -> tuple[ModelConfig, dict[str, Any], Iterator[tuple[str, GGUFValue]]]:
    """(config, metadata, iterator of (hf_name, dense tensor | QuantizedTensor)) of a GGUF model file.

    `dtype` is the dtype of dense values (None: the config's `torch_dtype`, i.e. the file's float type,
    float32 for quantized files). The file's header, names and shapes are all checked before this returns;
    the iterator reads tensor data lazily, one at a time.
    """
    gguf = GGUFFile(path)
    config = read_gguf_config(gguf)
    dtype = dtype or getattr(torch, config.torch_dtype)
    expected = parameter_shapes(config)
    names: list[tuple[str, TensorInfo]] = []
    for info in gguf.tensors.values():
        if info.name in IGNORED:
            _check_ignored(gguf, info)
            continue
        hf = hf_name(info.name)
        if hf not in expected:
            raise CheckpointError(f"{gguf.path}: tensor {info.name!r} does not belong to a {config.num_hidden_layers}-layer model")
        if info.shape != expected[hf]:
            raise CheckpointError(f"{gguf.path}: tensor {info.name!r} has shape {info.shape}, expected {expected[hf]}")
        names.append((hf, info))
    missing = set(expected) - {hf for hf, _ in names}
    if missing:
        raise CheckpointError(f"{gguf.path}: missing tensor {sorted(missing)[0]!r} ({len(missing)} missing)")
    return config, gguf.metadata, _iter_values(gguf, config, names, dtype, keep_quantized)


def _iter_values(gguf: GGUFFile, config: ModelConfig, names: list[tuple[str, TensorInfo]],
                 dtype: torch.dtype, keep_quantized: bool) -> Iterator[tuple[str, GGUFValue]]:
    for hf, info in names:
        yield hf, tensor_value(gguf, info, rope_heads(hf, config), dtype, keep_quantized)


def tensor_value(gguf: GGUFFile, info: TensorInfo, n_rope_heads: int | None, dtype: torch.dtype,
                 keep_quantized: bool = True) -> GGUFValue:
    """One tensor as komt uses it: rows un-permuted if it is q/k (`n_rope_heads`), then dense or canonical."""
    name = info.type.name
    if name in _FLOATS and n_rope_heads is None:
        view = gguf.float_tensor(info.name)
        value = view.to(dtype)
        if value.data_ptr() != view.data_ptr():
            gguf.release(info.name)
        return value
    raw = gguf.raw(info.name)  # uint8 [rows..., row_bytes]
    if n_rope_heads is not None:
        raw = from_gguf_rows(raw, n_rope_heads)  # a copy: the map stays as the file has it
    if keep_quantized and name in CANONICAL_TYPES:
        value: GGUFValue = from_gguf(raw, name)
    else:
        value = dequantize(raw, info.type, dtype)
    gguf.release(info.name)
    return value


def _check_ignored(gguf: GGUFFile, info: TensorInfo) -> None:
    factors = dequantize(gguf.raw(info.name), info.type)
    if not torch.all(factors == 1):
        raise ConfigError(f"{gguf.path}: {info.name} holds Llama-3 RoPE scaling factors, which komt does not "
                          "implement (only plain RoPE)")
