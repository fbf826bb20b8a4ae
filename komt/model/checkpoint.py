"""Load a Hugging Face checkpoint folder (config.json + weights) into a `Transformer`.

Weights come in four layouts, all read here:

    model.safetensors                                         one file
    model-00001-of-00003.safetensors ... + model.safetensors.index.json
    pytorch_model.bin                                         one pickle (2023 transformers default)
    pytorch_model-00001-of-00002.bin ... + pytorch_model.bin.index.json   (komt-mistral-7b-v1 ships this)

Checks come before memory: the config, the shard names of an index (inside the folder), every header
(names, shapes, dtypes, byte ranges) and the layer count are validated before the model is built, so a
broken or hostile checkpoint is a one-line `CheckpointError` or `ConfigError` before anything is allocated.

Dtype: `dtype=None` keeps the tensors' own dtype; only a file that mixes dtypes is converted, to the
config's `torch_dtype` (float32 when the config declares none). See `checkpoint_dtype`.

Memory: the module is built on the meta device (no storage), then each tensor goes from a memory map
straight to its target device and dtype and is set into the module; a tensor already in the target
dtype on the CPU is used in place (zero copy). So a 14.5 GB bf16 checkpoint loads with peak RSS close to
14.5 GB. Pickles are read with `torch.load(weights_only=True, mmap=True)`: no arbitrary code runs.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from komt.errors import CheckpointError, ConfigError
from komt.jsonutil import read_json, require_regular_file
from komt.model.config import ModelConfig
from komt.model.dtypes import DTYPES_BY_NAME, parse_dtype
from komt.model.linear import replace_module
from komt.model.quantized_linear import QuantizedLinear, QuantizeSpec, empty_quantized, quantize_linears
from komt.model.safetensors_file import SafetensorsFile
from komt.model.transformer import Transformer

# Tensors some checkpoints carry that are recomputed, not learned (old Llama exports saved RoPE's inv_freq).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
_LAYER = re.compile(r"model\.layers\.(\d+)\.")

ProgressFn = Callable[[int, int], None]  # (bytes done, bytes total)


class ShardReader:
    """Tensors of one shard, viewed without copying: a safetensors memory map or an mmap'd pickle.

    Opening reads only the header (safetensors) or maps the pickle: names, shapes and dtypes are known
    before a single weight byte is read or allocated.
    """

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

    def shape(self, name: str) -> tuple[int, ...]:
        return self._st.shape(name) if self._st is not None else tuple(self._state[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._st.dtype(name) if self._st is not None else self._state[name].dtype

    def tensor(self, name: str) -> torch.Tensor:
        return self._st.tensor(name) if self._st is not None else self._state[name]

    def release(self, name: str) -> None:
        if self._st is not None:
            self._st.release(name)

    def close(self) -> None:
        """Forget the mapping (tensors still viewing it keep it alive)."""
        self._st, self._state = None, None


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    try:
        require_regular_file(path, CheckpointError)  # a FIFO would block in open
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: unreadable or corrupt PyTorch checkpoint: {first_line}") from None
    except CheckpointError:
        raise
    except Exception as err:  # weights_only refuses pickles with code: pickle.UnpicklingError and kin
        raise CheckpointError(f"{path}: refused to load (not a plain tensor pickle): {type(err).__name__}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(t, torch.Tensor)
                                              for k, t in state.items()):
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
            return _shards_from_index(index_path, Path(single_name).suffix)
        single = folder / single_name
        if single.exists():
            return [single]
    raise CheckpointError(
        f"{folder}: no weights (expected model.safetensors, model.safetensors.index.json, "
        "pytorch_model.bin or pytorch_model.bin.index.json)"
    )


def _shards_from_index(index_path: Path, suffix: str) -> list[Path]:
    """The shard files an index names, each a file of the index's own folder.

    A shard name is a relative path that stays inside the folder: no absolute path, no `..`. The files
    themselves may be symlinks (the Hugging Face cache's snapshot files link into `../../blobs/`): the
    folder's own entries are trusted as much as the folder, only the names written in the index are not.
    """
    index = read_json(index_path, CheckpointError)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_path}: unreadable index (expected a JSON object with a 'weight_map' object)")
    for name, filename in weight_map.items():
        if not isinstance(filename, str):
            raise CheckpointError(f"{index_path}: weight_map[{name!r:.80}] must be a file name, got {filename!r:.40}")
    shards = []
    for filename in sorted(set(weight_map.values())):
        parts = Path(filename).parts
        if not parts or Path(filename).is_absolute() or ".." in parts or "\\" in filename:
            raise CheckpointError(f"{index_path}: shard {filename!r:.80} is outside the checkpoint folder; "
                                  "an index may only name files beside it")
        if not filename.endswith(suffix):
            raise CheckpointError(f"{index_path}: shard {filename!r:.80} is not a {suffix} file")
        path = index_path.parent / filename
        if not path.exists():
            raise CheckpointError(f"{index_path}: shard {filename} is missing from {index_path.parent}")
        shards.append(path)
    if not shards:
        raise CheckpointError(f"{index_path}: the index lists no shards")
    return shards


def open_shards(shards: list[Path]) -> list[ShardReader]:
    """A reader per shard: headers only, nothing allocated yet."""
    return [ShardReader(shard) for shard in shards]


def check_layer_count(config: ModelConfig, readers: list[ShardReader]) -> None:
    """The config's layer count against the layers the files hold, before the model is built.

    Building is cheap for a real config but not for a hostile one: 10^7 layers on the meta device take
    minutes. The files' names settle it first (`model.layers.<i>.` for i in 0..L-1). Layers past the
    config's are left to `check_tensors`, which names the first unexpected tensor.
    """
    layers = {int(m.group(1)) for reader in readers for name in reader.names() if (m := _LAYER.match(name))}
    found = max(layers) + 1 if layers else 0
    if found < config.num_hidden_layers:
        where = readers[0].path.parent if readers else "the checkpoint"
        raise CheckpointError(f"{where}: config.json says num_hidden_layers {config.num_hidden_layers} but the "
                              f"weights hold only {found}; the config and the weights are of different models")


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


def _skipped(name: str, tied: bool) -> bool:
    return name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight")


def _head_is_tied(model: Transformer) -> bool:
    """A tied head is the embedding, unless the file stores it quantized (a layer of its own)."""
    return model.config.tie_word_embeddings and not isinstance(model.lm_head, QuantizedLinear)


def _quantized_names(model: Transformer) -> set[str]:
    """The parameter names of the layers the file stores quantized (integers and fp16 scales, kept as stored)."""
    return {f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, QuantizedLinear)
            for p, _ in m.named_parameters(recurse=False)}


def check_tensors(model: Transformer, readers: list[ShardReader]) -> None:
    """Every tensor of the files against the model's parameters, from the headers alone: each expected
    name exactly once across all shards, with its shape, and a floating-point dtype (the stored dtype
    exactly, for the tensors of a quantized layer)."""
    expected = dict(model.named_parameters(remove_duplicate=True))
    tied = _head_is_tied(model)
    if tied:
        expected.pop("lm_head.weight", None)
    quantized = _quantized_names(model)
    seen: dict[str, Path] = {}
    for reader in readers:
        for name in reader.names():
            if _skipped(name, tied):
                continue
            if name in seen:
                raise CheckpointError(f"{reader.path}: tensor {name!r} is also in {seen[name].name}; "
                                      "a tensor must be in exactly one shard")
            if name not in expected:
                raise CheckpointError(f"{reader.path}: unexpected tensor {name!r} (not a parameter of this model)")
            got, want = reader.shape(name), tuple(expected[name].shape)
            if got != want:
                raise CheckpointError(f"{reader.path}: tensor {name!r} has shape {got}, expected {want}")
            stored = reader.dtype(name)
            if name in quantized and stored != expected[name].dtype:
                raise CheckpointError(f"{reader.path}: quantized tensor {name!r} is {str(stored).removeprefix('torch.')}, "
                                      f"expected {str(expected[name].dtype).removeprefix('torch.')}")
            if name not in quantized and not stored.is_floating_point:
                raise CheckpointError(f"{reader.path}: tensor {name!r} is {str(stored).removeprefix('torch.')}; "
                                      "weights must be floating point (quantized layers store <name>.scales beside them)")
            seen[name] = reader.path
    missing = [name for name in expected if name not in seen]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"checkpoint is missing tensor {missing[0]!r}{more}")


def checkpoint_dtype(config: ModelConfig, readers: list[ShardReader], skip: set[str] = frozenset()) -> torch.dtype:
    """The dtype `dtype=None` loads in: the tensors' own when they all agree; when the files mix dtypes,
    the config's `torch_dtype` (float32 when the config declares none).

    The tensors decide, not the config: a bf16 file whose config lacks `torch_dtype` stays bf16. Tensors
    the loader skips (a saved RoPE `inv_freq`, often fp32 beside fp16 weights) and those of quantized
    layers (`skip`) do not count.
    """
    tied = config.tie_word_embeddings
    dtypes = {reader.dtype(name) for reader in readers for name in reader.names()
              if not _skipped(name, tied) and name not in skip}
    if len(dtypes) == 1:
        return dtypes.pop()
    return DTYPES_BY_NAME[config.torch_dtype]


def load_weights(
    model: Transformer,
    readers: list[ShardReader],
    device: torch.device,
    dtype: torch.dtype | None,
    progress: ProgressFn | None = None,
    quantize: QuantizeSpec | None = None,
) -> None:
    """Fill a meta-device model from checkpoint shards; every expected tensor must appear exactly once.

    All headers are checked first (`check_tensors`), so a bad checkpoint fails before a byte is copied.
    `dtype` None: see `checkpoint_dtype`. With `quantize`, each linear layer's weight is quantized as it is
    read, straight from the memory map, and the layer becomes an Int8Linear / Int4Linear: peak memory stays
    near the quantized model's size plus one weight, never the full-precision model. Layers the file
    already holds quantized (`swap_in_quantized_layers`) keep their stored integers and scales unchanged.
    """
    check_tensors(model, readers)
    quantized = _quantized_names(model)
    target_dtype = dtype or checkpoint_dtype(model.config, readers, quantized)
    tied = _head_is_tied(model)
    total = sum(reader.path.stat().st_size for reader in readers)
    done = 0
    for reader in readers:
        for name in reader.names():
            if _skipped(name, tied):
                continue
            source = reader.tensor(name)
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name)
            if name in quantized:  # stored quantized: integers and fp16 scales as they are
                value = source.to(device=device)
            elif quantize is not None and attr == "weight" and type(module) is nn.Linear:
                replace_module(model, module_name, quantize.layer(module_name, source.to(device=device)))
                value = None
            else:
                value = source.to(device=device, dtype=target_dtype)
            if value is None or value.data_ptr() != source.data_ptr():
                reader.release(name)  # copied: the mapped pages are no longer needed
            if value is not None:
                _set_parameter(model, name, value)
            done += source.numel() * source.element_size()
            if progress is not None:
                progress(min(done, total), total)
        reader.close()
    if tied and quantize is not None:  # the embedding stays dense (a lookup); the head gets its own copy
        model.lm_head = quantize.layer("lm_head", model.model.embed_tokens.weight)
    elif tied:
        model.lm_head.weight = model.model.embed_tokens.weight


def swap_in_quantized_layers(model: Transformer, readers: list[ShardReader]) -> int:
    """Give every layer that the checkpoint stores quantized (it has `<name>.scales`) an empty
    Int8Linear / Int4Linear of the stored shapes (meta device), so `load_weights` fills it as stored.

    int8 vs int4 is read from the stored weight's dtype (int8 / uint8), the group from the scales' shape,
    all from the headers. Only safetensors shards hold quantized layers (komt.quantize writes safetensors).
    """
    count = 0
    for reader in readers:
        if reader.path.suffix != ".safetensors":
            continue
        names = set(reader.names())
        for name in sorted(n for n in names if n.endswith(".scales")):
            module_name = name.removesuffix(".scales")
            weight_name = module_name + ".weight"
            try:
                module = model.get_submodule(module_name)
            except AttributeError:
                raise CheckpointError(f"{reader.path}: {name!r} belongs to no layer of this model") from None
            if weight_name not in names or type(module) is not nn.Linear:
                raise CheckpointError(f"{reader.path}: {name!r} has no quantized weight {weight_name!r} beside it")
            method = {torch.int8: "int8", torch.uint8: "int4"}.get(reader.dtype(weight_name))
            scales_shape = reader.shape(name)
            if (method is None or len(scales_shape) != 2 or scales_shape[1] == 0
                    or reader.dtype(name) != torch.float16 or module.in_features % scales_shape[1]):
                raise CheckpointError(f"{reader.path}: {weight_name!r} with {name!r} ({reader.dtype(name)}, "
                                      f"{scales_shape}) is not an int8/int4 layer")
            if method == "int4" and module_name + ".offsets" not in names:
                raise CheckpointError(f"{reader.path}: int4 layer {module_name!r} has no {module_name}.offsets")
            group = module.in_features // scales_shape[1]
            replace_module(model, module_name, empty_quantized(method, module.out_features, module.in_features,
                                                               group, device="meta"))
            count += 1
    return count


def _set_parameter(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    setattr(module, attr, value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=False))


def load_checkpoint(
    folder: Path,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    progress: ProgressFn | None = None,
    config: ModelConfig | None = None,
    quantize: QuantizeSpec | None = None,
) -> Transformer:
    """config.json + weights in `folder` -> a Transformer in eval mode on `device`.

    Everything that can be checked without allocating is checked first: the config, the shard names,
    every header, the layer count; only then is the model built and filled. `config`: already read.
    """
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder")
    dtype = parse_dtype(dtype)
    config = config or ModelConfig.from_file(folder / "config.json")
    readers = open_shards(find_weight_shards(folder))
    check_layer_count(config, readers)
    model = build_empty_model(config)
    if swap_in_quantized_layers(model, readers) and quantize is not None:
        raise ConfigError(f"{folder}: the checkpoint is already quantized; load it without quantize=")
    load_weights(model, readers, torch.device(device or "cpu"), dtype, progress, quantize)
    return model.eval()


def iter_state(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a checkpoint folder, shard by shard, as zero-copy views (the GGUF exporter reads this)."""
    for reader in open_shards(find_weight_shards(folder)):
        for name in reader.names():
            yield name, reader.tensor(name)
