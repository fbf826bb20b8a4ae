"""Tokenizer: ids equal to the real Mistral 7B v0.1 tokenizer's (fixture), NFC input, load errors."""

import json
import unicodedata
from pathlib import Path

import pytest
import sentencepiece

from komt.errors import TokenizerError
from komt.generate.tokenizer import load_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "tokenizer"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(FIXTURES)


def test_special_ids_and_vocab_size_match_fixture(tok):
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.unk_id) == (
        EXPECTED["vocab_size"], EXPECTED["bos_id"], EXPECTED["eos_id"], EXPECTED["unk_id"]
    )
    assert [tok.id_to_piece(i) for i in (0, 1, 2)] == ["<unk>", "<s>", "</s>"]


@pytest.mark.parametrize("case", EXPECTED["encode_no_bos"], ids=lambda c: repr(c["text"][:12]))
def test_encode_matches_fixture_ids(tok, case):
    assert tok.encode(case["text"], bos=False) == case["ids"]
    assert tok.encode(case["text"]) == [tok.bos_id] + case["ids"]
    assert tok.encode(case["text"], bos=False, eos=True) == case["ids"] + [tok.eos_id]


@pytest.mark.parametrize("case", EXPECTED["encode_no_bos"], ids=lambda c: repr(c["text"][:12]))
def test_decode_inverts_encode_and_drops_special_tokens(tok, case):
    assert tok.decode(case["ids"]) == case["text"]
    assert tok.decode([tok.bos_id] + case["ids"] + [tok.eos_id]) == case["text"]


def test_nfd_korean_input_encodes_like_nfc(tok):
    text = EXPECTED["encode_no_bos"][0]["text"]
    nfd = unicodedata.normalize("NFD", text)
    assert nfd != text
    raw = sentencepiece.SentencePieceProcessor(model_file=str(FIXTURES / "tokenizer.model"))
    assert raw.encode(nfd) != EXPECTED["encode_no_bos"][0]["ids"]  # sentencepiece alone would feed jamo bytes
    assert tok.encode(nfd, bos=False) == EXPECTED["encode_no_bos"][0]["ids"]


def test_id_to_piece_names_byte_fallback_and_space_pieces(tok):
    assert tok.id_to_piece(3 + 0xED) == "<0xED>"
    assert tok.is_byte(3 + 0xED) and not tok.is_byte(28705)
    assert tok.id_to_piece(28705) == "\u2581"
    assert tok.is_control(tok.eos_id) and tok.is_unknown(tok.unk_id)


def test_file_and_folder_paths_load_the_same_tokenizer(tok):
    by_file = load_tokenizer(FIXTURES / "tokenizer.model")
    text = "제주도 여행 Hello"
    assert by_file.encode(text) == tok.encode(text)
    assert load_tokenizer(str(FIXTURES)).vocab_size == tok.vocab_size


@pytest.mark.parametrize("token_id", [-1, 32000, 10**9])
def test_out_of_vocabulary_ids_raise_tokenizer_error(tok, token_id):
    with pytest.raises(TokenizerError, match=str(token_id)):
        tok.decode([22557, token_id])
    with pytest.raises(TokenizerError, match=str(token_id)):
        tok.id_to_piece(token_id)


def test_missing_path_raises_tokenizer_error_naming_it(tmp_path):
    with pytest.raises(TokenizerError, match="nope"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(TokenizerError, match="has no tokenizer.model"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize(
    "content",
    [b"", b"not a sentencepiece model at all" * 10, (FIXTURES / "tokenizer.model").read_bytes()[:1000]],
    ids=["empty", "garbage", "truncated"],
)
def test_corrupt_model_raises_tokenizer_error_naming_it(tmp_path, content):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(content)
    with pytest.raises(TokenizerError, match="tokenizer.model"):
        load_tokenizer(tmp_path)
