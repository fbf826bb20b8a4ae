"""GGUF vocabularies: a komt tokenizer from a GGUF file's `tokenizer.*` metadata, with llama.cpp's ids.

The GGUF reader (another module) hands over the metadata as a plain dict; two tokenizer models are read:

- `llama` (sentencepiece, as convert_hf_to_gguf.py writes Llama/Mistral's tokenizer.model): the pieces,
  scores and types are written back into a sentencepiece ModelProto (a small protobuf, encoded below) and
  loaded by sentencepiece itself, so ids equal tokenizer.model's. Settings the GGUF does not keep are fixed
  as Llama/Mistral have them: BPE with byte fallback when the vocabulary has <0xNN> pieces, the identity
  normalizer, dummy prefix on (`tokenizer.ggml.add_space_prefix`), and `allow_whitespace_only_pieces`
  exactly when the vocabulary has pieces made only of "▁" (sentencepiece cannot learn them without it).
- `gpt2` (byte-level BPE: SmolLM2, Llama-3, Qwen2): a `tokenizers` BPE from tokens + merges, with the
  pre-tokenizer llama.cpp uses for `tokenizer.ggml.pre` (the regexes of llama-vocab.cpp, applied in turn
  as isolating splits, then the byte-to-character mapping), CONTROL tokens as special added tokens and
  USER_DEFINED ones as plain added tokens (llama.cpp splits both out of the text first).

Anything else is a TokenizerError until komt reads it. BOS/EOS/UNK/PAD ids, add_bos_token, the chat template
(`tokenizer.chat_template`, named ones under `tokenizer.chat_template.<name>`) and the end-of-turn ids
(`tokenizer.ggml.eot_token_id`, `.eom_token_id`) come from the same metadata.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import Any

from komt.errors import TokenizerError
from komt.generate.tokenizer import Tokenizer
from komt.generate.tokenizer_files import DEFAULT_TEMPLATE, TokenizerSettings

# gguf.TokenType, numbered as sentencepiece's SentencePiece.Type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"

# llama-vocab.cpp's pre-tokenizer regexes, by `tokenizer.ggml.pre`: (regexes, ignore_merges, add_bos default)
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_REGEX = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DEFAULT = ((r"[\p{P}\$\+<=>\^~\|]+", GPT2_REGEX, r"\p{N}+", r"[0-9][0-9][0-9]"), False, False)
_GPT2 = ((GPT2_REGEX,), False, False)
_LLAMA3 = ((LLAMA3_REGEX,), True, True)
_DIGITS_GPT2 = ((r"\p{N}", GPT2_REGEX), False, False)
_QWEN2 = ((QWEN2_REGEX,), False, False)
PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool, bool]] = {
    "default": _DEFAULT,
    "gpt-2": _GPT2,
    "llama-bpe": _LLAMA3, "llama3": _LLAMA3, "llama-v3": _LLAMA3,
    "dbrx": ((LLAMA3_REGEX,), False, False), "smaug-bpe": ((LLAMA3_REGEX,), False, False),
    "smollm": _DIGITS_GPT2, "starcoder": _DIGITS_GPT2, "refact": _DIGITS_GPT2,
    "qwen2": _QWEN2, "deepseek-r1-qwen": _QWEN2, "stablelm2": _QWEN2,
}


def tokenizer_from_gguf_metadata(metadata: Mapping[str, Any], source: str = "GGUF metadata") -> Tokenizer:
    """The tokenizer a GGUF file describes (module docstring); `source` names the file in error messages."""
    model = metadata.get("tokenizer.ggml.model")
    if model == "llama":
        return _sentencepiece_from_gguf(metadata, source)
    if model == "gpt2":
        return _bpe_from_gguf(metadata, source)
    raise TokenizerError(f"{source}: tokenizer.ggml.model {model!r} is not one komt reads yet (llama and gpt2 are)")


def _sentencepiece_from_gguf(metadata: Mapping[str, Any], source: str) -> Tokenizer:
    from komt.generate.sentencepiece_tokenizer import load_sentencepiece

    tokens, types = _vocabulary(metadata, source)
    scores = _numbers(metadata, "tokenizer.ggml.scores", source, float, default=[0.0] * len(tokens))
    if len(scores) != len(tokens):
        raise TokenizerError(f"{source}: tokenizer.ggml.scores has {len(scores)} entries for {len(tokens)} tokens")
    ids = _special_ids(metadata, len(tokens), source)
    types = list(types)
    if UNKNOWN not in types:  # sentencepiece needs exactly one <unk>; llama.cpp's default id is 0
        types[ids.get("unk_token", 0)] = UNKNOWN
    for name in ("bos_token", "eos_token"):  # sentencepiece only reports BOS/EOS ids of control pieces
        if name in ids and types[ids[name]] != UNKNOWN:
            types[ids[name]] = CONTROL
    proto = sentencepiece_model_proto(
        tokens, scores, types, {name: tokens[i] for name, i in ids.items() if name != "pad_token"},
        add_dummy_prefix=_flag(metadata, "tokenizer.ggml.add_space_prefix", True, source),
        remove_extra_whitespaces=_flag(metadata, "tokenizer.ggml.remove_extra_whitespaces", False, source),
    )
    settings = _settings(metadata, tokens, ids, source, add_bos_default=True)
    return load_sentencepiece(proto, source, settings)


def _bpe_from_gguf(metadata: Mapping[str, Any], source: str) -> Tokenizer:
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as TokenizersTokenizer

    from komt.generate.hf_tokenizer import HFTokenizer

    tokens, types = _vocabulary(metadata, source)
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise TokenizerError(f"{source}: tokenizer.ggml.pre {pre!r} is not a pre-tokenizer komt knows "
                             f"({', '.join(sorted(PRE_TOKENIZERS))})")
    regexes, ignore_merges, add_bos_default = PRE_TOKENIZERS[pre]
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        if vocab.setdefault(token, i) != i:
            raise TokenizerError(f"{source}: token {token!r} appears twice (ids {vocab[token]} and {i})")
    merges = []
    for merge in _strings(metadata, "tokenizer.ggml.merges", source):
        cut = merge.find(" ", 1)  # as llama.cpp splits them: the first space after the first character
        if cut < 0:
            raise TokenizerError(f"{source}: tokenizer.ggml.merges entry {merge!r} is not 'left right'")
        merges.append((merge[:cut], merge[cut + 1:]))
    tokenizer = TokenizersTokenizer(models.BPE(vocab, merges, ignore_merges=ignore_merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                  for i, kind in enumerate(types) if kind == CONTROL])
    tokenizer.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                          for i, kind in enumerate(types) if kind == USER_DEFINED])
    ids = _special_ids(metadata, len(tokens), source)
    settings = _settings(metadata, tokens, ids, source, add_bos_default=add_bos_default)
    return HFTokenizer(tokenizer, {"type": "ByteLevel"}, source, settings)


def _settings(metadata: Mapping[str, Any], tokens: list[str], ids: dict[str, int], source: str,
              add_bos_default: bool) -> TokenizerSettings:
    """BOS default, special tokens, chat templates and end-of-turn ids, as a folder's config files would give."""
    templates = {}
    for key, value in metadata.items():
        if key == "tokenizer.chat_template" or key.startswith("tokenizer.chat_template."):
            if not isinstance(value, str):
                raise TokenizerError(f"{source}: {key} must be a string")
            name = DEFAULT_TEMPLATE if key == "tokenizer.chat_template" else key.removeprefix("tokenizer.chat_template.")
            templates[name] = value
    end_of_turn = [_index(metadata, key, len(tokens), source) for key in
                   ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if key in metadata]
    return TokenizerSettings(
        tokens={name: tokens[i] for name, i in ids.items()},
        add_bos_token=_flag(metadata, "tokenizer.ggml.add_bos_token", add_bos_default, source),
        add_eos_token=_flag(metadata, "tokenizer.ggml.add_eos_token", False, source),
        chat_templates=templates,
        chat_template_file=f"{source} (tokenizer.chat_template)" if templates else None,
        generation_eos_ids=tuple(end_of_turn),
    )


def _vocabulary(metadata: Mapping[str, Any], source: str) -> tuple[list[str], list[int]]:
    tokens = _strings(metadata, "tokenizer.ggml.tokens", source)
    if not tokens:
        raise TokenizerError(f"{source}: tokenizer.ggml.tokens is empty")
    types = _numbers(metadata, "tokenizer.ggml.token_type", source, int, default=[NORMAL] * len(tokens))
    if len(types) != len(tokens) or not all(NORMAL <= t <= BYTE for t in types):
        raise TokenizerError(f"{source}: tokenizer.ggml.token_type must give one type in 1..6 per token")
    return tokens, types


def _special_ids(metadata: Mapping[str, Any], n: int, source: str) -> dict[str, int]:
    keys = {"bos_token": "tokenizer.ggml.bos_token_id", "eos_token": "tokenizer.ggml.eos_token_id",
            "unk_token": "tokenizer.ggml.unknown_token_id", "pad_token": "tokenizer.ggml.padding_token_id"}
    return {name: _index(metadata, key, n, source) for name, key in keys.items() if key in metadata}


def _index(metadata: Mapping[str, Any], key: str, n: int, source: str) -> int:
    value = metadata[key]
    if not (isinstance(value, int) or hasattr(value, "__index__")) or isinstance(value, bool) \
            or not 0 <= int(value) < n:
        raise TokenizerError(f"{source}: {key} must be a token id in [0, {n}), got {value!r}")
    return int(value)


def _flag(metadata: Mapping[str, Any], key: str, default: bool, source: str) -> bool:
    value = metadata.get(key, default)
    if not isinstance(value, bool) and type(value).__name__ != "bool_":  # numpy's bool as well
        raise TokenizerError(f"{source}: {key} must be true or false, got {value!r}")
    return bool(value)


def _strings(metadata: Mapping[str, Any], key: str, source: str) -> list[str]:
    values = metadata.get(key)
    if values is None or isinstance(values, (str, bytes)):
        raise TokenizerError(f"{source}: {key} is missing or not a list of strings")
    try:
        return [v.decode("utf-8") if isinstance(v, bytes) else _check_str(v) for v in values]
    except (UnicodeDecodeError, TypeError) as err:
        raise TokenizerError(f"{source}: {key} must be a list of UTF-8 strings ({err})") from None


def _check_str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"got {type(value).__name__}")
    return value


def _numbers(metadata: Mapping[str, Any], key: str, source: str, kind: type, default: list) -> list:
    values = metadata.get(key)
    if values is None:
        return default
    try:
        return [kind(v) for v in values]
    except (TypeError, ValueError):
        raise TokenizerError(f"{source}: {key} must be a list of numbers") from None


# ---- the sentencepiece ModelProto, written by hand (sentencepiece_model.proto's field numbers) ----------

def sentencepiece_model_proto(pieces: Sequence[str], scores: Sequence[float], types: Sequence[int],
                              special_pieces: Mapping[str, str], *, add_dummy_prefix: bool = True,
                              remove_extra_whitespaces: bool = False) -> bytes:
    """A serialized sentencepiece ModelProto of a BPE model with these pieces (see module docstring).

    `special_pieces` maps "unk_token"/"bos_token"/"eos_token" to their pieces: sentencepiece finds its BOS/EOS
    ids through TrainerSpec's bos_piece/eos_piece.
    """
    whitespace_only = any(len(p) > 1 and set(p) == {SPACE} for p in pieces)
    trainer_spec = _message(
        (3, 2),  # model_type: BPE
        (4, len(pieces)),  # vocab_size
        (24, False),  # treat_whitespace_as_suffix
        (26, whitespace_only),  # allow_whitespace_only_pieces
        (35, BYTE in types),  # byte_fallback
        (45, special_pieces.get("unk_token")), (46, special_pieces.get("bos_token")),
        (47, special_pieces.get("eos_token")),
    )
    normalizer_spec = _message((1, "identity"), (2, b""), (3, add_dummy_prefix), (4, remove_extra_whitespaces),
                               (5, True))
    out = [_field(1, _message((1, piece), (2, float(score)), (3, int(kind))))
           for piece, score, kind in zip(pieces, scores, types)]
    out += [_field(2, trainer_spec), _field(3, normalizer_spec)]
    return b"".join(out)


def _message(*fields: tuple[int, Any]) -> bytes:
    return b"".join(_field(number, value) for number, value in fields if value is not None)


def _field(number: int, value: Any) -> bytes:
    """One protobuf field: varint (bool/int), fixed32 (float) or length-delimited (str/bytes) wire type."""
    if isinstance(value, (bool, int)):
        return _varint(number << 3) + _varint(int(value))
    if isinstance(value, float):
        return _varint(number << 3 | 5) + struct.pack("<f", value)
    data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # a negative int32 is written as its 64-bit two's complement
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)
