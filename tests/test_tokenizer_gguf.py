"""GGUF vocabularies: `llama` equals sentencepiece's tokenizer.model, `gpt2` equals llama.cpp (pinned ids)."""

import json
import random
from pathlib import Path

import gguf
import pytest
import sentencepiece

from komt.errors import KomtError, TokenizerError
from komt.generate.gguf_tokenizer import PRE_TOKENIZERS, sentencepiece_model_proto, tokenizer_from_gguf_metadata
from komt.generate.hf_tokenizer import HFTokenizer
from komt.generate.sentencepiece_tokenizer import SentencePieceTokenizer
from komt.generate.stream import StreamDecoder
from komt.generate.tokenizer import load_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
REFS = json.loads((FIXTURES / "tokenizer_refs.json").read_text(encoding="utf-8"))
LLAMA_CPP = json.loads((FIXTURES / "tokenizer_refs_llama_cpp.json").read_text(encoding="utf-8"))
EXPECTED = json.loads((FIXTURES / "tokenizer" / "expected.json").read_text(encoding="utf-8"))
CORPUS = REFS["corpus"]


def sentencepiece_metadata(path: Path) -> dict:
    """tokenizer.model as convert_hf_to_gguf.py's _create_vocab_sentencepiece writes it (llama-vocab types)."""
    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    types = []
    for i in range(sp.vocab_size()):
        kind = gguf.TokenType.NORMAL
        if sp.is_unknown(i):
            kind = gguf.TokenType.UNKNOWN
        elif sp.is_control(i):
            kind = gguf.TokenType.CONTROL
        elif sp.is_unused(i):
            kind = gguf.TokenType.UNUSED
        elif sp.is_byte(i):
            kind = gguf.TokenType.BYTE
        types.append(int(kind))
    return {
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(sp.vocab_size())],
        "tokenizer.ggml.scores": [sp.get_score(i) for i in range(sp.vocab_size())],
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": sp.bos_id(), "tokenizer.ggml.eos_token_id": sp.eos_id(),
        "tokenizer.ggml.unknown_token_id": sp.unk_id(),
        "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": False,
    }


def gguf_metadata(path: Path) -> dict:
    """The tokenizer.* metadata of a GGUF file as a plain dict (what komt's GGUF reader will hand over)."""
    return {key: field.contents() for key, field in gguf.GGUFReader(str(path)).fields.items()
            if key.startswith("tokenizer.")}


@pytest.fixture(scope="module")
def reference():
    return load_tokenizer(FIXTURES / "tokenizer")


@pytest.fixture(scope="module")
def llama(reference):
    return tokenizer_from_gguf_metadata(sentencepiece_metadata(FIXTURES / "tokenizer" / "tokenizer.model"), "m.gguf")


@pytest.fixture(scope="module")
def smollm2_metadata():
    return gguf_metadata(FIXTURES / "smollm2-tokenizer" / "vocab.gguf")


@pytest.fixture(scope="module")
def smollm2(smollm2_metadata):
    return tokenizer_from_gguf_metadata(smollm2_metadata, "vocab.gguf")


# ---- llama: a sentencepiece model rebuilt from the GGUF vocabulary ----------------------------------------

def test_llama_vocabulary_becomes_sentencepiece_with_the_same_special_ids(llama, reference):
    assert isinstance(llama, SentencePieceTokenizer) and llama.source == "m.gguf"
    assert (llama.vocab_size, llama.bos_id, llama.eos_id, llama.unk_id, llama.add_bos) == (32000, 1, 2, 0, True)
    assert [llama.id_to_piece(i) for i in (0, 1, 2, 3 + 0xED, 28705)] == ["<unk>", "<s>", "</s>", "<0xED>", "\u2581"]
    assert llama.unk_surface == reference.unk_surface


@pytest.mark.parametrize("case", EXPECTED["encode_no_bos"], ids=lambda c: repr(c["text"][:12]))
def test_llama_ids_equal_the_fixture_ids(llama, case):
    assert llama.encode(case["text"], bos=False) == case["ids"]
    assert llama.decode(case["ids"]) == case["text"]


def test_llama_ids_equal_sentencepiece_and_llama_cpp_on_the_corpus(llama, reference):
    for text, ids in zip(CORPUS, LLAMA_CPP["mistral-spm-gguf"]["ids"]):
        assert llama.encode(text) == reference.encode(text)
        assert llama.encode(text, bos=False) == ids, text  # llama.cpp's own SPM tokenizer agrees here too


def test_llama_ids_equal_sentencepiece_on_random_strings(llama, reference):
    rng = random.Random(5)
    alphabet = list("  \t\n가나다혼녕 abcXYZ019.,!?😀é\u00a0") + ["  ", "\n\n", "제주도", "Hello", " world", "▁"]
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))
        assert llama.encode(text) == reference.encode(text), text


def test_llama_decoding_and_streaming_follow_sentencepiece(llama, reference):
    rng = random.Random(3)
    for _ in range(500):
        ids = [rng.randrange(llama.vocab_size) for _ in range(rng.randint(0, 12))]
        decoder = StreamDecoder(llama)
        assert "".join(decoder.push(i) for i in ids) + decoder.flush() == reference.decode(ids) == llama.decode(ids)


def test_written_proto_parses_back_to_the_same_pieces(reference):
    sp = sentencepiece.SentencePieceProcessor(model_file=str(FIXTURES / "tokenizer" / "tokenizer.model"))
    meta = sentencepiece_metadata(FIXTURES / "tokenizer" / "tokenizer.model")
    proto = sentencepiece_model_proto(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"],
                                      meta["tokenizer.ggml.token_type"], {"unk_token": "<unk>", "bos_token": "<s>",
                                                                          "eos_token": "</s>"})
    rebuilt = sentencepiece.SentencePieceProcessor(model_proto=proto)
    assert [rebuilt.id_to_piece(i) for i in range(32000)] == [sp.id_to_piece(i) for i in range(32000)]
    assert [rebuilt.get_score(i) for i in range(0, 32000, 97)] == [sp.get_score(i) for i in range(0, 32000, 97)]
    assert all(rebuilt.is_byte(i) == sp.is_byte(i) and rebuilt.is_control(i) == sp.is_control(i) for i in range(300))


def test_llama_chat_template_and_end_of_turn_ids_come_from_the_metadata():
    meta = sentencepiece_metadata(FIXTURES / "tokenizer" / "tokenizer.model")
    meta.update({"tokenizer.chat_template": "T", "tokenizer.chat_template.tool_use": "U",
                 "tokenizer.ggml.eot_token_id": 1, "tokenizer.ggml.add_bos_token": False})
    tok = tokenizer_from_gguf_metadata(meta, "x.gguf")
    assert tok.chat_templates == {"default": "T", "tool_use": "U"} and "x.gguf" in tok.chat_template_file
    assert tok.stop_ids == (2, 1) and tok.add_bos is False and tok.encode("hi")[0] != 1


# ---- gpt2: a tokenizers byte-level BPE from tokens + merges -----------------------------------------------

def test_smollm2_gguf_metadata_builds_a_byte_level_bpe(smollm2):
    assert isinstance(smollm2, HFTokenizer) and smollm2.stream_kind == "byte_level"
    assert (smollm2.vocab_size, smollm2.bos_id, smollm2.eos_id, smollm2.unk_id, smollm2.pad_id) == (49152, 1, 2, 0, 2)
    assert smollm2.add_bos is LLAMA_CPP["smollm2-gguf"]["add_bos"] is False
    assert smollm2.stop_ids == (2,) and smollm2.chat_templates["default"].startswith("{% for message in messages %}")


def test_smollm2_ids_equal_llama_cpp_on_the_real_file(smollm2):
    assert LLAMA_CPP["smollm2-gguf"] == LLAMA_CPP["smollm2-vocab-gguf"]  # the fixture holds the file's vocabulary
    for text, ids in zip(CORPUS, LLAMA_CPP["smollm2-gguf"]["ids"]):
        assert smollm2.encode(text) == ids, text


def test_smollm2_gguf_and_tokenizer_json_agree(smollm2):
    for text, ids in zip(CORPUS, REFS["transformers"]["smollm2-tokenizer"]["ids"]):
        assert smollm2.encode(text, bos=False) == ids, text
        assert smollm2.decode(ids) == text


def test_rendered_chat_templates_encode_like_llama_cpp_with_special_parsing(smollm2):
    cases = LLAMA_CPP["smollm2-gguf"]["templates"]
    assert len(cases) == 8
    for key, ids in cases.items():
        assert smollm2.encode_with_specials(REFS["templates"][key]["text"]) == ids, key


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "qwen2", "default"])
def test_pre_tokenizer_types_equal_llama_cpp(smollm2_metadata, pre):
    tok = tokenizer_from_gguf_metadata({**smollm2_metadata, "tokenizer.ggml.pre": pre})
    for text, ids in zip(CORPUS, LLAMA_CPP[f"smollm2-pre-{pre}"]["ids"]):
        assert tok.encode(text, bos=False) == ids, (pre, text)


def test_llama3_pre_tokenizer_adds_bos_by_default(smollm2_metadata):
    meta = {k: v for k, v in smollm2_metadata.items() if k != "tokenizer.ggml.add_bos_token"}
    assert tokenizer_from_gguf_metadata({**meta, "tokenizer.ggml.pre": "llama-bpe"}).add_bos is True
    assert tokenizer_from_gguf_metadata(meta).add_bos is False  # smollm, as llama.cpp defaults it
    assert {"default", "gpt-2", "llama-bpe", "smollm", "qwen2"} <= set(PRE_TOKENIZERS)


# ---- errors ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    ({"tokenizer.ggml.model": "t5"}, "tokenizer.ggml.model 't5' is not one komt reads"),
    ({"tokenizer.ggml.model": None}, "is not one komt reads"),
    ({"tokenizer.ggml.pre": "mystery"}, "tokenizer.ggml.pre 'mystery'"),
    ({"tokenizer.ggml.tokens": None}, "tokenizer.ggml.tokens is missing"),
    ({"tokenizer.ggml.bos_token_id": 10**6}, r"tokenizer.ggml.bos_token_id must be a token id in \[0, 49152\)"),
    ({"tokenizer.ggml.token_type": [1, 2]}, "token_type must give one type"),
    ({"tokenizer.ggml.merges": ["nospace"]}, "is not 'left right'"),
    ({"tokenizer.ggml.add_bos_token": "yes"}, "add_bos_token must be true or false"),
])
def test_bad_metadata_is_one_line_error_naming_the_key(smollm2_metadata, change, message):
    with pytest.raises(TokenizerError, match=message) as err:
        tokenizer_from_gguf_metadata({**smollm2_metadata, **change}, "bad.gguf")
    assert "bad.gguf" in str(err.value) and "\n" not in str(err.value)


def test_duplicate_tokens_are_an_error(smollm2_metadata):
    tokens = list(smollm2_metadata["tokenizer.ggml.tokens"])
    tokens[100] = tokens[99]
    with pytest.raises(TokenizerError, match="appears twice"):
        tokenizer_from_gguf_metadata({**smollm2_metadata, "tokenizer.ggml.tokens": tokens})


def test_llama_scores_must_match_the_tokens():
    meta = sentencepiece_metadata(FIXTURES / "tokenizer" / "tokenizer.model")
    meta["tokenizer.ggml.scores"] = meta["tokenizer.ggml.scores"][:10]
    with pytest.raises(TokenizerError, match="tokenizer.ggml.scores has 10 entries for 32000 tokens"):
        tokenizer_from_gguf_metadata(meta)


# ---- GGUF files through load_tokenizer (komt's GGUF reader) and komt's own GGUF export ---------------------

def test_load_tokenizer_reads_a_gguf_files_vocabulary(smollm2):
    tok = load_tokenizer(FIXTURES / "smollm2-tokenizer" / "vocab.gguf")
    assert isinstance(tok, HFTokenizer) and tok.source.endswith("vocab.gguf")
    for text, ids in zip(CORPUS, LLAMA_CPP["smollm2-gguf"]["ids"]):
        assert tok.encode(text) == ids, text
    assert tok.chat_templates == smollm2.chat_templates and tok.stop_ids == (2,)


def test_a_file_that_is_not_gguf_is_a_one_line_error(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"not a gguf file, but long enough for a header")
    with pytest.raises(KomtError, match="model.gguf: not a GGUF file"):
        load_tokenizer(tmp_path / "model.gguf")


def test_komts_gguf_export_metadata_reads_back_as_the_same_tokenizer(reference):
    from komt.export.tokenizer import sentencepiece_metadata as export_metadata

    meta = export_metadata(FIXTURES / "tokenizer" / "tokenizer.model", 32000)
    meta.update({"tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
                 "tokenizer.ggml.add_bos_token": True})
    tok = tokenizer_from_gguf_metadata(meta, "export")
    for text in CORPUS:
        assert tok.encode(text) == reference.encode(text), text
