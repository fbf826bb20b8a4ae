"""The sentencepiece tokenizer of komt-mistral-7b-v1 (Mistral 7B v0.1's `tokenizer.model`), behind a small API.

Text is NFC-normalized before encoding. The model's normalizer is the identity, so decomposed Hangul (what
macOS keyboards and file names produce) would otherwise encode as 3 byte-fallback tokens per jamo instead of
one piece per syllable, and the model would read gibberish. Decoding is sentencepiece's own, so
`decode(encode(text))` round-trips NFC text exactly; `komt.generate.stream` reproduces it token by token.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Iterable
from pathlib import Path

import sentencepiece

from komt.errors import TokenizerError
from komt.jsonutil import require_regular_file

TOKENIZER_FILE = "tokenizer.model"
SPACE = "\u2581"  # sentencepiece's word-boundary marker "▁", decoded as " "


def normalize_text(text: str) -> str:
    """NFC-normalize `text`: the one normalization every string (prompt, message, stop string) gets."""
    return unicodedata.normalize("NFC", text)


class Tokenizer:
    """A loaded sentencepiece model: encode text to ids, decode ids to text, and describe single pieces.

    The piece-level queries (`is_control`, `is_byte`, `is_unknown`, `id_to_piece`) are what the streaming
    detokenizer needs to decode one token at a time without re-decoding the whole output.
    """

    def __init__(self, processor: sentencepiece.SentencePieceProcessor, source: str) -> None:
        self._sp = processor
        self.source = source
        self.vocab_size: int = processor.vocab_size()
        self.bos_id: int = processor.bos_id()
        self.eos_id: int = processor.eos_id()
        self.unk_id: int = processor.unk_id()
        # What sentencepiece prints for <unk> (" ⁇ " unless the model overrides it); never stripped.
        self.unk_surface: str = processor.decode([self.unk_id]) if self.unk_id >= 0 else ""

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Ids of NFC(`text`), with sentencepiece's dummy-prefix space, optionally framed by BOS/EOS."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects a str, got {type(text).__name__}")
        ids = self._sp.encode(normalize_text(text))
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` exactly as sentencepiece decodes it (BOS/EOS vanish, the first leading space is dropped)."""
        ids = [self._check_id(i) for i in ids]
        return self._sp.decode(ids)

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary entry of `token_id`, e.g. "▁Hello", "<0xED>", "</s>"."""
        return self._sp.id_to_piece(self._check_id(token_id))

    def is_control(self, token_id: int) -> bool:
        """True for BOS/EOS-like pieces, which decode to nothing."""
        return self._sp.is_control(self._check_id(token_id))

    def is_byte(self, token_id: int) -> bool:
        """True for the 256 byte-fallback pieces <0x00>..<0xFF> that spell characters missing from the vocab."""
        return self._sp.is_byte(self._check_id(token_id))

    def is_unknown(self, token_id: int) -> bool:
        """True for <unk>."""
        return self._sp.is_unknown(self._check_id(token_id))

    def _check_id(self, token_id: int) -> int:
        token_id = int(token_id)
        if not 0 <= token_id < self.vocab_size:
            raise TokenizerError(f"token id {token_id} is outside the vocabulary [0, {self.vocab_size}) of {self.source}")
        return token_id

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id})"


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load `tokenizer.model` from a checkpoint folder, or the file itself; any failure is a TokenizerError."""
    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.exists():
        where = f"folder {path} has no {TOKENIZER_FILE}" if path.is_dir() else f"{path} does not exist"
        raise TokenizerError(f"{where}; pass a checkpoint folder containing {TOKENIZER_FILE} or the file itself")
    require_regular_file(file, TokenizerError)  # a FIFO would block in read_bytes
    try:
        data = file.read_bytes()
    except OSError as e:
        raise TokenizerError(f"cannot read {file}: {e.strerror or e}") from e
    try:
        processor = sentencepiece.SentencePieceProcessor(model_proto=data)
    except (RuntimeError, OSError, ValueError) as e:
        raise TokenizerError(f"{file} is not a sentencepiece model (parse failed); re-download {TOKENIZER_FILE}") from e
    if processor.vocab_size() == 0:  # an empty file "loads" as an uninitialised processor
        raise TokenizerError(f"{file} is not a sentencepiece model (empty vocabulary); re-download {TOKENIZER_FILE}")
    _check_decoder_convention(processor, file)
    return Tokenizer(processor, str(file))


def _check_decoder_convention(processor: sentencepiece.SentencePieceProcessor, file: Path) -> None:
    """Refuse models whose decoder strips spaces differently from Llama/Mistral's (add_dummy_prefix only).

    `komt.generate.stream` replays sentencepiece's decoding one token at a time under that convention; a
    model with `remove_extra_whitespaces` or without a dummy prefix would stream text that differs from
    `decode`. Probe: two "▁" pieces must decode to one space (the first one is the dummy prefix).
    """
    space_id = processor.piece_to_id(SPACE)
    if space_id == processor.unk_id():
        return  # no bare "▁" piece to probe with; nothing known to be wrong
    if processor.decode([space_id, space_id]) != " ":
        raise TokenizerError(f"{file} uses whitespace normalization komt cannot stream (expected Llama/Mistral's dummy prefix)")
