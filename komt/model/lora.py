"""LoRA (Hu et al. 2021): a frozen linear layer plus a trainable low-rank update, and PEFT adapter files.

    y = x W^T + (alpha / r) * B(A(dropout(x)))        W [out, in] frozen, A [r, in], B [out, r]

A starts Kaiming-uniform and B at zero, so a fresh adapter leaves the model unchanged. `LoRALinear` wraps
the frozen layer it adapts as its submodule `base_layer` (PEFT's name), whatever variant that layer is
(komt.model.linear: dense, int8, int4, NF4, a CPU layout), so LoRA on a quantized base (QLoRA) is the same
code as on a dense one, and nothing else in the model knows LoRA exists: `inject_lora` swaps the layers in
by module name, `merge_lora` folds them back into plain nn.Linear.

On disk an adapter is a Hugging Face PEFT folder, so it works with the rest of the ecosystem:

    adapter_config.json          {"peft_type": "LORA", "r", "lora_alpha", "target_modules", ...}
    adapter_model.safetensors    base_model.model.<module>.lora_A.weight [r, in], ...lora_B.weight [out, r]
    (adapter_model.bin           what older PEFT wrote; keys may carry the adapter name: lora_A.default.weight)

Loading is driven by the tensors in the file, not by `target_modules`: every tensor must land on a linear
layer of the right shape, or it is a `CheckpointError` naming it. PEFT features that change the math
(DoRA, per-module rank patterns, biases, ...) are refused by name rather than silently ignored.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from komt.atomic import write_json_atomic
from komt.jsonutil import read_json
from komt.errors import CheckpointError, ConfigError
from komt.model.linear import dense_weight, is_linear, replace_module

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."  # PEFT's PeftModel -> LoraModel -> the Hugging Face model

# adapter_config.json keys whose truthy values change the math in ways komt does not implement.
_UNSUPPORTED = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)",
    "modules_to_save": "fully trained extra modules (modules_to_save)",
    "fan_in_fan_out": "transposed (Conv1D) weights (fan_in_fan_out)",
    "lora_bias": "LoRA biases (lora_bias)",
    "trainable_token_indices": "trained token embeddings (trainable_token_indices)",
    "target_parameters": "LoRA on bare parameters (target_parameters)",
    "layer_replication": "layer replication",
    "use_qalora": "QA-LoRA",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
}
# PEFT key of one LoRA matrix, with or without the PEFT prefix and the adapter name older PEFT kept.
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.default)?\.weight$")


@dataclass(frozen=True)
class LoRAConfig:
    """The adapter's hyper-parameters; the defaults are the komt recipe (r 8, alpha 32, all 7 projections)."""

    r: int = 8
    alpha: float = 32.0
    dropout: float = 0.05
    targets: tuple[str, ...] = DEFAULT_TARGETS
    use_rslora: bool = False  # rank-stabilised scale alpha / sqrt(r) (Kalajdzievski 2023) instead of alpha / r

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise ConfigError(f"LoRA alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if not all(isinstance(t, str) and t for t in self.targets):
            raise ConfigError(f"LoRA targets must be module names, got {self.targets!r}")

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.r, self.use_rslora)

    def to_peft_dict(self, base_model_name_or_path: str | None = None) -> dict:
        """adapter_config.json as PEFT writes it (the fields PEFT reads; the rest take PEFT's defaults)."""
        return {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
            "r": self.r, "lora_alpha": int(self.alpha) if float(self.alpha).is_integer() else self.alpha,
            "lora_dropout": self.dropout, "target_modules": list(self.targets), "bias": "none", "use_rslora": self.use_rslora,
            "use_dora": False, "fan_in_fan_out": False, "modules_to_save": None, "rank_pattern": {},
            "alpha_pattern": {}, "init_lora_weights": True, "inference_mode": True, "revision": None,
        }

    @classmethod
    def from_peft_dict(cls, raw: dict, source: str = ADAPTER_CONFIG) -> "LoRAConfig":
        """Read a PEFT adapter_config.json, refusing by name the features komt does not implement."""
        if raw.get("peft_type", "LORA") != "LORA":
            raise ConfigError(f"{source}: peft_type {raw.get('peft_type')!r} is not supported (only LORA)")
        for key, what in _UNSUPPORTED.items():
            if raw.get(key):
                raise ConfigError(f"{source}: {what} is not supported ({key}={raw[key]!r})")
        if raw.get("bias", "none") != "none":
            raise ConfigError(f"{source}: bias {raw['bias']!r} is not supported (only 'none')")
        targets = raw.get("target_modules") or ()
        targets = (targets,) if isinstance(targets, str) else tuple(targets)  # a str is a regex in PEFT
        try:
            return cls(r=raw.get("r", 8), alpha=float(raw.get("lora_alpha", 8)),
                       dropout=float(raw.get("lora_dropout", 0.0)), targets=targets,
                       use_rslora=bool(raw.get("use_rslora", False)))
        except (TypeError, ValueError, ConfigError) as err:
            raise ConfigError(f"{source}: {err}") from None


def lora_scale(alpha: float, r: int, use_rslora: bool = False) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class InputDropout(nn.Module):
    """Inverted dropout (as nn.Dropout) drawn with `rand < p` instead of `bernoulli_`: the same
    distribution, but 1.5x faster on the CPU, where bernoulli_ was an eighth of a LoRA training step."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep = torch.rand_like(x) >= self.p
        return x * keep * (1.0 / (1.0 - self.p))


class LoRALinear(nn.Module):
    """A frozen base layer (any linear variant: nn.Linear, int8, int4, NF4, a CPU layout) plus the low-rank
    update scale * B A.

    The base is the submodule `base_layer` (PEFT's name), so LoRA works on top of a quantized base (QLoRA)
    exactly as on a dense one. The LoRA matrices may have their own dtype (fp32 for training a bf16 base:
    AdamW's updates are far below bf16's resolution); the update is computed in it (or in autocast's
    dtype, under autocast) and added in the base output's dtype.
    """

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, lora_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.alpha = r, alpha
        self.scale = lora_scale(alpha, r, use_rslora)
        base = next(base_layer.parameters())
        # A quantized base holds integers: its LoRA matrices default to fp32 (they are tiny).
        default_dtype = base.dtype if base.dtype.is_floating_point else torch.float32
        factory = {"device": base.device, "dtype": lora_dtype or default_dtype}
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **factory)
        self.dropout = InputDropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.enabled = True  # False: the base layer alone (see `lora_disabled`)
        self.reset_lora_parameters()
        # The state dict names the base's tensors as the unwrapped layer did (`q_proj.weight`, not
        # `q_proj.base_layer.weight`), so a base checkpoint loads into a LoRA model unchanged.
        self._register_state_dict_hook(_unwrap_base_names)
        self.register_load_state_dict_pre_hook(_wrap_base_names)

    def reset_lora_parameters(self) -> None:
        """A as nn.Linear initialises itself (PEFT does the same), B zero: the update starts at exactly 0."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged or not self.enabled:
            return out
        if not torch.is_autocast_enabled(x.device.type):  # under autocast the matmuls pick their own dtype
            x = x.to(self.lora_A.weight.dtype)
        update = self.lora_B(self.lora_A(self.dropout(x)))
        return out + (update * self.scale).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scale * B @ A in fp32: [out, r] @ [r, in] -> [out, in]."""
        return self.scale * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight this layer computes with: the base's (dequantized) weight + the update."""
        if self.merged:
            return dense_weight(self.base_layer).to(dtype)
        return (dense_weight(self.base_layer).float() + self.delta_weight()).to(dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into a dense base's `weight` (rounded once, from fp32): one matmul per call.

        A quantized base cannot take the update in place (requantizing would lose it): `merge_lora`
        replaces such a layer by a dense one holding `dequantize()` instead.
        """
        if not isinstance(self.base_layer, nn.Linear):
            raise ConfigError(f"cannot merge LoRA into a {type(self.base_layer).__name__} in place; use merge_lora")
        if not self.merged:
            weight = self.base_layer.weight
            weight.copy_((weight.float() + self.delta_weight()).to(weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update back out of the base weight (exact in fp32; in bf16 each round trip rounds once more)."""
        if self.merged:
            weight = self.base_layer.weight
            weight.copy_((weight.float() - self.delta_weight()).to(weight.dtype))
            self.merged = False

    def adapter_params(self) -> list[nn.Parameter]:
        return [self.lora_A.weight, self.lora_B.weight]

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}, merged={self.merged}"


def _unwrap_base_names(module: nn.Module, state_dict: dict, prefix: str, _metadata) -> None:
    inner = prefix + "base_layer."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)


def _wrap_base_names(module: nn.Module, state_dict: dict, prefix: str, *_args) -> None:
    own = {prefix + "lora_A.weight", prefix + "lora_B.weight"}
    for key in [k for k in state_dict if k.startswith(prefix) and k not in own]:
        rest = key[len(prefix):]
        if "." not in rest or not rest.startswith(("base_layer.", "lora_A.", "lora_B.", "dropout.")):
            state_dict[prefix + "base_layer." + rest] = state_dict.pop(key)


def matches_target(name: str, targets: tuple[str, ...]) -> bool:
    """PEFT's rule for a list of targets: the module name is a target or ends with "." + a target."""
    return any(name == t or name.endswith("." + t) for t in targets)


def inject_lora(model: nn.Module, config: LoRAConfig, lora_dtype: torch.dtype | None = None) -> list[str]:
    """Wrap every linear layer (of any variant) whose name matches a target in a LoRALinear; freeze all but LoRA.

    Returns the swapped module names. A target that matches no linear layer is a ConfigError (a typo
    would otherwise train nothing), and so is a target whose weight is tied to another module.
    """
    if not config.targets:
        raise ConfigError("LoRA needs at least one target module (e.g. q_proj)")
    names = [n for n, m in model.named_modules() if _adaptable(m) and matches_target(n, config.targets)]
    for target in config.targets:
        if not any(matches_target(n, (target,)) for n in names):
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _adaptable(m)})
            raise ConfigError(f"LoRA target {target!r} matches no linear layer; known: {', '.join(linear)}")
    tied = _tied_parameter_ids(model)
    for param in model.parameters():
        param.requires_grad_(False)
    for name in names:
        linear = model.get_submodule(name)
        if getattr(linear, "bias", None) is not None:
            raise ConfigError(f"cannot put LoRA on {name}: it has a bias, which komt's LoRALinear does not keep")
        if any(id(p) in tied for p in linear.parameters()):
            raise ConfigError(f"cannot put LoRA on {name}: its weight is tied to another module")
        layer = LoRALinear(linear, config.r, config.alpha, config.dropout, config.use_rslora, lora_dtype)
        layer.train(linear.training)  # a model in eval mode stays in eval mode (no dropout)
        replace_module(model, name, layer)
    return names


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


@contextmanager
def lora_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """The base model inside the block: every LoRA update switched off (PEFT's `disable_adapter()`).

    DPO scores its reference with this, so the reference costs no second copy of the weights. A merged
    layer has its update folded into `weight` and cannot be switched off: that is a ConfigError.
    """
    layers = [m for _, m in lora_modules(model)]
    if any(m.merged for m in layers):
        raise ConfigError("cannot disable merged LoRA layers: their update is part of the weight; unmerge first")
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m in layers:
            m.enabled = True


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under komt's (= Hugging Face) module names: `<module>.lora_A.weight`, ..."""
    state = {}
    for name, module in lora_modules(model):
        state[f"{name}.lora_A.weight"] = module.lora_A.weight
        state[f"{name}.lora_B.weight"] = module.lora_B.weight
    return state


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, tied weights counted once.

    A quantized layer counts the weights it stands for (out x in), not its storage: NF4 packs two weights
    a byte and keeps block maxima, so counting its tensors would make a QLoRA model look half its size.
    """
    stored: set[int] = set()
    logical = 0
    for module in model.modules():
        own = {id(p) for p in module.parameters()}
        if is_linear(module) and not isinstance(module, (nn.Linear, LoRALinear)) and own and not own & stored:
            logical += module.in_features * module.out_features  # (a wrapper's inner layer is not counted again)
            stored |= own
    params = list(model.parameters())
    total = logical + sum(p.numel() for p in params if id(p) not in stored)
    return sum(p.numel() for p in params if p.requires_grad), total


def merge_lora(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Merge every LoRALinear and put a plain nn.Linear back in its place (PEFT's merge_and_unload).

    A dense base takes the update in place. A quantized base (QLoRA) becomes a dense layer holding
    dequantize(base) + update, in `dtype` (default: float32): the update is folded into the very weights it
    was trained against, not into the original unquantized ones (which PEFT users sometimes do, losing the
    quantization error the adapter learned to correct).
    """
    for name, module in lora_modules(model):
        if isinstance(module.base_layer, nn.Linear):
            module.merge()
            weight = module.base_layer.weight
        else:
            weight = nn.Parameter(module.dequantize(dtype or torch.float32), requires_grad=False)
        linear = nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
        linear.weight = weight
        replace_module(model, name, linear)
    return model


def save_adapter(model: nn.Module, folder: str | os.PathLike, config: LoRAConfig,
                 base_model_name_or_path: str | None = None) -> None:
    """Write `folder`/adapter_config.json and adapter_model.safetensors in PEFT's layout, each atomically."""
    from komt.model.safetensors_file import write_safetensors

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = lora_state_dict(model)
    if not state:
        raise ConfigError("the model has no LoRA layers to save")
    write_safetensors(folder / ADAPTER_WEIGHTS, [(PEFT_PREFIX + k, v.detach()) for k, v in state.items()])
    write_json_atomic(folder / ADAPTER_CONFIG, config.to_peft_dict(base_model_name_or_path))


def read_adapter_config(folder: str | os.PathLike) -> LoRAConfig:
    path = Path(folder) / ADAPTER_CONFIG
    try:
        raw = read_json(path, ConfigError)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (is {folder} a PEFT LoRA adapter folder?)") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return LoRAConfig.from_peft_dict(raw, source=str(path))


def read_adapter_weights(folder: str | os.PathLike) -> tuple[Path, dict[str, torch.Tensor]]:
    """(file, {key: tensor}) of adapter_model.safetensors, else of the older adapter_model.bin."""
    from komt.model.checkpoint import ShardReader

    folder = Path(folder)
    for name in (ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_BIN):
        if (folder / name).exists():
            reader = ShardReader(folder / name)
            return folder / name, {key: reader.tensor(key) for key in reader.names()}
    raise CheckpointError(f"{folder}: no adapter weights ({ADAPTER_WEIGHTS} or {ADAPTER_WEIGHTS_BIN})")


def load_adapter(model: nn.Module, folder: str | os.PathLike) -> LoRAConfig:
    """Apply a PEFT LoRA adapter folder (written by komt or PEFT) to a loaded model, for inference.

    Every tensor must name a linear layer of the model and fit its shape; each layer needs both A and B.
    LoRA weights take the base weight's device and dtype and, like the base, do not require grad.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: adapter is not a folder")
    config = read_adapter_config(folder)
    path, tensors = read_adapter_weights(folder)
    pairs: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise CheckpointError(f"{path}: tensor {key!r} is not a LoRA A/B matrix of a linear layer")
        pairs.setdefault(match["module"], {})[match["which"]] = (key, tensor)
    if not pairs:
        raise CheckpointError(f"{path}: holds no LoRA tensors")
    for module_name, pair in pairs.items():
        key = next(iter(pair.values()))[0]
        try:
            linear = model.get_submodule(module_name)
        except AttributeError:
            raise CheckpointError(f"{path}: tensor {key!r} matches no module of the model") from None
        if isinstance(linear, LoRALinear):
            raise CheckpointError(f"{path}: module {module_name!r} already has a LoRA adapter")
        if not _adaptable(linear) or getattr(linear, "bias", None) is not None:
            raise CheckpointError(f"{path}: tensor {key!r} targets {module_name!r}, which is not a bias-free linear layer")
        if set(pair) != {"A", "B"}:
            missing = ({"A", "B"} - set(pair)).pop()
            raise CheckpointError(f"{path}: {module_name!r} has no lora_{missing} tensor")
        (key_a, a), (key_b, b) = pair["A"], pair["B"]
        r = config.r
        for key_x, x, want in ((key_a, a, (r, linear.in_features)), (key_b, b, (linear.out_features, r))):
            if tuple(x.shape) != want:
                raise CheckpointError(f"{path}: tensor {key_x!r} has shape {tuple(x.shape)}, expected {want} (r={r})")
        layer = LoRALinear(linear, r, config.alpha, config.dropout, config.use_rslora)
        with torch.no_grad():
            layer.lora_A.weight.copy_(a)
            layer.lora_B.weight.copy_(b)
        for param in layer.adapter_params():
            param.requires_grad_(False)
        layer.train(linear.training)
        replace_module(model, module_name, layer)
    return config


def _adaptable(module: nn.Module) -> bool:
    """A linear layer LoRA can wrap: nn.Linear or any other variant (komt.model.linear), not LoRA itself."""
    return is_linear(module) and not isinstance(module, LoRALinear)


def _tied_parameter_ids(model: nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        seen[id(param)] = seen.get(id(param), 0) + 1
    return {pid for pid, n in seen.items() if n > 1}
