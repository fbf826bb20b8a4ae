"""Does a tokenizer belong to a model? Their vocabulary sizes, compared once at every entry point.

A tokenizer with more ids than the model's embedding has rows makes ids the model cannot look up; one
with fewer (Mistral's 32,000-token tokenizer with SmolLM2's 49,152-row embedding) runs, and the model
reads and writes garbage with exit status 0. So: larger is refused, different is said on stderr (a
model's embedding is sometimes padded past its tokenizer, e.g. to a multiple of 64, which is harmless).

Called by the generate CLI, the server, the evaluation and the trainer, before the weights load.
"""

from __future__ import annotations

import sys
from typing import TextIO

from komt.errors import TokenizerError


def check_tokenizer_fits(tokenizer_vocab: int, model_vocab: int, source: str = "the tokenizer",
                         stderr: TextIO | None = None) -> None:
    """Refuse a tokenizer larger than the model's vocabulary; warn on `stderr` (default sys.stderr) when
    the sizes differ. `source` names the tokenizer in the messages (its file)."""
    if tokenizer_vocab > model_vocab:
        raise TokenizerError(f"{source} has {tokenizer_vocab} tokens but the model's embedding only {model_vocab}: "
                             "it is another model's tokenizer; pass the model's own with --tokenizer")
    if tokenizer_vocab != model_vocab:
        print(f"komt: warning: {source} has {tokenizer_vocab} tokens and the model's embedding {model_vocab}; "
              "if the output is garbled, the tokenizer belongs to another model (pass --tokenizer)",
              file=stderr or sys.stderr)
