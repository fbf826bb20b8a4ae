"""The `tokenizer.ggml.*` metadata of a GGUF export, from a checkpoint's sentencepiece `tokenizer.model`.

llama.cpp needs the vocabulary inside the GGUF. For a sentencepiece (Llama/Mistral) tokenizer this is
what convert_hf_to_gguf.py's `_set_vocab_sentencepiece` writes:

    tokenizer.ggml.model = "llama", tokenizer.ggml.pre = "default"
    tokenizer.ggml.tokens / scores / token_type    one entry per id of the model's vocab_size: the
        sentencepiece piece, its score and type (1 normal, 2 unknown, 3 control, 5 unused, 6 byte);
        ids past the tokenizer are "[PAD<id>]" (score -10000, unused); tokenizer ids past vocab_size are
        dropped, as the converter does
    tokenizer.ggml.bos/eos_token_id                from config.json (the converter's SpecialVocab)
    tokenizer.ggml.add_bos_token / add_eos_token   from tokenizer_config.json when it says, else true / false
    tokenizer.chat_template                        from tokenizer_config.json when present

komt also writes `unknown_token_id` (and `padding_token_id` when the model has one) from the sentencepiece
model, which the converter leaves to llama.cpp's defaults (0 and none for SPM: the same values for Mistral).
A tokenizer.json-only checkpoint (byte-level BPE) is refused for now.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from komt.errors import TokenizerError
from komt.jsonutil import read_json_object
from komt.model.config import ModelConfig

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def sentencepiece_metadata(tokenizer_model: Path, vocab_size: int) -> dict[str, Any]:
    """tokens, scores and token types of a sentencepiece model, laid out over `vocab_size` ids."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(tokenizer_model))
    except (OSError, RuntimeError) as err:
        raise TokenizerError(f"{tokenizer_model}: not a sentencepiece model: {str(err).splitlines()[0]}") from None
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [UNUSED] * vocab_size
    for i in range(min(vocab_size, sp.vocab_size())):
        tokens[i] = sp.IdToPiece(i)
        scores[i] = sp.GetScore(i)
        types[i] = (UNKNOWN if sp.IsUnknown(i) else CONTROL if sp.IsControl(i) else UNUSED if sp.IsUnused(i)
                    else BYTE if sp.IsByte(i) else NORMAL)
    metadata: dict[str, Any] = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
    }
    if 0 <= sp.unk_id() < vocab_size:
        metadata["tokenizer.ggml.unknown_token_id"] = sp.unk_id()
    if 0 <= sp.pad_id() < vocab_size:
        metadata["tokenizer.ggml.padding_token_id"] = sp.pad_id()
    return metadata


def tokenizer_metadata(folder: Path, config: ModelConfig, tokenizer: Path | None = None) -> dict[str, Any]:
    """All `tokenizer.*` metadata for the checkpoint in `folder` (`tokenizer` overrides its tokenizer.model)."""
    model_file = tokenizer or folder / "tokenizer.model"
    if model_file.is_dir():
        model_file = model_file / "tokenizer.model"
    if not model_file.is_file():
        extra = " (tokenizer.json export is not supported yet)" if (folder / "tokenizer.json").exists() else ""
        raise TokenizerError(f"{folder}: no sentencepiece tokenizer.model{extra}; pass --tokenizer FILE")
    metadata = sentencepiece_metadata(model_file, config.vocab_size)
    metadata["tokenizer.ggml.bos_token_id"] = config.bos_token_id
    metadata["tokenizer.ggml.eos_token_id"] = config.eos_token_id
    settings = _tokenizer_config(folder)
    metadata["tokenizer.ggml.add_bos_token"] = _flag(settings, "add_bos_token", True)
    metadata["tokenizer.ggml.add_eos_token"] = _flag(settings, "add_eos_token", False)
    if isinstance(settings.get("chat_template"), str):
        metadata["tokenizer.chat_template"] = settings["chat_template"]
    return metadata


def _tokenizer_config(folder: Path) -> dict[str, Any]:
    return read_json_object(folder / "tokenizer_config.json")


def _flag(settings: dict[str, Any], key: str, default: bool) -> bool:
    value = settings.get(key)
    return value if isinstance(value, bool) else default
