"""komt's tokenizer interface and `load_tokenizer`: one API over three kinds of vocabulary.

    tokenizer.model  -> komt.generate.sentencepiece_tokenizer  (komt's own models, Mistral, Llama-2)
    tokenizer.json   -> komt.generate.hf_tokenizer             (byte-level BPE: GPT-2, Llama-3, SmolLM2, Qwen2;
                                                                 sentencepiece-style BPE/Unigram with byte fallback)
    GGUF metadata    -> komt.generate.gguf_tokenizer           (`llama` -> sentencepiece, `gpt2` -> tokenizers)

Every backend NFC-normalizes text before encoding (the reason is in sentencepiece_tokenizer's docstring) and
offers the same members, so generation, prompt formats, streaming, training and the server never ask which
one they hold; `stream_kind` tells komt.generate.stream which decoding rules to replay.

When a folder has both tokenizer.model and tokenizer.json, tokenizer.model wins: tokenizer.json is a
conversion of it that is not exact (the converted BPE merges split "  leading spaces" differently from
sentencepiece), and komt's own models must keep the exact ids they were trained on. tokenizer.json wins only
when it knows tokens tokenizer.model lacks (added tokens past its vocabulary, as fine-tunes that add ChatML
tokens ship); without a tokenizer.json such a folder is an error, since sentencepiece cannot spell them.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from komt.errors import TokenizerError
from komt.jsonutil import read_json_object, require_regular_file
from komt.generate.tokenizer_files import TokenizerSettings, read_tokenizer_settings

SENTENCEPIECE_FILE = "tokenizer.model"
TOKENIZER_JSON_FILE = "tokenizer.json"


def normalize_text(text: str) -> str:
    """NFC-normalize `text`: the one normalization every string (prompt, message, stop string) gets."""
    return unicodedata.normalize("NFC", text)


class Tokenizer(Protocol):
    """What every backend offers (SentencePieceTokenizer, HFTokenizer).

    Ids that a backend lacks are None (a GPT-2 vocabulary has no BOS). `add_bos` is the checkpoint's default
    for `encode(..., bos=None)` (tokenizer_config.json's add_bos_token, else what tokenizer.json's
    post-processor adds, else BOS for sentencepiece). `stop_ids` end a generation: EOS and
    generation_config.json's eos ids. `special_tokens_map` (bos_token, eos_token, ... as strings) and
    `chat_templates` (name -> Jinja source, "default" for the unnamed one) are what chat templates render with.
    """

    source: str
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    add_bos: bool
    stop_ids: tuple[int, ...]
    special_tokens_map: dict[str, str]
    chat_templates: dict[str, str]
    chat_template_file: str | None
    stream_kind: str

    def encode(self, text: str, bos: bool | None = None, eos: bool = False) -> list[int]:
        """Ids of NFC(`text`); BOS per `bos` (None: `add_bos`), EOS if `eos`."""

    def encode_with_specials(self, text: str) -> list[int]:
        """Ids of a chat template's output: special-token strings become their ids; nothing is added."""

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, special tokens left out; TokenizerError for an id outside the vocabulary."""

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary entry of `token_id`."""

    def is_special(self, token_id: int) -> bool:
        """True for a token `decode` leaves out (BOS, EOS, <|im_end|>, ...)."""


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a checkpoint folder, or of a tokenizer.model / tokenizer.json / .gguf file.

    Failures are TokenizerErrors (a .gguf file komt's GGUF reader rejects: its CheckpointError).

    The folder's tokenizer_config.json, special_tokens_map.json, chat template files and generation_config.json
    (a file's own folder, for a file) supply special tokens, BOS default, chat templates and stop ids; a GGUF
    file carries all of them in its own metadata.
    """
    path = Path(path)
    if path.is_dir():
        return _load_folder(path, read_tokenizer_settings(path))
    if not path.exists():
        raise TokenizerError(f"{path} does not exist; pass a checkpoint folder containing {SENTENCEPIECE_FILE} "
                             f"or {TOKENIZER_JSON_FILE}, or the file itself")
    require_regular_file(path, TokenizerError)
    if path.suffix == ".gguf":
        from komt.generate.gguf_tokenizer import tokenizer_from_gguf_metadata
        from komt.model.gguf import GGUFFile

        return tokenizer_from_gguf_metadata(GGUFFile(path).metadata, str(path))
    settings = read_tokenizer_settings(path.parent)
    if path.suffix == ".json":
        from komt.generate.hf_tokenizer import read_tokenizer_json

        return read_tokenizer_json(path, settings)
    from komt.generate.sentencepiece_tokenizer import read_sentencepiece

    return read_sentencepiece(path, settings)


def _load_folder(folder: Path, settings: TokenizerSettings) -> Tokenizer:
    """Pick the folder's backend (module docstring: tokenizer.model wins unless tokenizer.json knows more)."""
    from komt.generate.hf_tokenizer import read_tokenizer_json
    from komt.generate.sentencepiece_tokenizer import read_sentencepiece

    model, tokenizer_json = folder / SENTENCEPIECE_FILE, folder / TOKENIZER_JSON_FILE
    # exists(), not is_file(): a FIFO or a folder under these names is refused by name when read
    if not model.exists():
        if tokenizer_json.exists():
            return read_tokenizer_json(tokenizer_json, settings)
        raise TokenizerError(f"folder {folder} has no {SENTENCEPIECE_FILE} or {TOKENIZER_JSON_FILE}; pass a "
                             f"checkpoint folder containing one of them, or the file itself")
    tokenizer = read_sentencepiece(model, settings)
    added = [i for i in settings.added_token_ids if i >= tokenizer.vocab_size]
    if tokenizer_json.exists():
        added += [i for i in _added_token_ids(tokenizer_json) if i >= tokenizer.vocab_size]
        if added:
            return read_tokenizer_json(tokenizer_json, settings)
    elif added:
        raise TokenizerError(f"{folder}: tokenizer_config.json adds tokens past {SENTENCEPIECE_FILE}'s vocabulary of "
                             f"{tokenizer.vocab_size} (ids {min(added)}..{max(added)}); komt reads added tokens only "
                             f"from {TOKENIZER_JSON_FILE}, which this folder lacks")
    return tokenizer


def _added_token_ids(file: Path) -> list[int]:
    """The ids of tokenizer.json's added tokens, read without building the tokenizer."""
    spec = read_json_object(file, TokenizerError)  # strict; a FIFO is refused, not opened
    return [t["id"] for t in spec.get("added_tokens") or [] if isinstance(t, dict) and isinstance(t.get("id"), int)]
