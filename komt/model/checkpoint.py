"""Load a Hugging Face checkpoint folder (config.json + weights) into a `Transformer`.

Weights come in four layouts, all read here:

    model.safetensors                                         one file
    model-00001-of-00003.safetensors ... + model.safetensors.index.json
    pytorch_model.bin                                         one pickle (2023 transformers default)
    pytorch_model-00001-of-00002.bin ... + pytorch_model.bin.index.json   (komt-mistral-7b-v1 ships this)

Memory: the module is built on the meta device (no storage), then each tensor goes from a memory map
straight to its target device and dtype and is set into the module; a tensor already in the target
dtype on the CPU is used in place (zero copy). So a 14.5 GB bf16 checkpoint loads with peak RSS close to
14.5 GB. Pickles are read with `torch.load(weights_only=True, mmap=True)`: no arbitrary code runs.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from komt.errors import CheckpointError, ConfigError
from komt.model.config import ModelConfig
from komt.model.linear import replace_module
from komt.model.quantized_linear import QuantizedLinear, QuantizeSpec, empty_quantized, quantize_linears
from komt.model.safetensors_file import SafetensorsFile
from komt.model.transformer import Transformer

DTYPES_BY_NAME = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}

# Tensors some checkpoints carry that are recomputed, not learned (old Llama exports saved RoPE's inv_freq).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)

ProgressFn = Callable[[int, int], None]  # (bytes done, bytes total)


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """`"bf16"` / `"bfloat16"` / `torch.bfloat16` -> torch.bfloat16; None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES_BY_NAME[dtype.lower()]
    except KeyError:
        raise ConfigError(f"unknown dtype {dtype!r}; use fp32, bf16 or fp16") from None


class ShardReader:
    """Tensors of one shard, viewed without copying: a safetensors memory map or an mmap'd pickle."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._st: SafetensorsFile | None = None
        self._state: dict[str, torch.Tensor] | None = None
        if path.suffix == ".safetensors":
            self._st = SafetensorsFile(path)
        else:
            self._state = _torch_load(path)

    def names(self) -> list[str]:
        return self._st.keys() if self._st is not None else list(self._state)

    def tensor(self, name: str) -> torch.Tensor:
        return self._st.tensor(name) if self._st is not None else self._state[name]

    def release(self, name: str) -> None:
        if self._st is not None:
            self._st.release(name)


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: unreadable or corrupt PyTorch checkpoint: {first_line}") from None
    except Exception as err:  # weights_only refuses pickles with code: pickle.UnpicklingError and kin
        raise CheckpointError(f"{path}: refused to load (not a plain tensor pickle): {type(err).__name__}") from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors (a state_dict)")
    return state


def find_weight_shards(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder, preferring safetensors over pickles."""
    for index_name, single_name in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index_path = folder / index_name
        if index_path.exists():
            return _shards_from_index(index_path)
        single = folder / single_name
        if single.exists():
            return [single]
    raise CheckpointError(
        f"{folder}: no weights (expected model.safetensors, model.safetensors.index.json, "
        "pytorch_model.bin or pytorch_model.bin.index.json)"
    )


def _shards_from_index(index_path: Path) -> list[Path]:
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(f"{index_path}: unreadable index (expected a JSON object with 'weight_map')") from None
    shards = []
    for filename in sorted(set(weight_map.values())):
        path = index_path.parent / filename
        if not path.exists():
            raise CheckpointError(f"{index_path}: shard {filename} is missing from {index_path.parent}")
        shards.append(path)
    return shards


def build_empty_model(config: ModelConfig) -> Transformer:
    """The module with every parameter on the meta device: shapes and names, no memory."""
    with torch.device("meta"):
        return Transformer(config)


def random_model(config: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int = 0,
                 quantize: QuantizeSpec | None = None) -> Transformer:
    """A model of `config` with random weights (N(0, 0.02), norms 1), for benchmarks and tests.

    Built on the meta device and allocated once, straight on `device` in `dtype`, so the 7B shape never
    exists twice (no fp32 or CPU copy first). With `quantize`, each linear layer's random weight is made
    and quantized one layer at a time, so peak memory is the quantized model's (the 7B shape in int4 fits
    in ~4 GB). Frozen (requires_grad False) and in eval mode, like a loaded one.
    """
    model = build_empty_model(config).to(dtype)
    generator = torch.Generator(device=device).manual_seed(seed)

    def random_weight(_name: str, linear: nn.Linear) -> torch.Tensor:
        w = torch.empty(linear.out_features, linear.in_features, device=device, dtype=dtype)
        return w.normal_(0.0, 0.02, generator=generator)

    if quantize is not None:
        quantize_linears(model, quantize, random_weight)
    else:
        model.to_empty(device=device)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight  # to_empty made them two tensors
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.is_meta:  # what quantize_linears left: embeddings and norms
                param = nn.Parameter(torch.empty_like(param, device=device), requires_grad=False)
                _set_parameter(model, name, param)
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif param.dtype.is_floating_point and not isinstance(model.get_submodule(name.rpartition(".")[0]), QuantizedLinear):
                param.normal_(0.0, 0.02, generator=generator)
    return model.eval().requires_grad_(False)


def load_weights(
    model: Transformer,
    shards: list[Path],
    device: torch.device,
    dtype: torch.dtype | None,
    progress: ProgressFn | None = None,
    quantize: QuantizeSpec | None = None,
) -> None:
    """Fill a meta-device model from checkpoint shards; every expected tensor must appear exactly once.

    With `quantize`, each linear layer's weight is quantized as it is read, straight from the memory map,
    and the layer becomes an Int8Linear / Int4Linear: peak memory stays near the quantized model's size
    plus one weight, never the full-precision model. Layers that the file already holds quantized
    (`swap_in_quantized_layers`) keep their stored integers and scales unchanged.
    """
    expected = dict(model.named_parameters(remove_duplicate=True))
    # A tied head is the embedding, unless the file stores it quantized (a layer of its own).
    tied = model.config.tie_word_embeddings and not isinstance(model.lm_head, QuantizedLinear)
    if tied:
        expected.pop("lm_head.weight", None)
    total = sum(shard.stat().st_size for shard in shards)
    done = 0
    loaded: set[str] = set()
    for shard in shards:
        reader = ShardReader(shard)
        for name in reader.names():
            if name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
                continue
            if name not in expected:
                raise CheckpointError(f"{shard}: unexpected tensor {name!r} (not a parameter of this model)")
            source = reader.tensor(name)
            want = tuple(expected[name].shape)
            if tuple(source.shape) != want:
                raise CheckpointError(
                    f"{shard}: tensor {name!r} has shape {tuple(source.shape)}, expected {want}"
                )
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name)
            if isinstance(module, QuantizedLinear):  # stored quantized: integers and fp16 scales as they are
                if source.dtype != expected[name].dtype:
                    raise CheckpointError(f"{shard}: quantized tensor {name!r} is {source.dtype}, "
                                          f"expected {expected[name].dtype}")
                value = source.to(device=device)
            elif quantize is not None and attr == "weight" and type(module) is nn.Linear:
                replace_module(model, module_name, quantize.layer(module_name, source.to(device=device)))
                value = None
            else:
                value = source.to(device=device, dtype=dtype or _checkpoint_dtype(model.config, source))
            if value is None or value.data_ptr() != source.data_ptr():
                reader.release(name)  # copied: the mapped pages are no longer needed
            if value is not None:
                _set_parameter(model, name, value)
            loaded.add(name)
            done += source.numel() * source.element_size()
            if progress is not None:
                progress(min(done, total), total)
        del reader
    missing = [name for name in expected if name not in loaded]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"checkpoint is missing tensor {missing[0]!r}{more}")
    if tied and quantize is not None:  # the embedding stays dense (a lookup); the head gets its own copy
        model.lm_head = quantize.layer("lm_head", model.model.embed_tokens.weight)
    elif tied:
        model.lm_head.weight = model.model.embed_tokens.weight


def swap_in_quantized_layers(model: Transformer, shards: list[Path]) -> int:
    """Give every layer that the checkpoint stores quantized (it has `<name>.scales`) an empty
    Int8Linear / Int4Linear of the stored shapes (meta device), so `load_weights` fills it as stored.

    int8 vs int4 is read from the stored weight's dtype (int8 / uint8), the group from the scales' shape.
    Only safetensors shards can hold quantized layers (komt.quantize writes safetensors).
    """
    count = 0
    for shard in shards:
        if shard.suffix != ".safetensors":
            continue
        reader = ShardReader(shard)
        names = set(reader.names())
        for name in sorted(n for n in names if n.endswith(".scales")):
            module_name = name.removesuffix(".scales")
            weight_name = module_name + ".weight"
            try:
                module = model.get_submodule(module_name)
            except AttributeError:
                raise CheckpointError(f"{shard}: {name!r} belongs to no layer of this model") from None
            if weight_name not in names or type(module) is not nn.Linear:
                raise CheckpointError(f"{shard}: {name!r} has no quantized weight {weight_name!r} beside it")
            weight, scales = reader.tensor(weight_name), reader.tensor(name)
            method = {torch.int8: "int8", torch.uint8: "int4"}.get(weight.dtype)
            if method is None or scales.dim() != 2 or scales.shape[1] == 0 or scales.dtype != torch.float16:
                raise CheckpointError(f"{shard}: {weight_name!r} ({weight.dtype}) with {name!r} "
                                      f"({scales.dtype}, {tuple(scales.shape)}) is not an int8/int4 layer")
            group = module.in_features // scales.shape[1]
            if method == "int4" and module_name + ".offsets" not in names:
                raise CheckpointError(f"{shard}: int4 layer {module_name!r} has no {module_name}.offsets")
            replace_module(model, module_name, empty_quantized(method, module.out_features, module.in_features,
                                                               group, device="meta"))
            count += 1
    return count


def _checkpoint_dtype(config: ModelConfig, tensor: torch.Tensor) -> torch.dtype:
    """Keep the checkpoint's dtype; the config's `torch_dtype` decides when the file mixes dtypes."""
    declared = DTYPES_BY_NAME.get(str(config.torch_dtype).replace("torch.", ""))
    return declared or tensor.dtype


def _set_parameter(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    setattr(module, attr, value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=False))


def load_checkpoint(
    folder: Path,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    progress: ProgressFn | None = None,
    quantize: QuantizeSpec | None = None,
) -> Transformer:
    """config.json + weights in `folder` -> a Transformer in eval mode on `device`."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder")
    config = ModelConfig.from_file(folder / "config.json")
    shards = find_weight_shards(folder)
    model = build_empty_model(config)
    if swap_in_quantized_layers(model, shards) and quantize is not None:
        raise ConfigError(f"{folder}: the checkpoint is already quantized; load it without quantize=")
    load_weights(model, shards, torch.device(device or "cpu"), parse_dtype(dtype), progress, quantize)
    return model.eval()


def iter_state(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a checkpoint folder, shard by shard, as zero-copy views (for conversion/merging)."""
    for shard in find_weight_shards(folder):
        reader = ShardReader(shard)
        for name in reader.names():
            yield name, reader.tensor(name)
