"""tokenizer.json backend: ids equal transformers' and tokenizers' (fixture), config files, which file wins, errors."""

import json
import shutil
import unicodedata
from pathlib import Path

import pytest

from komt.errors import TokenizerError
from komt.generate.hf_tokenizer import HFTokenizer, decode_rules
from komt.generate.sentencepiece_tokenizer import SentencePieceTokenizer
from komt.generate.tokenizer import load_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
REFS = json.loads((FIXTURES / "tokenizer_refs.json").read_text(encoding="utf-8"))
CORPUS = REFS["corpus"]
EXPECTED = json.loads((FIXTURES / "tokenizer" / "expected.json").read_text(encoding="utf-8"))
FOLDERS = ["smollm2-tokenizer", "mistral-tokenizer-json"]


@pytest.fixture(scope="module", params=FOLDERS)
def folder(request):
    return request.param


@pytest.fixture(scope="module")
def tokenizers_by_folder():
    return {name: load_tokenizer(FIXTURES / name) for name in FOLDERS}


def test_fixture_folders_load_the_tokenizers_backend(tokenizers_by_folder):
    smol, mistral = tokenizers_by_folder["smollm2-tokenizer"], tokenizers_by_folder["mistral-tokenizer-json"]
    assert isinstance(smol, HFTokenizer) and smol.stream_kind == "byte_level"
    assert isinstance(mistral, HFTokenizer) and mistral.stream_kind == "byte_fallback"
    assert (smol.vocab_size, smol.bos_id, smol.eos_id, smol.unk_id, smol.pad_id) == (49152, 1, 2, 0, 2)
    assert (mistral.vocab_size, mistral.bos_id, mistral.eos_id, mistral.unk_id) == (32000, 1, 2, 0)
    assert smol.id_to_piece(2) == "<|im_end|>" and smol.is_special(2) and not smol.is_special(905)


def test_ids_equal_transformers_and_tokenizers_on_the_corpus(tokenizers_by_folder, folder):
    tok, ref = tokenizers_by_folder[folder], REFS["transformers"][folder]
    assert ref["ids"] == ref["tokenizers_ids"]  # transformers runs tokenizers: the two references agree
    for text, ids in zip(CORPUS, ref["ids"]):
        assert tok.encode(text, bos=False) == ids, text


def test_default_bos_follows_the_tokenizer_config_like_transformers(tokenizers_by_folder, folder):
    tok, ref = tokenizers_by_folder[folder], REFS["transformers"][folder]
    assert tok.add_bos == (folder == "mistral-tokenizer-json")  # SmolLM2 adds no BOS, Llama/Mistral do
    for text, ids in zip(CORPUS, ref["ids_with_specials"]):
        assert tok.encode(text) == ids, text


def test_decode_equals_transformers_and_round_trips(tokenizers_by_folder, folder):
    tok, ref = tokenizers_by_folder[folder], REFS["transformers"][folder]
    for text, ids, decoded in zip(CORPUS, ref["ids"], ref["decoded"]):
        assert tok.decode(ids) == decoded
        assert tok.decode([tok.eos_id, *ids, tok.eos_id]) == decoded  # special tokens are left out
        if folder == "mistral-tokenizer-json" and text.startswith(" "):
            assert decoded == text[1:]  # the Llama conversion's Strip(" ", 1) eats a leading space, as in transformers
        else:
            assert decoded == text


def test_nfd_korean_encodes_like_nfc(tokenizers_by_folder, folder):
    tok = tokenizers_by_folder[folder]
    text = EXPECTED["encode_no_bos"][0]["text"]
    assert tok.encode(unicodedata.normalize("NFD", text), bos=False) == tok.encode(text, bos=False)


def test_special_token_strings_in_text_become_their_ids(tokenizers_by_folder):
    smol = tokenizers_by_folder["smollm2-tokenizer"]
    assert smol.encode("<|im_start|>user\nhi<|im_end|>\n", bos=False) == [1, 4093, 198, 6004, 2, 198]
    assert smol.encode_with_specials("<|im_start|>user\nhi<|im_end|>\n") == [1, 4093, 198, 6004, 2, 198]


@pytest.mark.parametrize("token_id", [-1, 49152, 10**9])
def test_out_of_vocabulary_ids_raise(tokenizers_by_folder, token_id):
    tok = tokenizers_by_folder["smollm2-tokenizer"]
    with pytest.raises(TokenizerError, match=str(token_id)):
        tok.decode([905, token_id])
    with pytest.raises(TokenizerError, match=str(token_id)):
        tok.id_to_piece(token_id)


def test_a_tokenizer_json_file_loads_with_its_folders_config():
    tok = load_tokenizer(FIXTURES / "smollm2-tokenizer" / "tokenizer.json")
    assert tok.eos_id == 2 and tok.chat_templates["default"].startswith("{% for message in messages %}")


def test_folder_with_both_files_uses_tokenizer_model_with_komts_ids(tmp_path):
    shutil.copy(FIXTURES / "tokenizer" / "tokenizer.model", tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(FIXTURES / "mistral-tokenizer-json" / name, tmp_path)
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, SentencePieceTokenizer)
    for case in EXPECTED["encode_no_bos"]:
        assert tok.encode(case["text"], bos=False) == case["ids"]
    assert tok.chat_templates  # the config's template still applies


def test_tokenizer_json_wins_when_it_adds_tokens_past_the_sentencepiece_vocabulary(tmp_path):
    shutil.copy(FIXTURES / "tokenizer" / "tokenizer.model", tmp_path)
    spec = json.loads((FIXTURES / "mistral-tokenizer-json" / "tokenizer.json").read_text(encoding="utf-8"))
    spec["added_tokens"].append({"id": 32000, "content": "<|im_start|>", "single_word": False, "lstrip": False,
                                 "rstrip": False, "normalized": False, "special": True})
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == 32001
    assert tok.encode("<|im_start|>안녕", bos=False)[0] == 32000


def test_added_tokens_without_tokenizer_json_are_an_error(tmp_path):
    shutil.copy(FIXTURES / "tokenizer" / "tokenizer.model", tmp_path)
    config = {"added_tokens_decoder": {"32000": {"content": "<|im_start|>", "special": True}}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match="past tokenizer.model's vocabulary"):
        load_tokenizer(tmp_path)


def test_config_files_set_special_tokens_bos_and_stop_ids(tmp_path):
    shutil.copy(FIXTURES / "smollm2-tokenizer" / "tokenizer.json", tmp_path)
    config = {"bos_token": {"content": "<|endoftext|>", "special": True}, "eos_token": "<|endoftext|>",
              "add_bos_token": True, "chat_template": [{"name": "default", "template": "A"},
                                                        {"name": "tool_use", "template": "B"}]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<|im_end|>"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos, tok.stop_ids) == (0, 0, 2, True, (0, 2))
    assert tok.encode("hi") == [0, 6004]
    assert tok.chat_templates == {"default": "A", "tool_use": "B"}
    assert tok.special_tokens_map == {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                                      "pad_token": "<|im_end|>"}


def test_stop_ids_fall_back_to_config_json_without_a_generation_config(tmp_path):
    shutil.copy(FIXTURES / "smollm2-tokenizer" / "tokenizer.json", tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "eos_token_id": [2, 0]}))
    tok = load_tokenizer(tmp_path)
    assert tok.eos_id is None and tok.stop_ids == (2, 0)  # no tokenizer config: only the model's ids


def test_chat_template_jinja_file_wins_over_the_config(tmp_path):
    shutil.copy(FIXTURES / "smollm2-tokenizer" / "tokenizer.json", tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "from config"}))
    (tmp_path / "chat_template.jinja").write_text("from file")
    tok = load_tokenizer(tmp_path)
    assert tok.chat_templates == {"default": "from file"} and tok.chat_template_file.endswith("chat_template.jinja")


def test_truncation_stored_in_tokenizer_json_is_switched_off(tmp_path):
    spec = json.loads((FIXTURES / "smollm2-tokenizer" / "tokenizer.json").read_text(encoding="utf-8"))
    spec["truncation"] = {"direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 0}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    assert len(load_tokenizer(tmp_path).encode(CORPUS[0], bos=False)) == len(REFS["transformers"]["smollm2-tokenizer"]["ids"][0])


@pytest.mark.parametrize("decoder, kind", [
    ({"type": "ByteLevel", "add_prefix_space": True}, "byte_level"),
    ({"type": "Sequence", "decoders": [{"type": "ByteLevel"}]}, "byte_level"),
    ({"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                                       {"type": "ByteFallback"}, {"type": "Fuse"}]}, "byte_fallback"),
])
def test_decoders_komt_can_stream(decoder, kind):
    assert decode_rules(decoder, "x").kind == kind


@pytest.mark.parametrize("decoder", [None, {"type": "WordPiece", "prefix": "##"}, {"type": "Metaspace"},
                                     {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Strip"}]}])
def test_other_decoders_are_refused_at_load(decoder):
    with pytest.raises(TokenizerError, match="not one komt can stream"):
        decode_rules(decoder, "tokenizer.json")


@pytest.mark.parametrize("content, message", [
    ("not json", "not valid JSON"),
    ("[" * 100_000 + "]" * 100_000, "not valid JSON: nested too deeply"),
    ('{"version": "1.0", "model": {"type": "Nope"}}', "tokenizers library can read"),
])
def test_corrupt_tokenizer_json_raises_naming_it(tmp_path, content, message):
    (tmp_path / "tokenizer.json").write_text(content)
    with pytest.raises(TokenizerError, match=message) as err:
        load_tokenizer(tmp_path)
    assert "tokenizer.json" in str(err.value)


@pytest.mark.parametrize("content, message", [
    ("[" * 100_000 + "]" * 100_000, "tokenizer_config.json: not valid JSON: nested too deeply"),
    ('{"bos_token": "<s>", "bos_token": "</s>"}', "the key 'bos_token' appears twice"),
    ("[1, 2]", "tokenizer_config.json must hold a JSON object, got list"),
])
def test_bad_tokenizer_config_json_is_one_line_error(tmp_path, content, message):
    """Read as strictly as config.json (komt.jsonutil): before, deep nesting was a RecursionError traceback."""
    shutil.copy(FIXTURES / "smollm2-tokenizer" / "tokenizer.json", tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(content)
    with pytest.raises(TokenizerError, match=message):
        load_tokenizer(tmp_path)


def test_config_naming_a_token_missing_from_the_vocabulary_is_an_error(tmp_path):
    shutil.copy(FIXTURES / "smollm2-tokenizer" / "tokenizer.json", tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    with pytest.raises(TokenizerError, match="bos_token '<s>'"):
        load_tokenizer(tmp_path)


