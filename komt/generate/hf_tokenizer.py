"""The tokenizer.json backend: Hugging Face's format, run by the `tokenizers` library, behind komt's API.

`tokenizers` (the Rust library transformers itself runs) executes the whole pipeline the file describes:
added and special tokens (split out of the text first), normalizer, pre-tokenizer, the BPE/Unigram/WordPiece
model with byte fallback, decoder. So komt's ids are `tokenizers`' ids by construction; the file's own
truncation and padding settings are switched off (komt never wants a prompt silently cut). It is imported
inside the functions that need it, so sentencepiece-only use of komt never loads it.

What komt adds on top, and why:
- NFC before encoding, as for every backend (komt.generate.tokenizer);
- decoding drops special tokens (transformers' `skip_special_tokens=True`) and never applies transformers'
  `clean_up_tokenization_spaces` (it rewrites " ." to "." and so breaks the round trip);
- `DecodeRules`: the decoder pipeline, read from the file, in the two shapes komt.generate.stream can replay
  one token at a time: `ByteLevel` (GPT-2 / Llama-3 / SmolLM2 / Qwen2: each token is bytes, decoded as
  UTF-8 with replacement) and `Replace("▁", " ")* ByteFallback Fuse [Strip]` (the Llama/Mistral conversion of
  sentencepiece models). Any other decoder is refused at load: a stream that differs from `decode` is worse.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from komt.errors import TokenizerError
from komt.jsonutil import parse_json, require_regular_file
from komt.generate.tokenizer import normalize_text
from komt.generate.tokenizer_files import TokenizerSettings


@dataclass(frozen=True)
class DecodeRules:
    """How tokens become text, as komt.generate.stream replays it.

    kind "byte_level": the text is the UTF-8 decoding (with replacement) of all tokens' bytes.
    kind "byte_fallback": each piece gets `replacements` (str.replace, in order); "<0xNN>" pieces are bytes,
    and a run of them becomes its UTF-8 text, or one U+FFFD per byte if the run is not valid UTF-8 as a whole
    (tokenizers' ByteFallback); then up to `strip_start` leading `strip_char`s of the whole text are removed.
    """

    kind: str
    replacements: tuple[tuple[str, str], ...] = ()
    strip_char: str = " "
    strip_start: int = 0


class HFTokenizer:
    """A tokenizer.json tokenizer (or one komt built from a GGUF vocabulary) with komt's members (see Tokenizer)."""

    def __init__(self, tokenizer: Any, decoder: dict | None, source: str, settings: TokenizerSettings) -> None:
        self._tk = tokenizer
        self._tk.no_truncation()
        self._tk.no_padding()
        self.source = source
        self.decoding = decode_rules(decoder, source)
        self.stream_kind = self.decoding.kind
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        added = tokenizer.get_added_tokens_decoder()  # id -> AddedToken
        self._special = frozenset(i for i, token in added.items() if token.special)
        ids = {name: self._token_id(text, name) for name, text in settings.tokens.items()}
        self.bos_id: int | None = ids.get("bos_token")
        self.eos_id: int | None = ids.get("eos_token")
        self.unk_id: int | None = ids.get("unk_token")
        self.pad_id: int | None = ids.get("pad_token")
        self.add_bos: bool = (settings.add_bos_token if settings.add_bos_token is not None
                              else self._post_processor_adds_bos())
        extra = [i for i in settings.generation_eos_ids if i < self.vocab_size]
        self.stop_ids: tuple[int, ...] = tuple(dict.fromkeys(([self.eos_id] if self.eos_id is not None else []) + extra))
        self.special_tokens_map: dict[str, Any] = dict(settings.tokens)
        if settings.additional_special_tokens:
            self.special_tokens_map["additional_special_tokens"] = list(settings.additional_special_tokens)
        self.chat_templates: dict[str, str] = dict(settings.chat_templates)
        self.chat_template_file: str | None = settings.chat_template_file

    def encode(self, text: str, bos: bool | None = None, eos: bool = False) -> list[int]:
        """`tokenizers`' ids of NFC(`text`) (added tokens in the text are recognised, as transformers does)."""
        ids = self._encode(text)
        bos = self.add_bos if bos is None else bos
        if bos and self.bos_id is None:
            raise TokenizerError(f"{self.source} has no BOS token; encode with bos=False")
        if eos and self.eos_id is None:
            raise TokenizerError(f"{self.source} has no EOS token; encode with eos=False")
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_with_specials(self, text: str) -> list[int]:
        """Ids of a chat template's output; `tokenizers` already maps special-token strings to their ids."""
        return self._encode(text)

    def _encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects a str, got {type(text).__name__}")
        return self._tk.encode(normalize_text(text), add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """`tokenizers`' decoding of `ids` with special tokens left out."""
        ids = [self._check_id(i) for i in ids]
        return self._tk.decode(ids, skip_special_tokens=True)

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary entry of `token_id` ("Ġthe", "<0xED>", "<|im_end|>"); "" for an id with no entry."""
        return self._tk.id_to_token(self._check_id(token_id)) or ""

    def is_special(self, token_id: int) -> bool:
        return self._check_id(token_id) in self._special

    def _check_id(self, token_id: int) -> int:
        token_id = int(token_id)
        if not 0 <= token_id < self.vocab_size:
            raise TokenizerError(f"token id {token_id} is outside the vocabulary [0, {self.vocab_size}) of {self.source}")
        return token_id

    def _token_id(self, text: str, name: str) -> int:
        token_id = self._tk.token_to_id(text)
        if token_id is None:
            raise TokenizerError(f"{self.source}: the {name} {text!r} named by the tokenizer config is not in the vocabulary")
        return token_id

    def _post_processor_adds_bos(self) -> bool:
        """Whether tokenizer.json's post-processor puts BOS first (Llama-3's TemplateProcessing does)."""
        if self.bos_id is None:
            return False
        with_specials = self._tk.encode("a", add_special_tokens=True).ids
        return with_specials[:1] == [self.bos_id] and self._tk.encode("a", add_special_tokens=False).ids[:1] != [self.bos_id]

    def __repr__(self) -> str:
        return (f"HFTokenizer({self.source!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, decoding={self.stream_kind})")


def read_tokenizer_json(file: Path, settings: TokenizerSettings) -> HFTokenizer:
    """Load a tokenizer.json file; any failure is a TokenizerError naming it."""
    from tokenizers import Tokenizer as TokenizersTokenizer

    require_regular_file(file, TokenizerError)  # a FIFO would block in read_text
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise TokenizerError(f"cannot read {file}: {err}; re-download tokenizer.json") from None
    spec = parse_json(text, str(file), TokenizerError)  # strict, as every JSON file komt reads
    try:
        tokenizer = TokenizersTokenizer.from_str(text)
    except Exception as err:  # tokenizers raises a bare Exception for a file it cannot parse
        raise TokenizerError(f"{file} is not a tokenizer.json the tokenizers library can read: {err}") from None
    return HFTokenizer(tokenizer, spec.get("decoder") if isinstance(spec, dict) else None, str(file), settings)


def decode_rules(decoder: dict | None, source: str) -> DecodeRules:
    """The DecodeRules of a tokenizer.json "decoder" entry, or a TokenizerError for shapes komt cannot stream."""
    steps = decoder.get("decoders", []) if isinstance(decoder, dict) and decoder.get("type") == "Sequence" else [decoder]
    types = [s.get("type") if isinstance(s, dict) else None for s in steps]
    if types == ["ByteLevel"]:
        return DecodeRules("byte_level")
    replacements, i = [], 0
    while i < len(steps) and types[i] == "Replace" and isinstance(steps[i].get("pattern"), dict) \
            and "String" in steps[i]["pattern"] and isinstance(steps[i].get("content"), str):
        replacements.append((steps[i]["pattern"]["String"], steps[i]["content"]))
        i += 1
    if types[i:i + 2] == ["ByteFallback", "Fuse"]:
        rest = steps[i + 2:]
        if not rest:
            return DecodeRules("byte_fallback", tuple(replacements))
        strip = rest[0]
        if len(rest) == 1 and types[-1] == "Strip" and strip.get("stop", 0) == 0 \
                and isinstance(strip.get("content"), str) and len(strip["content"]) == 1:
            return DecodeRules("byte_fallback", tuple(replacements), strip["content"], int(strip.get("start", 0)))
    raise TokenizerError(f"{source}: its decoder {types} is not one komt can stream; komt supports ByteLevel and "
                         f"Replace/ByteFallback/Fuse/Strip (the Llama/Mistral conversion)")
