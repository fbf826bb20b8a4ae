"""Streaming detokenizer and stop strings: streamed text equals decode, appears as soon as final, stops cleanly."""

import json
import random
import unicodedata
from pathlib import Path

import pytest

from komt.errors import GenerationError, TokenizerError
from komt.generate.stream import StopMatcher, StreamDecoder
from komt.generate.tokenizer import load_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "tokenizer"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text(encoding="utf-8"))
KOREAN = [c["text"] for c in EXPECTED["encode_no_bos"] if c["text"]] + [
    "네, 안녕하세요! 혼자 여행하기 좋은 곳은 우도, 섭지코지, 성산일출봉입니다.",
]
BYTE0 = 3  # id of <0x00>; <0xNN> is BYTE0 + 0xNN


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(FIXTURES)


def stream(tok, ids):
    decoder = StreamDecoder(tok)
    pieces = [decoder.push(i) for i in ids]
    return pieces, decoder.flush()


@pytest.mark.parametrize("text", KOREAN, ids=lambda t: repr(t[:10]))
def test_korean_streams_each_character_as_soon_as_it_is_final(tok, text):
    ids = tok.encode(text, bos=False)
    pieces, rest = stream(tok, ids)
    assert "".join(pieces) + rest == tok.decode(ids) == text
    assert rest == "" and not any("\ufffd" in p for p in pieces)
    for k in range(1, len(ids) + 1):
        # Everything decodable from the first k ids is out, except the bytes of an unfinished character.
        assert "".join(pieces[:k]) == tok.decode(ids[:k]).rstrip("\ufffd")


def test_byte_fallback_syllable_is_held_until_its_last_byte(tok):
    ids = tok.encode("혼자", bos=False)  # "혼" is not in the vocabulary: <0xED><0x98><0xBC>
    assert ids[:4] == [28705, BYTE0 + 0xED, BYTE0 + 0x98, BYTE0 + 0xBC]
    pieces, rest = stream(tok, ids)
    assert pieces[:4] == ["", "", "", "혼"]
    assert "".join(pieces) + rest == "혼자"


def test_leading_space_of_first_piece_is_stripped_like_decode(tok):
    hello, world = 22557, 1526  # "▁Hello", "▁world"
    assert stream(tok, [hello, world]) == (["Hello", " world"], "")
    assert stream(tok, [tok.bos_id, hello, tok.eos_id]) == (["", "Hello", ""], "")
    assert stream(tok, [28705, 28705, hello]) == (["", " ", " Hello"], "")  # only the first "▁" is the prefix
    assert stream(tok, [BYTE0 + 0x41, hello]) == (["A", " Hello"], "")  # bytes end the leading position


def test_unfinished_character_flushes_as_replacement_like_decode(tok):
    ids = [BYTE0 + 0xED, BYTE0 + 0x98]
    pieces, rest = stream(tok, ids)
    assert pieces == ["", ""] and rest == tok.decode(ids) == "\ufffd\ufffd"


def test_malformed_bytes_match_sentencepiece(tok):
    cases = [[0xED, 0xA0, 0x80], [0xC0, 0x80], [0xF4, 0x90, 0x80, 0x80], [0xE2, 0x82, 0x41], [0xF0, 0xE2, 0x82, 0xAC]]
    for raw in cases:
        ids = [BYTE0 + b for b in raw]
        pieces, rest = stream(tok, ids)
        assert "".join(pieces) + rest == tok.decode(ids), raw


def _random_ids(rng, tok, space_ids, length):
    """Ids biased towards what breaks streaming: byte runs, control/unk tokens, "▁"-led pieces."""
    ids = []
    for _ in range(length):
        r = rng.random()
        if r < 0.35:
            ids.append(BYTE0 + rng.randrange(256))
        elif r < 0.45:
            ids.append(rng.choice([tok.unk_id, tok.bos_id, tok.eos_id]))
        elif r < 0.65:
            ids.append(rng.choice(space_ids))
        elif r < 0.8:  # a whole well-formed character spelled in bytes
            char = chr(rng.choice([rng.randrange(0x80, 0x800), rng.randrange(0xAC00, 0xD7A4), rng.randrange(0x10000, 0x110000)]))
            ids += [BYTE0 + b for b in char.encode("utf-8", "surrogatepass")]
        else:
            ids.append(rng.randrange(tok.vocab_size))
    return ids


def test_streamed_text_equals_decode_for_random_ids(tok):
    rng = random.Random(1234)
    space_ids = [i for i in range(tok.vocab_size) if tok.id_to_piece(i).startswith("\u2581")]
    for _ in range(3000):
        ids = _random_ids(rng, tok, space_ids, rng.randint(0, 16))
        pieces, rest = stream(tok, ids)
        assert "".join(pieces) + rest == tok.decode(ids), ids


def test_out_of_vocabulary_id_raises(tok):
    with pytest.raises(TokenizerError, match="32000"):
        StreamDecoder(tok).push(32000)


def run_stops(stops, pieces):
    matcher = StopMatcher(stops)
    out, stopped = [], False
    for piece in pieces:
        text, stopped = matcher.push(piece)
        out.append(text)
        if stopped:
            break
    return out, stopped, matcher.flush()


def test_stop_string_spanning_pieces_is_never_emitted():
    out, stopped, rest = run_stops(["[/INST]"], ["Hi [", "/IN", "ST] more", "never seen"])
    assert out == ["Hi ", "", ""] and stopped and rest == ""


def test_text_that_only_looked_like_a_stop_string_is_released():
    out, stopped, rest = run_stops(["###"], ["a#", "#b", "c#"])
    assert out == ["a", "##b", "c"] and not stopped and rest == "#"


def test_text_without_stop_prefix_is_emitted_immediately():
    out, stopped, _ = run_stops(["</s>", "User:"], ["안녕", "하세요", "!"])
    assert out == ["안녕", "하세요", "!"] and not stopped


def test_first_completed_stop_string_wins_and_push_after_stop_is_empty():
    matcher = StopMatcher(["b", "abc"])
    assert matcher.push("xab") == ("xa", True) and matcher.matched == "b"
    matcher = StopMatcher(["abcd", "bc"])  # "bc" completes before "abcd" though it starts later
    assert matcher.push("xabcd") == ("xa", True) and matcher.matched == "bc"
    matcher = StopMatcher(["c", "abc"])  # both complete at the same character: the longer one is cut
    assert matcher.push("xabc") == ("x", True) and matcher.matched == "abc"
    assert matcher.push("more") == ("", True)
    assert matcher.flush() == ""


def test_stop_strings_are_nfc_normalized():
    stop = unicodedata.normalize("NFD", "답변:")
    out, stopped, _ = run_stops([stop], ["좋아요. ", "답", "변", ": 끝"])
    assert "".join(out) == "좋아요. " and stopped


def test_empty_stop_string_raises():
    with pytest.raises(GenerationError, match="non-empty"):
        StopMatcher(["###", ""])


def _cut_one_char_at_a_time(stops, full):
    """Reference: stop at the first character after which the text ends with a stop string."""
    for end in range(1, len(full) + 1):
        ending = [s for s in stops if full[:end].endswith(s)]
        if ending:
            return full[: end - max(map(len, ending))], True
    return full, False


def test_stop_matcher_is_independent_of_how_text_is_split():
    rng = random.Random(7)
    for _ in range(2000):
        stops = ["".join(rng.choice("ab#") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        full = "".join(rng.choice("ab#c") for _ in range(rng.randint(0, 20)))
        cuts = sorted(rng.sample(range(len(full) + 1), k=min(len(full) + 1, rng.randint(0, 6))))
        pieces = [full[i:j] for i, j in zip([0] + cuts, cuts + [len(full)])]
        out, stopped, rest = run_stops(stops, pieces)
        assert ("".join(out) + rest, stopped) == _cut_one_char_at_a_time(stops, full), (stops, pieces)


def assert_streaming_stops_before(tok, text: str, stop: str) -> None:
    """Decode `text`'s tokens one by one through StreamDecoder + StopMatcher: what comes out stops right
    before `stop`, however its bytes are split into tokens."""
    decoder, matcher, out = StreamDecoder(tok), StopMatcher([stop]), []
    for token_id in tok.encode(text, bos=False):
        emitted, stopped = matcher.push(decoder.push(token_id))
        out.append(emitted)
        if stopped:
            break
    assert stopped and "".join(out) == text[: text.index(stop)]


def test_decoder_and_stop_matcher_stop_inside_byte_fallback_korean(tok):
    text = EXPECTED["encode_no_bos"][0]["text"]  # "... 1박2일로 혼자 여행하려고 ..."; 혼 is three byte tokens
    assert_streaming_stops_before(tok, text, "혼자")


# ---- the tokenizer.json / GGUF backends: tokenizers' ByteLevel and ByteFallback decoders, replayed --------

BPE_FIXTURES = Path(__file__).parent / "fixtures"
BPE_CORPUS = json.loads((BPE_FIXTURES / "tokenizer_refs.json").read_text(encoding="utf-8"))["corpus"]


@pytest.fixture(scope="module", params=["smollm2-tokenizer", "mistral-tokenizer-json"])
def bpe_tok_any(request):
    return load_tokenizer(BPE_FIXTURES / request.param)


@pytest.fixture(scope="module", params=["smollm2-tokenizer", "mistral-tokenizer-json"])
def bpe_tok(request):
    return load_tokenizer(BPE_FIXTURES / request.param)


def _bpe_random_ids(rng, tok, byte_ids, special_ids, length):
    """Ids biased towards what breaks streaming: lone bytes, specials inside byte runs, partial characters."""
    ids = []
    for _ in range(length):
        r = rng.random()
        if r < 0.4:
            ids.append(rng.choice(byte_ids))
        elif r < 0.5:
            ids.append(rng.choice(special_ids))
        elif r < 0.7:  # a whole character, spelled byte by byte
            char = chr(rng.choice([rng.randrange(0x80, 0x800), rng.randrange(0xAC00, 0xD7A4), rng.randrange(0x10000, 0x110000)]))
            ids += tok.encode(char, bos=False) if rng.random() < 0.5 else [rng.choice(byte_ids) for _ in range(2)]
        else:
            ids.append(rng.randrange(tok.vocab_size))
    return ids


def test_bpe_streamed_text_equals_decode_for_random_ids(bpe_tok):
    rng = random.Random(99)
    pieces = [bpe_tok.id_to_piece(i) for i in range(bpe_tok.vocab_size)]
    byte_ids = [i for i, p in enumerate(pieces) if (len(p) == 1 and bpe_tok.stream_kind == "byte_level")
                or (p.startswith("<0x") and len(p) == 6)]
    special_ids = [i for i in range(bpe_tok.vocab_size) if bpe_tok.is_special(i)]
    assert len(byte_ids) >= 200 and special_ids  # SmolLM2 has 235 single-byte tokens
    for _ in range(3000):
        ids = _bpe_random_ids(rng, bpe_tok, byte_ids, special_ids, rng.randint(0, 16))
        pieces, rest = stream(bpe_tok, ids)
        assert "".join(pieces) + rest == bpe_tok.decode(ids), ids


def test_bpe_corpus_streams_without_replacement_characters(bpe_tok):
    for text in BPE_CORPUS:
        ids = bpe_tok.encode(text, bos=False)
        pieces, rest = stream(bpe_tok, ids)
        assert "".join(pieces) + rest == bpe_tok.decode(ids)
        assert not any("\ufffd" in p for p in pieces) and "\ufffd" not in rest
        for k in range(1, len(ids) + 1):
            # Out as soon as final: all of decode(ids[:k]) but an unfinished character (byte-level), or a
            # byte run still open (ByteFallback may yet turn the whole run into U+FFFDs).
            sofar, full = "".join(pieces[:k]), bpe_tok.decode(ids[:k]).rstrip("\ufffd")
            if bpe_tok.stream_kind == "byte_level":
                assert sofar == full
            else:
                assert full.startswith(sofar)


def test_byte_level_holds_a_split_hangul_syllable_until_its_last_byte():
    tok = load_tokenizer(BPE_FIXTURES / "smollm2-tokenizer")
    ids = tok.encode("혼자", bos=False)  # SmolLM2 spells Hangul as byte tokens, bytes of a syllable split
    pieces, rest = stream(tok, ids)
    assert "".join(pieces) == "혼자" and rest == ""
    assert [p for p in pieces if p] == ["혼", "자"]


def test_byte_fallback_run_with_an_invalid_byte_becomes_replacements_like_decode():
    tok = load_tokenizer(BPE_FIXTURES / "mistral-tokenizer-json")
    ids = [BYTE0 + 0xED, BYTE0 + 0x98, BYTE0 + 0xBC, BYTE0 + 0xFF, 22557]  # "혼", then a byte no character has
    pieces, rest = stream(tok, ids)
    assert pieces == ["", "", "", "", "\ufffd" * 4 + " Hello"] == [""] * 4 + [tok.decode(ids)]
    assert stream(tok, [22557, 1526]) == (["Hello", " world"], "")  # the first leading space is stripped


def test_stop_string_inside_byte_level_korean():
    tok = load_tokenizer(BPE_FIXTURES / "smollm2-tokenizer")
    assert_streaming_stops_before(tok, EXPECTED["encode_no_bos"][0]["text"], "혼자")


def test_token_bytes_spell_what_the_stream_decodes(tok, bpe_tok_any):
    """Log-probabilities name tokens by `token_bytes`: joined, they decode to the streamed text (for valid
    UTF-8; sentencepiece and byte-fallback streams also drop the first leading space)."""
    from komt.generate.stream import token_bytes

    for t in (tok, bpe_tok_any):
        for text in ("안녕하세요, 세계!", "Hello world 🌏", " 서울 Seoul"):
            ids = t.encode(text, bos=False)
            joined = b"".join(token_bytes(t, i) for i in ids).decode("utf-8")
            streamed = t.decode(ids)
            assert joined == streamed or (t.stream_kind != "byte_level" and joined[1:] == streamed), (text, joined)
