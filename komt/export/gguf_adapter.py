"""Export a komt/PEFT LoRA adapter as llama.cpp's LoRA GGUF, so `llama-server --lora` applies it.

The format is what convert_lora_to_gguf.py writes (and llama-adapter.cpp checks):

    general.architecture = "llama", general.type = "adapter", adapter.type = "lora",
    adapter.lora.alpha (float32): llama.cpp scales the update by alpha / r
    <base tensor>.lora_a   A [r, I]   (e.g. blk.0.attn_q.weight.lora_a)
    <base tensor>.lora_b   B [O, r]

For q/k the base weight is row-permuted for llama.cpp's RoPE (names.py); the update B A must be too, and
a row permutation of B A is the same permutation of B's rows (the converter's LoraTorchTensor permutes
B and leaves A). With rsLoRA (scale alpha / sqrt(r)) the written alpha is alpha * sqrt(r), so llama.cpp's
alpha / r is the scale komt trained with (the converter writes lora_alpha as is and ignores use_rslora).

Types as the converter's `--outtype` f32 (its default) / f16 / bf16 / q8_0, with its F16 fallback for
rows that are not whole Q8_0 blocks (B's rows are r long, so B is F16 under q8_0 for r < 32).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from komt.errors import CheckpointError, ConfigError
from komt.export.gguf_model import encoder
from komt.model.config import ModelConfig
from komt.model.gguf.constants import FILE_TYPES, QUANTIZATION_VERSION, TENSOR_TYPES_BY_NAME
from komt.model.gguf.names import gguf_name, parameter_shapes, rope_heads
from komt.model.gguf.writer import TensorToWrite, write_gguf
from komt.model.lora import read_adapter_config, read_adapter_weights

ADAPTER_TYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}
# A PEFT key of one LoRA matrix: optional PEFT prefix, the module, lora_A/B, an optional adapter name.
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.default)?\.weight$")


def _matrix_type(shape: tuple[int, ...], export_type: str) -> str:
    wanted = ADAPTER_TYPES[export_type]
    return "F16" if shape[-1] % TENSOR_TYPES_BY_NAME[wanted].block_size else wanted


def export_adapter_gguf(base: str | Path, adapter: str | Path, out: str | Path, export_type: str = "f32",
                        name: str | None = None) -> list[tuple[str, str]]:
    """Write the adapter folder `adapter` (for the base checkpoint `base`) to `out`; returns [(name, type)]."""
    base, adapter = Path(base), Path(adapter)
    if export_type not in ADAPTER_TYPES:
        raise ConfigError(f"adapter GGUF type {export_type!r} is not available; use one of "
                          f"{', '.join(ADAPTER_TYPES)} (what llama.cpp's convert_lora_to_gguf.py writes)")
    if not adapter.is_dir():
        raise CheckpointError(f"{adapter}: adapter is not a folder")
    config = ModelConfig.from_file(base / "config.json")
    lora = read_adapter_config(adapter)
    path, weights = read_adapter_weights(adapter)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        match = _KEY.match(key)
        if match is None:
            raise CheckpointError(f"{path}: tensor {key!r} is not a LoRA A/B matrix of a linear layer")
        pairs.setdefault(match["module"], {})[match["which"]] = tensor
    if not pairs:
        raise CheckpointError(f"{path}: holds no LoRA tensors")
    shapes = parameter_shapes(config)
    tensors: list[TensorToWrite] = []
    for module, pair in pairs.items():
        hf = f"{module}.weight"
        if hf == "lm_head.weight" and config.tie_word_embeddings:
            raise CheckpointError(f"{path}: the adapter targets lm_head, which this model ties to the embeddings "
                                  "(llama.cpp cannot apply it)")
        if hf not in shapes or len(shapes[hf]) != 2:
            raise CheckpointError(f"{path}: LoRA module {module!r} is not a linear layer of the base model")
        if set(pair) != {"A", "B"}:
            raise CheckpointError(f"{path}: {module!r} has no lora_{({'A', 'B'} - set(pair)).pop()} tensor")
        out_features, in_features = shapes[hf]
        for which, want in (("A", (lora.r, in_features)), ("B", (out_features, lora.r))):
            if tuple(pair[which].shape) != want:
                raise CheckpointError(f"{path}: {module}.lora_{which} has shape {tuple(pair[which].shape)}, "
                                      f"expected {want} (r={lora.r})")
        target = gguf_name(hf)
        a, b = pair["A"], pair["B"]
        a_type, b_type = _matrix_type(tuple(a.shape), export_type), _matrix_type(tuple(b.shape), export_type)
        tensors.append(TensorToWrite(f"{target}.lora_a", tuple(a.shape), a_type, encoder(a, a_type, None)))
        tensors.append(TensorToWrite(f"{target}.lora_b", tuple(b.shape), b_type, encoder(b, b_type, rope_heads(hf, config))))
    metadata = {
        "general.architecture": "llama",
        "general.type": "adapter",
        "general.name": name or adapter.resolve().name,
        "adapter.type": "lora",
        "adapter.lora.alpha": float(lora.scale * lora.r),  # llama.cpp applies alpha / r
        "general.file_type": FILE_TYPES[ADAPTER_TYPES[export_type]],
        "general.quantization_version": QUANTIZATION_VERSION,
    }
    write_gguf(out, metadata, tensors)
    return [(t.name, t.type_name) for t in tensors]
