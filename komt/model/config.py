"""The model's shape, read once from a Hugging Face `config.json` and trusted everywhere after.

Two generations of `config.json` exist in the wild and komt reads both:

- the 2023 form that komt-mistral-7b-v1 ships: `rope_theta` at top level, `torch_dtype`, no `head_dim`
  (head_dim = hidden_size // num_attention_heads);
- the current form: `rope_parameters: {"rope_theta": …, "rope_type": "default"}`, `dtype`, explicit
  `head_dim`.

Unknown keys are ignored (configs carry many training-time fields); a missing required key, a value of
the wrong type (a string, a float or a boolean where a count belongs) or out of range (a zero head count,
an odd head_dim, rms_norm_eps <= 0, a NaN rope_theta, an eos_token_id outside the vocabulary) is a
`ConfigError` naming the key and the file. Whether the config agrees with the weight files (layer count,
shapes) is checked by komt.model.checkpoint from the files' headers, before anything is allocated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from komt.errors import ConfigError
from komt.jsonutil import is_int, read_json

SUPPORTED_MODEL_TYPES = ("mistral", "llama")

_REQUIRED = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)
# The sizes a model is built from. Each fits an int32 index (the kernels and the embedding lookup use
# them), which also keeps a hostile 2^63 out of torch's shape arithmetic.
_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "head_dim", "max_position_embeddings")
MAX_SIZE = 2**31 - 1
# The checkpoint dtypes a config may declare (Hugging Face's torch attribute names).
DTYPE_NAMES = ("float32", "bfloat16", "float16")


def _is_number(value: Any) -> bool:
    return type(value) in (int, float)


def _as_float(value: Any) -> Any:
    """An int or float as float; anything else unchanged, for the validation to name."""
    return float(value) if _is_number(value) else value


@dataclass(frozen=True)
class ModelConfig:
    """Everything the architecture needs to know; names follow the Hugging Face keys."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 32768
    sliding_window: int | None = None  # W: query i sees keys j with i - W < j <= i; None = full causal
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    # The dtype the config declares for the checkpoint (a torch attribute name). Loading keeps the
    # tensors' own dtype; this one decides only for a file that mixes dtypes (komt.model.checkpoint).
    torch_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unsupported model_type {self.model_type!r:.40}: komt serves {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        for name in _SIZES:
            value = getattr(self, name)
            if not is_int(value) or not 0 < value <= MAX_SIZE:
                raise ConfigError(f"{name} must be a positive integer up to 2^31 - 1, got {value!r:.40}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even (RoPE rotates pairs of channels), got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.sliding_window is not None and (not is_int(self.sliding_window)
                                                or not 0 < self.sliding_window <= MAX_SIZE):
            raise ConfigError(f"sliding_window must be a positive integer or null, got {self.sliding_window!r:.40}")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{name} must be a finite number > 0, got {value!r:.40}")
        if not isinstance(self.tie_word_embeddings, bool):
            raise ConfigError(f"tie_word_embeddings must be true or false, got {self.tie_word_embeddings!r:.40}")
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if not is_int(value) or not 0 <= value < self.vocab_size:
                raise ConfigError(f"{name} must be a token id in [0, {self.vocab_size}), got {value!r:.40}")
        if self.torch_dtype not in DTYPE_NAMES:
            raise ConfigError(f"torch_dtype must be one of {', '.join(DTYPE_NAMES)}, got {self.torch_dtype!r:.40}")

    @property
    def n_rep(self) -> int:
        """Query heads per key/value head (grouped-query attention)."""
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Build from a parsed config.json of either generation (see module docstring).

        Types are checked, not coerced: `true` is not a layer count and `"4096"` is not a context length.
        """
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        for key in _REQUIRED:
            if key not in raw:
                raise ConfigError(f"{source}: missing required key {key!r}")
        n_heads, hidden = raw["num_attention_heads"], raw["hidden_size"]
        head_dim = raw.get("head_dim")
        if head_dim is None and is_int(n_heads) and is_int(hidden) and 0 < n_heads <= MAX_SIZE:
            if hidden % n_heads:
                raise ConfigError(f"{source}: hidden_size {hidden} is not a multiple of num_attention_heads "
                                  f"{n_heads} and no head_dim is given")
            head_dim = hidden // n_heads
        rope_key = "rope_parameters" if raw.get("rope_parameters") is not None else "rope_scaling"
        rope_params = raw.get(rope_key)
        if rope_params is None:
            rope_params = {}
        if not isinstance(rope_params, dict):
            raise ConfigError(f"{source}: {rope_key} must be an object or null, got {rope_params!r:.40}")
        rope_type = rope_params.get("rope_type", rope_params.get("type", "default"))
        if rope_type not in (None, "default"):
            raise ConfigError(f"{source}: rope_type {rope_type!r:.40} is not supported (only 'default' RoPE)")
        rope_theta = rope_params.get("rope_theta", raw.get("rope_theta", 10000.0))
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: hidden_act {act!r:.40} is not supported (Mistral/Llama use 'silu')")
        if raw.get("attention_bias") or raw.get("mlp_bias"):
            raise ConfigError(f"{source}: attention_bias / mlp_bias are not supported")
        eos = raw.get("eos_token_id")
        if isinstance(eos, list):  # some configs list several; the first is the end-of-turn token
            if not eos:
                raise ConfigError(f"{source}: eos_token_id is an empty list (give the end-of-text token id)")
            eos = eos[0]
        bos = raw.get("bos_token_id")
        n_kv = raw.get("num_key_value_heads")
        dtype = raw.get("dtype") if raw.get("dtype") is not None else raw.get("torch_dtype")
        try:
            return cls(
                model_type=raw["model_type"],
                vocab_size=raw["vocab_size"],
                hidden_size=hidden,
                intermediate_size=raw["intermediate_size"],
                num_hidden_layers=raw["num_hidden_layers"],
                num_attention_heads=n_heads,
                num_key_value_heads=n_heads if n_kv is None else n_kv,
                head_dim=head_dim,
                rms_norm_eps=_as_float(raw.get("rms_norm_eps", 1e-5)),
                rope_theta=_as_float(rope_theta),
                max_position_embeddings=raw.get("max_position_embeddings", 32768),
                sliding_window=raw.get("sliding_window") if raw["model_type"] == "mistral" else None,
                tie_word_embeddings=raw.get("tie_word_embeddings", False),
                bos_token_id=1 if bos is None else bos,
                eos_token_id=2 if eos is None else eos,
                torch_dtype="float32" if dtype is None else dtype,
            )
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            raw = read_json(path, ConfigError)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no config.json (is this a Hugging Face checkpoint folder?)") from None
        return cls.from_dict(raw, source=str(path))

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json that Hugging Face-format tools read (current form, plus top-level rope_theta)."""
        arch = "MistralForCausalLM" if self.model_type == "mistral" else "LlamaForCausalLM"
        return {
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "sliding_window": self.sliding_window,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": self.torch_dtype,
        }


# Named shapes for benchmarks and tests (random weights); the real checkpoints carry their own config.
PRESETS: dict[str, ModelConfig] = {
    # komt-mistral-7b-v1 = Mistral-7B-Instruct-v0.1 fine-tuned: its config.json, 2023 form.
    "komt-mistral-7b": ModelConfig(
        model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=32768, sliding_window=4096,
        torch_dtype="bfloat16",
    ),
    # SmolLM2-135M's shape: the CPU decode benchmark's yardstick (small enough for 2 cores).
    "smollm2-135m": ModelConfig(
        model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
        rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, torch_dtype="float32",
    ),
    # A tiny Mistral with the real 32000-token vocabulary, for end-to-end CLI tests with the real tokenizer.
    "tiny-mistral-32k": ModelConfig(
        model_type="mistral", vocab_size=32000, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=4096, sliding_window=64, torch_dtype="float32",
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named shape, optionally with fields replaced (`preset("komt-mistral-7b", num_hidden_layers=2)`)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return replace(PRESETS[name], **overrides)
