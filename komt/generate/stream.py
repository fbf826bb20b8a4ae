"""Streaming detokenization and stop strings: turn sampled ids into text the moment it is final.

`StreamDecoder` replays the tokenizer's own decoding one token at a time, so the concatenation of what it
emits equals `tokenizer.decode` of all ids, for any id sequence (tests/test_stream.py checks this against
sentencepiece and `tokenizers` on random ids), and no U+FFFD ever stands for a character whose bytes are
still arriving. It picks one of three replays by the tokenizer's `stream_kind`:

`SentencePieceStream` (tokenizer.model) mirrors sentencepiece_processor.cc's `Decode`, doing O(1) work per
token: a normal piece is final as soon as it arrives; byte-fallback pieces (Hangul syllables missing from
the vocabulary arrive as `<0xED><0x98><0xBC>`) are held until they form a complete UTF-8 character.
- control pieces (<s>, </s>) decode to nothing; <unk> decodes to " ⁇ ";
- "▁" becomes " ", except that the leading "▁" of the first piece is dropped (the dummy prefix added at
  encode time); the first piece is the first one that yields text or consumes that "▁";
- a run of consecutive byte pieces is decoded as UTF-8 one character at a time; a byte that does not start
  a well-formed character (Unicode Table 3-7) becomes U+FFFD on its own and decoding resumes at the next
  byte; any non-byte piece ends the run.

`ByteLevelStream` (GPT-2-style tokenizer.json / GGUF `gpt2`): every token is a few bytes (tokenizers'
ByteLevel decoder maps each character of the piece back to a byte) and the text is their UTF-8 decoding with
replacement; Python's incremental decoder gives exactly that, holding an unfinished character's bytes.

`ByteFallbackStream` (a sentencepiece model converted to tokenizer.json): tokenizers' Replace, ByteFallback,
Fuse, Strip. A byte run is held until it ends, because ByteFallback turns the whole run into U+FFFDs when any
of its bytes is invalid: text emitted early could not be taken back.

Special tokens (BOS, EOS, <|im_end|>) decode to nothing in every backend; in the tokenizers backends they are
left out before decoding, so a byte run continues across them, as in `decode`.

`StopMatcher` sits after the decoder: it holds back text that might be the start of a stop string and
stops (without emitting the stop string) once one appears, even when it spans several tokens.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterable

from komt.errors import GenerationError, TokenizerError
from komt.generate.sentencepiece_tokenizer import SPACE
from komt.generate.tokenizer import Tokenizer, normalize_text

REPLACEMENT = "\ufffd"
_TAIL = (0x80, 0xBF)


def _continuation_ranges(lead: int) -> tuple[tuple[int, int], ...] | None:
    """Allowed ranges of the bytes after `lead` in a well-formed UTF-8 character; None if `lead` cannot start one.

    Unicode Table 3-7: the narrowed second-byte ranges exclude overlong forms (E0, F0), UTF-16 surrogates
    (ED) and code points past U+10FFFF (F4).
    """
    if lead <= 0x7F:
        return ()
    if 0xC2 <= lead <= 0xDF:
        return (_TAIL,)
    if lead == 0xE0:
        return ((0xA0, 0xBF), _TAIL)
    if lead == 0xED:
        return ((0x80, 0x9F), _TAIL)
    if 0xE1 <= lead <= 0xEF:
        return (_TAIL, _TAIL)
    if lead == 0xF0:
        return ((0x90, 0xBF), _TAIL, _TAIL)
    if 0xF1 <= lead <= 0xF3:
        return (_TAIL, _TAIL, _TAIL)
    if lead == 0xF4:
        return ((0x80, 0x8F), _TAIL, _TAIL)
    return None  # 0x80..0xC1 and 0xF5..0xFF never start a character


class StreamDecoder:
    """Decode ids one at a time; `push` returns the text that became final, `flush` the rest at the end.

    Invariant: "".join(push(i) for i in ids) + flush() == tokenizer.decode(ids). Feed it only the generated
    ids (not the prompt): like `decode`, it drops the leading space of the first piece.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        kind = tokenizer.stream_kind
        if kind == "sentencepiece":
            self._stream = SentencePieceStream(tokenizer)
        elif kind == "byte_level":
            self._stream = ByteLevelStream(tokenizer)
        elif kind == "byte_fallback":
            self._stream = ByteFallbackStream(tokenizer)
        else:
            raise TokenizerError(f"{tokenizer.source}: komt cannot stream a tokenizer decoded as {kind!r}")

    def push(self, token_id: int) -> str:
        """Add one id; return the text it made final ("" while a character's bytes are incomplete)."""
        return self._stream.push(token_id)

    def flush(self) -> str:
        """Text still held at the end of generation (unfinished bytes as U+FFFD, as `decode` shows them)."""
        return self._stream.flush()


class SentencePieceStream:
    """sentencepiece's Decode, one token at a time (module docstring)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._pending = bytearray()  # bytes of the current byte-piece run not yet resolved; at most 3
        self._strip_space = True  # sentencepiece's `is_bos_ws`: the next piece's leading "▁" is the dummy prefix

    def push(self, token_id: int) -> str:
        """Add one id; return the text it made final ("" while a character's bytes are incomplete)."""
        tok = self.tokenizer
        if tok.is_byte(token_id):
            self._pending.append(int(tok.id_to_piece(token_id)[3:5], 16))  # "<0xED>" -> 0xED
            text = self._drain(final=False)
        else:
            text = self._drain(final=True)  # a non-byte piece ends the byte run
            if text:
                self._strip_space = False
            text += self._piece_text(token_id)
        if text:
            self._strip_space = False
        return text

    def flush(self) -> str:
        """Text still held at the end of generation: bytes of an unfinished character, as U+FFFD each."""
        text = self._drain(final=True)
        if text:
            self._strip_space = False
        return text

    def _piece_text(self, token_id: int) -> str:
        tok = self.tokenizer
        if tok.is_control(token_id):
            return ""
        if tok.is_unknown(token_id):
            return tok.unk_surface
        piece = tok.id_to_piece(token_id)
        if self._strip_space and piece.startswith(SPACE):
            piece = piece[1:]
            self._strip_space = False  # consumed the dummy prefix, even if nothing is left to print
        return piece.replace(SPACE, " ")

    def _drain(self, final: bool) -> str:
        """Resolve pending bytes into characters; keep a valid but incomplete tail unless `final`."""
        buf, out = self._pending, []
        while buf:
            ranges = _continuation_ranges(buf[0])
            need = 1 + len(ranges) if ranges is not None else 0
            well_formed_so_far = ranges is not None and all(
                lo <= b <= hi for b, (lo, hi) in zip(buf[1:need], ranges)
            )
            if well_formed_so_far and len(buf) >= need:
                out.append(bytes(buf[:need]).decode("utf-8"))
                del buf[:need]
            elif well_formed_so_far and not final:
                break  # wait for the rest of this character
            else:
                out.append(REPLACEMENT)  # this byte can never start a character here: one U+FFFD, go on
                del buf[0]
        return "".join(out)


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's `bytes_to_unicode`, inverted: character -> the byte it spells in a byte-level vocabulary.

    Printable Latin-1 bytes stand for themselves; the other 68 (space, control bytes, ...) are shifted to
    U+0100 upwards, which is why a space is "Ġ" (U+0120) in these vocabularies.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + len(chars) - len(printable))
    return {c: b for b, c in chars.items()}


BYTE_LEVEL_ALPHABET = _byte_level_alphabet()
_FALLBACK_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class ByteLevelStream:
    """tokenizers' ByteLevel decoder, one token at a time (module docstring)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        tok = self.tokenizer
        if tok.is_special(token_id):
            return ""
        piece = tok.id_to_piece(token_id)
        try:
            data = bytes(BYTE_LEVEL_ALPHABET[c] for c in piece)
        except KeyError:  # tokenizers' rule: a piece with a character outside the alphabet is its own UTF-8
            data = piece.encode("utf-8")
        return self._utf8.decode(data)

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class ByteFallbackStream:
    """tokenizers' Replace* ByteFallback Fuse [Strip] decoder, one token at a time (module docstring)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.rules = tokenizer.decoding
        self._run = bytearray()  # the byte pieces of the current run
        self._strip = self.rules.strip_start  # leading strip_chars of the whole text still to remove

    def push(self, token_id: int) -> str:
        tok = self.tokenizer
        if tok.is_special(token_id):
            return ""
        piece = tok.id_to_piece(token_id)
        for old, new in self.rules.replacements:
            piece = piece.replace(old, new)
        byte = _FALLBACK_BYTE.fullmatch(piece)
        if byte:
            self._run.append(int(byte.group(1), 16))
            return ""
        return self._emit(self._end_run() + piece)

    def flush(self) -> str:
        return self._emit(self._end_run())

    def _end_run(self) -> str:
        run, self._run = bytes(self._run), bytearray()
        try:
            return run.decode("utf-8")
        except UnicodeDecodeError:
            return REPLACEMENT * len(run)  # ByteFallback: the whole run, one U+FFFD per byte

    def _emit(self, text: str) -> str:
        while self._strip and text:
            if text[0] != self.rules.strip_char:
                self._strip = 0
                break
            text, self._strip = text[1:], self._strip - 1
        if text:
            self._strip = 0
        return text


class StopMatcher:
    """Cut streamed text at the first stop string, which may span several pieces; the stop string itself is never emitted.

    Text that could be the beginning of a stop string is held back until the next piece settles it, so a
    client never sees half of "</답변>" before generation stops. Generation stops at the first character
    after which the text ends with a stop string (the longest one, if several end there), so the result
    does not depend on how the text was split into pieces. Stop strings are NFC-normalized like prompts.
    """

    def __init__(self, stop_strings: Iterable[str]) -> None:
        stops = [normalize_text(s) for s in stop_strings]
        if any(s == "" for s in stops):
            raise GenerationError(f"stop strings must be non-empty, got {stops!r}")
        self.stop_strings = tuple(dict.fromkeys(stops))
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended generation
        self._held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Add a streamed piece; return (text now safe to emit, whether a stop string has appeared)."""
        if self.stopped:
            return "", True
        buf = self._held + text
        # The stop string that completes first (smallest end) ends generation: the answer is the same
        # however the text was split into pieces, as if it had arrived one character at a time.
        hits = [(i + len(s), i, s) for s in self.stop_strings if (i := buf.find(s)) >= 0]
        if hits:
            _, cut, self.matched = min(hits)
            self.stopped, self._held = True, ""
            return buf[:cut], True
        keep = self._partial_match_len(buf)
        self._held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """Release held text when generation ended without a stop string."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _partial_match_len(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of some stop string."""
        longest = max((len(s) for s in self.stop_strings), default=1)
        for k in range(min(len(buf), longest - 1), 0, -1):
            tail = buf[-k:]
            if any(s.startswith(tail) for s in self.stop_strings):
                return k
        return 0


def token_bytes(tokenizer: Tokenizer, token_id: int) -> bytes:
    """The bytes one token stands for on its own, by the rules its stream replays (module docstring): what
    log-probabilities name a token by. Special tokens are b""; unlike a stream, no leading space is dropped.

    For any ids, b"".join(token_bytes(...)) decoded as UTF-8 is what the stream emits, up to that dropped
    space and the way each backend spells bytes that are no character (tests/test_stream.py).
    """
    if tokenizer.is_special(token_id):
        return b""
    piece = tokenizer.id_to_piece(token_id)
    kind = tokenizer.stream_kind
    if kind == "sentencepiece":
        if tokenizer.is_byte(token_id):
            return bytes([int(piece[3:5], 16)])  # "<0xED>" -> 0xED
        if tokenizer.is_unknown(token_id):
            return tokenizer.unk_surface.encode("utf-8")
        return piece.replace(SPACE, " ").encode("utf-8")
    if kind == "byte_level":
        try:
            return bytes(BYTE_LEVEL_ALPHABET[c] for c in piece)
        except KeyError:  # (tokenizers' rule, as in ByteLevelStream)
            return piece.encode("utf-8")
    for old, new in tokenizer.decoding.replacements:  # byte_fallback
        piece = piece.replace(old, new)
    byte = _FALLBACK_BYTE.fullmatch(piece)
    return bytes([int(byte.group(1), 16)]) if byte else piece.encode("utf-8")
