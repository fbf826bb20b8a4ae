"""komt: a from-scratch PyTorch reimplementation of the komt-mistral-7b-v1 stack.

The stable API: `load_model`, `load_tokenizer`, and the error types.
"""

from komt.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    GenerationError,
    KomtError,
    TokenizerError,
)
from komt.model import load_model


def load_tokenizer(path):
    """The tokenizer of a checkpoint folder (tokenizer.model or tokenizer.json + its config files) or of one file
    (tokenizer.model, tokenizer.json, or a GGUF model's vocabulary)."""
    from komt.generate.tokenizer import load_tokenizer as _load

    return _load(path)


__all__ = ["load_model", "load_tokenizer", "KomtError", "ConfigError", "CheckpointError",
           "TokenizerError", "GenerationError", "DataError"]
__version__ = "0.1.0"
