"""A GGUF file (llama.cpp's format) -> a `Transformer`, through the same layer variants as any checkpoint.

    read_gguf_weights (komt.model.gguf): config, metadata, then one (HF name, value) at a time
        Q8_0            -> Int8Linear, groups of 32        exactly the file's integers and scales
        Q4_0 / Q4_1     -> Int4Linear, groups of 32        exactly (offset -8 d, or m)
        anything else   -> a dense tensor in `dtype`       (F16, BF16, Q5_x, K-quants: dequantized)

With `quantize=`, dense linear weights are quantized as they are read, and stored records whose kind and
group do not match the request are requantized from their dequantized values (e.g. Q8_0's groups of 32
to per-channel int8, which PyTorch's CPU int8 kernel needs); records that match are kept. The embedding is
always dense (a lookup reads one row); a tied head is built from the same tensor as its own layer, so in a
Q4_1 file it stays Q4_1. The model remembers its file (`source_path`): `komt.load_tokenizer` reads the
vocabulary from the same metadata.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from komt.model.checkpoint import ProgressFn, _set_parameter, build_empty_model
from komt.model.gguf import QuantizedTensor, read_gguf_weights
from komt.model.linear import replace_module
from komt.model.quantized_linear import Int4Linear, Int8Linear, QuantizedLinear, QuantizeSpec
from komt.model.transformer import Transformer

EMBEDDING = "model.embed_tokens.weight"


def is_gguf(path: str | Path) -> bool:
    path = Path(path)
    return path.suffix.lower() == ".gguf" and not path.is_dir()


def layer_from_record(record: QuantizedTensor, device: torch.device) -> QuantizedLinear:
    """The quantized layer holding `record`'s tensors unchanged."""
    if record.kind == "int8":
        return Int8Linear(record.weight.to(device), record.scales.to(device))
    return Int4Linear(record.weight.to(device), record.scales.to(device), record.offsets.to(device))


def _keeps(spec: QuantizeSpec | None, record: QuantizedTensor, head: bool) -> bool:
    """Keep a stored record as it is? Always without `quantize=`; with it, when kind and group match."""
    if spec is None:
        return True
    method, group = ("int8", None) if head else (spec.method, spec.group_size)
    group = group or (record.shape[1] if method == "int8" else 32)
    return record.kind == method and record.group_size == group


def _linear_from(name: str, value, spec: QuantizeSpec | None, device: torch.device,
                 dtype: torch.dtype | None) -> nn.Module | None:
    """The layer for a linear weight value; None: keep the plain nn.Linear and set its weight."""
    module_name = name.removesuffix(".weight")
    if isinstance(value, QuantizedTensor):
        if _keeps(spec, value, head=module_name == "lm_head"):
            return layer_from_record(value, device)
        value = value.dequantize(torch.float32)
    if spec is not None:
        return spec.layer(module_name, value.to(device))
    return None


def load_gguf_model(path: str | Path, device: torch.device, dtype: torch.dtype | None = None,
                    quantize: QuantizeSpec | None = None, progress: ProgressFn | None = None) -> Transformer:
    """Build the model of a GGUF file on `device` (see module docstring); eval mode, frozen."""
    path = Path(path)
    config, _metadata, values = read_gguf_weights(path, dtype=dtype, keep_quantized=True)
    model = build_empty_model(config)
    total, done = path.stat().st_size, 0
    for name, value in values:
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if name == EMBEDDING:
            dense = value.dequantize(dtype or torch.float32) if isinstance(value, QuantizedTensor) else value
            _set_parameter(model, name, dense.to(device))
            if config.tie_word_embeddings:  # the head: the same tensor as a layer of its own (or the same one)
                head = _linear_from("lm_head.weight", value, quantize, device, dtype)
                if head is None:
                    model.lm_head.weight = model.model.embed_tokens.weight
                else:
                    model.lm_head = head
        elif type(module) is nn.Linear and attr == "weight":
            layer = _linear_from(name, value, quantize, device, dtype)
            if layer is None:
                _set_parameter(model, name, value.to(device))
            else:
                replace_module(model, module_name, layer)
        else:
            _set_parameter(model, name, value.to(device))
        done += _nbytes(value)
        if progress is not None:
            progress(min(done, total), total)
    return model.eval().requires_grad_(False)


def _nbytes(value) -> int:
    tensors = [value.weight, value.scales, value.offsets] if isinstance(value, QuantizedTensor) else [value]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)
