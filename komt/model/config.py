"""The model's shape, read once from a Hugging Face `config.json` and trusted everywhere after.

Two generations of `config.json` exist in the wild and komt reads both:

- the 2023 form that komt-mistral-7b-v1 ships: `rope_theta` at top level, `torch_dtype`, no `head_dim`
  (head_dim = hidden_size // num_attention_heads);
- the current form: `rope_parameters: {"rope_theta": …, "rope_type": "default"}`, `dtype`, explicit
  `head_dim`.

Unknown keys are ignored (configs carry many training-time fields); a missing required key is a
`ConfigError` naming the key and the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from komt.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("mistral", "llama")

_REQUIRED = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)


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
    torch_dtype: str = "float32"  # the dtype the checkpoint was saved in, as a torch attribute name

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unsupported model_type {self.model_type!r}: komt serves {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"sliding_window must be a positive integer or null, got {self.sliding_window!r}")

    @property
    def n_rep(self) -> int:
        """Query heads per key/value head (grouped-query attention)."""
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Build from a parsed config.json of either generation (see module docstring)."""
        for key in _REQUIRED:
            if key not in raw:
                raise ConfigError(f"{source}: missing required key {key!r}")
        n_heads = raw["num_attention_heads"]
        head_dim = raw.get("head_dim") or raw["hidden_size"] // n_heads
        rope_params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        rope_type = rope_params.get("rope_type", rope_params.get("type", "default"))
        if rope_type not in (None, "default"):
            raise ConfigError(f"{source}: rope_type {rope_type!r} is not supported (only 'default' RoPE)")
        rope_theta = rope_params.get("rope_theta", raw.get("rope_theta", 10000.0))
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: hidden_act {act!r} is not supported (Mistral/Llama use 'silu')")
        if raw.get("attention_bias") or raw.get("mlp_bias"):
            raise ConfigError(f"{source}: attention_bias / mlp_bias are not supported")
        eos = raw.get("eos_token_id", 2)
        if isinstance(eos, list):  # some configs list several; the first is the end-of-turn token
            eos = eos[0]
        try:
            return cls(
                model_type=raw["model_type"],
                vocab_size=raw["vocab_size"],
                hidden_size=raw["hidden_size"],
                intermediate_size=raw["intermediate_size"],
                num_hidden_layers=raw["num_hidden_layers"],
                num_attention_heads=n_heads,
                num_key_value_heads=raw.get("num_key_value_heads") or n_heads,
                head_dim=head_dim,
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
                rope_theta=float(rope_theta),
                max_position_embeddings=int(raw.get("max_position_embeddings", 32768)),
                sliding_window=raw.get("sliding_window") if raw["model_type"] == "mistral" else None,
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                bos_token_id=raw.get("bos_token_id") if raw.get("bos_token_id") is not None else 1,
                eos_token_id=eos if eos is not None else 2,
                torch_dtype=raw.get("dtype") or raw.get("torch_dtype") or "float32",
            )
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no config.json (is this a Hugging Face checkpoint folder?)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ConfigError(f"{path}: unreadable config: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object")
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
