"""komt: a from-scratch PyTorch reimplementation of the komt-mistral-7b-v1 stack.

The stable API: `load_model`, `load_tokenizer`, and the error types.

`load_model` is imported on first use (komt.lazy_exports), so `import komt` and the start of every
`python -m komt.…` entry point do not import torch: an entry point's own code runs within milliseconds
and catches a Ctrl-C during its (slow) imports, exiting 130 instead of printing a traceback.
"""

from komt.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    GenerationError,
    KomtError,
    TokenizerError,
)
from komt.lazy_exports import lazy_exports


def load_tokenizer(path):
    """The tokenizer of a checkpoint folder (tokenizer.model or tokenizer.json + its config files) or of one file
    (tokenizer.model, tokenizer.json, or a GGUF model's vocabulary)."""
    from komt.generate.tokenizer import load_tokenizer as _load

    return _load(path)


__getattr__, __dir__ = lazy_exports(__name__, {"load_model": "komt.model.load"})

__all__ = ["load_model", "load_tokenizer", "KomtError", "ConfigError", "CheckpointError",
           "TokenizerError", "GenerationError", "DataError"]
__version__ = "0.1.0"
