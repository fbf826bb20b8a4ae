"""The sentencepiece backend: `tokenizer.model` (komt-mistral-7b-v1's is Mistral 7B v0.1's), behind komt's API.

Text is NFC-normalized before encoding. The model's normalizer is the identity, so decomposed Hangul (what
macOS keyboards and file names produce) would otherwise encode as 3 byte-fallback tokens per jamo instead of
one piece per syllable, and the model would read gibberish. Decoding is sentencepiece's own, so
`decode(encode(text))` round-trips NFC text exactly; `komt.generate.stream` reproduces it token by token.

Text rendered by a chat template (`encode_with_specials`) may contain the special tokens' strings ("<s>",
"</s>"): sentencepiece would spell them as ordinary text, so they are cut out and mapped to their ids first,
as transformers does. Each text segment between them gets sentencepiece's dummy-prefix "▁", unless it starts
with a space, which then serves as that "▁": so "</s> [INST]" is "</s>", "▁[", ... as in mistral-common and
in transformers' Llama tokenizer with `legacy=True` (Metaspace, prepend_scheme "always").
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import sentencepiece

from komt.errors import TokenizerError
from komt.jsonutil import require_regular_file
from komt.generate.tokenizer import normalize_text
from komt.generate.tokenizer_files import TokenizerSettings

TOKENIZER_FILE = "tokenizer.model"
SPACE = "\u2581"  # sentencepiece's word-boundary marker "▁", decoded as " "


class SentencePieceTokenizer:
    """A loaded sentencepiece model: encode text to ids, decode ids to text, and describe single pieces.

    The piece-level queries (`is_control`, `is_byte`, `is_unknown`, `id_to_piece`) are what the streaming
    detokenizer needs to decode one token at a time without re-decoding the whole output.
    """

    stream_kind = "sentencepiece"  # komt.generate.stream replays sentencepiece's Decode

    def __init__(self, processor: sentencepiece.SentencePieceProcessor, source: str,
                 settings: TokenizerSettings | None = None) -> None:
        settings = settings or TokenizerSettings()
        self._sp = processor
        self.source = source
        self.vocab_size: int = processor.vocab_size()
        self.bos_id: int | None = _id_or_none(processor.bos_id())
        self.eos_id: int | None = _id_or_none(processor.eos_id())
        self.unk_id: int | None = _id_or_none(processor.unk_id())
        # What sentencepiece prints for <unk> (" ⁇ " unless the model overrides it); never stripped.
        self.unk_surface: str = processor.decode([self.unk_id]) if self.unk_id is not None else ""
        # Llama/Mistral put BOS before every text; a tokenizer_config.json may say otherwise.
        self.add_bos: bool = settings.add_bos_token if settings.add_bos_token is not None else self.bos_id is not None
        self.stop_ids: tuple[int, ...] = _stop_ids(self.eos_id, settings.generation_eos_ids, self.vocab_size)
        specials = [i for i in range(self.vocab_size) if processor.is_control(i) or processor.is_unknown(i)]
        self._special_ids = {processor.id_to_piece(i): i for i in specials}
        # Longest first, so that "</s>" wins over a "<" that is also special somewhere.
        names = sorted(self._special_ids, key=len, reverse=True)
        self._special_pattern = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None
        self.special_tokens_map: dict[str, str] = {
            name: processor.id_to_piece(i)
            for name, i in (("bos_token", self.bos_id), ("eos_token", self.eos_id), ("unk_token", self.unk_id))
            if i is not None
        }
        pad = settings.tokens.get("pad_token")
        self.pad_id: int | None = self._special_ids.get(pad) if pad else None
        if self.pad_id is not None:
            self.special_tokens_map["pad_token"] = pad
        if settings.additional_special_tokens:
            self.special_tokens_map["additional_special_tokens"] = list(settings.additional_special_tokens)
        self.chat_templates: dict[str, str] = dict(settings.chat_templates)
        self.chat_template_file: str | None = settings.chat_template_file

    def encode(self, text: str, bos: bool | None = None, eos: bool = False) -> list[int]:
        """Ids of NFC(`text`), with sentencepiece's dummy-prefix space, optionally framed by BOS/EOS.

        `bos=None` follows the tokenizer's `add_bos` (True for Llama/Mistral). Special-token strings in
        `text` stay text, as sentencepiece spells them; `encode_with_specials` maps them to their ids.
        """
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects a str, got {type(text).__name__}")
        ids = self._sp.encode(normalize_text(text))
        return self._frame(ids, self.add_bos if bos is None else bos, eos)

    def encode_with_specials(self, text: str) -> list[int]:
        """Ids of text written by a chat template: special-token strings become their ids (module docstring)."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects a str, got {type(text).__name__}")
        text = normalize_text(text)
        parts = self._special_pattern.split(text) if self._special_pattern else [text]
        ids: list[int] = []
        for i, part in enumerate(parts):
            if i % 2:  # re.split puts the captured special tokens at the odd positions
                ids.append(self._special_ids[part])
            elif part:
                ids += self._encode_segment(part)
        return ids

    def _encode_segment(self, part: str) -> list[int]:
        if not part.startswith(" "):
            return self._sp.encode(part)
        if len(part) > 1:
            return self._sp.encode(part[1:])  # the leading space is the dummy prefix sentencepiece adds
        space = self._sp.piece_to_id(SPACE)
        return [space] if space != self._sp.unk_id() else self._sp.encode(part)

    def _frame(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        if bos and self.bos_id is None:
            raise TokenizerError(f"{self.source} has no BOS token; encode with bos=False")
        if eos and self.eos_id is None:
            raise TokenizerError(f"{self.source} has no EOS token; encode with eos=False")
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

    is_special = is_control  # the backend-neutral name: a token `decode` leaves out

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
        return (f"SentencePieceTokenizer({self.source!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id})")


def load_sentencepiece(data: bytes, source: str, settings: TokenizerSettings | None = None) -> SentencePieceTokenizer:
    """A SentencePieceTokenizer from the bytes of a model proto; any failure is a TokenizerError naming `source`."""
    try:
        processor = sentencepiece.SentencePieceProcessor(model_proto=data)
    except (RuntimeError, OSError, ValueError) as e:
        raise TokenizerError(f"{source} is not a sentencepiece model (parse failed); re-download {TOKENIZER_FILE}") from e
    if processor.vocab_size() == 0:  # an empty file "loads" as an uninitialised processor
        raise TokenizerError(f"{source} is not a sentencepiece model (empty vocabulary); re-download {TOKENIZER_FILE}")
    _check_decoder_convention(processor, source)
    return SentencePieceTokenizer(processor, source, settings)


def read_sentencepiece(file: Path, settings: TokenizerSettings | None = None) -> SentencePieceTokenizer:
    """Load a `tokenizer.model` file."""
    require_regular_file(file, TokenizerError)  # a FIFO would block in read_bytes
    try:
        data = file.read_bytes()
    except OSError as e:
        raise TokenizerError(f"cannot read {file}: {e.strerror or e}") from e
    return load_sentencepiece(data, str(file), settings)


def _check_decoder_convention(processor: sentencepiece.SentencePieceProcessor, source: str) -> None:
    """Refuse models whose decoder strips spaces differently from Llama/Mistral's (add_dummy_prefix only).

    `komt.generate.stream` replays sentencepiece's decoding one token at a time under that convention; a
    model with `remove_extra_whitespaces` or without a dummy prefix would stream text that differs from
    `decode`. Probe: two "▁" pieces must decode to one space (the first one is the dummy prefix).
    """
    space_id = processor.piece_to_id(SPACE)
    if space_id == processor.unk_id():
        return  # no bare "▁" piece to probe with; nothing known to be wrong
    if processor.decode([space_id, space_id]) != " ":
        raise TokenizerError(f"{source} uses whitespace normalization komt cannot stream (expected Llama/Mistral's dummy prefix)")


def _id_or_none(token_id: int) -> int | None:
    return token_id if token_id >= 0 else None


def _stop_ids(eos_id: int | None, extra: tuple[int, ...], vocab_size: int) -> tuple[int, ...]:
    """EOS and generation_config.json's eos ids: the tokens that end a generation (in vocabulary only)."""
    ids = ([eos_id] if eos_id is not None else []) + [i for i in extra if i < vocab_size]
    return tuple(dict.fromkeys(ids))
