"""komt's `ModelConfig` from a GGUF file's `llama.*` metadata, and the metadata komt writes for a config.

llama.cpp stores Llama and Mistral both as architecture `llama` (convert_hf_to_gguf.py registers
MistralForCausalLM under LlamaModel). The keys, with the `ModelConfig` field each one fills:

    llama.context_length                     max_position_embeddings
    llama.embedding_length                   hidden_size
    llama.block_count                        num_hidden_layers
    llama.feed_forward_length                intermediate_size
    llama.attention.head_count               num_attention_heads
    llama.attention.head_count_kv            num_key_value_heads (default: head_count)
    llama.attention.key_length               head_dim (default: embedding_length / head_count)
    llama.rope.dimension_count               must equal head_dim (komt rotates whole heads)
    llama.rope.freq_base                     rope_theta (default 10000)
    llama.attention.layer_norm_rms_epsilon   rms_norm_eps
    llama.attention.sliding_window           sliding_window (absent or 0: none; llama.cpp's converter
                                             never writes it for Mistral, and llama.cpp's `llama` graph
                                             attends fully, so Mistral GGUFs run without the window)
    token_embd rows                          vocab_size (checked against llama.vocab_size / the vocabulary)
    output.weight absent                     tie_word_embeddings
    tokenizer.ggml.bos/eos_token_id          bos_token_id, eos_token_id

Anything komt would compute differently (another architecture, RoPE scaling, experts, partial rotary
dimensions) is a ConfigError naming the key, never a silently different model.
"""

from __future__ import annotations

from typing import Any

from komt.errors import ConfigError
from komt.model.config import ModelConfig
from komt.model.gguf.constants import FILE_TYPES, QUANTIZATION_VERSION

ARCH = "llama"
_DTYPE_OF_FILE_TYPE = {FILE_TYPES["F32"]: "float32", FILE_TYPES["F16"]: "float16", FILE_TYPES["BF16"]: "bfloat16"}


def _get(metadata: dict[str, Any], key: str, kind: type, source: str, default: Any = None) -> Any:
    value = metadata.get(key, default)
    if value is None:
        raise ConfigError(f"{source}: missing GGUF metadata {key!r}")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
        raise ConfigError(f"{source}: GGUF metadata {key!r} should be a single {kind.__name__}, got {value!r:.60}")
    return value


def config_from_metadata(metadata: dict[str, Any], vocab_size: int, tied: bool, source: str = "GGUF") -> ModelConfig:
    """The model's shape from the metadata; `vocab_size` is token_embd's row count, `tied` = no output.weight."""
    arch = metadata.get("general.architecture")
    if arch != ARCH:
        raise ConfigError(f"{source}: GGUF architecture {arch!r} is not supported (komt reads 'llama', "
                          "which is how llama.cpp stores Llama and Mistral)")

    def get(key: str, kind: type, default: Any = None) -> Any:
        return _get(metadata, f"{ARCH}.{key}", kind, source, default)

    scaling = metadata.get(f"{ARCH}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise ConfigError(f"{source}: RoPE scaling {scaling!r} ({ARCH}.rope.scaling.type) is not supported (only plain RoPE)")
    if get("expert_count", int, 0):
        raise ConfigError(f"{source}: mixture-of-experts models ({ARCH}.expert_count) are not supported")
    hidden = get("embedding_length", int)
    n_heads = get("attention.head_count", int)
    if n_heads <= 0 or hidden % n_heads:
        raise ConfigError(f"{source}: {ARCH}.attention.head_count {n_heads} does not divide embedding_length {hidden}")
    head_dim = get("attention.key_length", int, hidden // n_heads)
    if get("attention.value_length", int, head_dim) != head_dim:
        raise ConfigError(f"{source}: {ARCH}.attention.value_length differs from key_length (not supported)")
    rope_dim = get("rope.dimension_count", int, head_dim)
    if rope_dim != head_dim:
        raise ConfigError(f"{source}: {ARCH}.rope.dimension_count {rope_dim} != head dim {head_dim} "
                          "(partial rotary embeddings are not supported)")
    declared_vocab = get("vocab_size", int, vocab_size)
    n_tokens = len(metadata.get("tokenizer.ggml.tokens") or []) or vocab_size
    if declared_vocab != vocab_size or n_tokens != vocab_size:
        raise ConfigError(f"{source}: token_embd has {vocab_size} rows but {ARCH}.vocab_size is {declared_vocab} "
                          f"and the vocabulary has {n_tokens} tokens")
    window = get("attention.sliding_window", int, 0) or None
    try:
        return ModelConfig(
            model_type="mistral" if window else "llama",
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=get("feed_forward_length", int),
            num_hidden_layers=get("block_count", int),
            num_attention_heads=n_heads,
            num_key_value_heads=get("attention.head_count_kv", int, n_heads),
            head_dim=head_dim,
            rms_norm_eps=get("attention.layer_norm_rms_epsilon", float),
            rope_theta=get("rope.freq_base", float, 10000.0),
            max_position_embeddings=get("context_length", int),
            sliding_window=window,
            tie_word_embeddings=tied,
            bos_token_id=_get(metadata, "tokenizer.ggml.bos_token_id", int, source, 1),
            eos_token_id=_get(metadata, "tokenizer.ggml.eos_token_id", int, source, 2),
            torch_dtype=_DTYPE_OF_FILE_TYPE.get(metadata.get("general.file_type"), "float32"),
        )
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def metadata_from_config(config: ModelConfig, name: str, file_type: str) -> dict[str, Any]:
    """general.* and llama.* as convert_hf_to_gguf.py writes them for a Llama/Mistral checkpoint
    (plus the sliding window, which it drops: llama.cpp ignores the key for `llama`, komt reads it back).

    Python ints become UINT32 and floats FLOAT32 in the writer, the types llama.cpp's loader checks for.
    """
    metadata: dict[str, Any] = {
        "general.architecture": ARCH,
        "general.type": "model",
        "general.name": name,
        f"{ARCH}.vocab_size": config.vocab_size,
        f"{ARCH}.context_length": config.max_position_embeddings,
        f"{ARCH}.embedding_length": config.hidden_size,
        f"{ARCH}.block_count": config.num_hidden_layers,
        f"{ARCH}.feed_forward_length": config.intermediate_size,
        f"{ARCH}.rope.dimension_count": config.head_dim,
        f"{ARCH}.attention.head_count": config.num_attention_heads,
        f"{ARCH}.attention.head_count_kv": config.num_key_value_heads,
        f"{ARCH}.rope.freq_base": float(config.rope_theta),
        f"{ARCH}.attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
        f"{ARCH}.attention.key_length": config.head_dim,
        f"{ARCH}.attention.value_length": config.head_dim,
        "general.file_type": FILE_TYPES[file_type],
        "general.quantization_version": QUANTIZATION_VERSION,
    }
    if config.sliding_window is not None:
        metadata[f"{ARCH}.attention.sliding_window"] = config.sliding_window
    return metadata
