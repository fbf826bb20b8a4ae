"""What a checkpoint folder says about its tokenizer besides the vocabulary: special tokens, BOS/EOS defaults,
chat templates and the extra end-of-generation ids.

Hugging Face spreads this over several files; they are read here once, in transformers' order of precedence:

- `tokenizer_config.json`: `bos_token`, `eos_token`, `unk_token`, `pad_token` (a string or an AddedToken dict),
  `add_bos_token` / `add_eos_token`, `additional_special_tokens`, `chat_template` (one string, or a list of
  `{"name", "template"}` for named templates), `added_tokens_decoder`;
- `special_tokens_map.json`: the same token fields, used where tokenizer_config.json has none;
- `chat_template.jinja` (transformers >= 4.43 saves the template there), else `chat_template.json`, else the
  config's `chat_template`; `additional_chat_templates/<name>.jinja` adds named ones;
- `generation_config.json`: `eos_token_id` (an int or a list): Llama-3-Instruct ends a turn with `<|eot_id|>`
  while its tokenizer's EOS is `<|end_of_text|>`, so generation must stop at either. Without that file,
  `config.json`'s `eos_token_id`, which transformers' generate falls back to as well.

Every file is optional; a file that exists but is not valid JSON is a TokenizerError naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from komt.errors import TokenizerError
from komt.jsonutil import is_int, read_json_object, require_regular_file

CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
GENERATION_CONFIG_FILE = "generation_config.json"
MODEL_CONFIG_FILE = "config.json"
TEMPLATE_FILE = "chat_template.jinja"
TEMPLATE_JSON_FILE = "chat_template.json"
NAMED_TEMPLATES_DIR = "additional_chat_templates"
TOKEN_FIELDS = ("bos_token", "eos_token", "unk_token", "pad_token")
DEFAULT_TEMPLATE = "default"


@dataclass(frozen=True)
class TokenizerSettings:
    """The tokenizer settings of one folder; every field is None/empty when no file gives it."""

    tokens: dict[str, str] = field(default_factory=dict)  # "bos_token" -> "<s>", ... (TOKEN_FIELDS only)
    additional_special_tokens: tuple[str, ...] = ()
    add_bos_token: bool | None = None
    add_eos_token: bool | None = None
    chat_templates: dict[str, str] = field(default_factory=dict)  # name -> Jinja source; "default" if unnamed
    chat_template_file: str | None = None  # where the templates came from, for error messages
    added_token_ids: tuple[int, ...] = ()  # ids of tokenizer_config.json's added_tokens_decoder
    generation_eos_ids: tuple[int, ...] = ()  # generation_config.json's eos_token_id (else config.json's)


def read_tokenizer_settings(folder: Path) -> TokenizerSettings:
    """Read the optional tokenizer files of `folder` (see module docstring)."""
    config = read_json_object(folder / CONFIG_FILE, TokenizerError)
    special = read_json_object(folder / SPECIAL_TOKENS_FILE, TokenizerError)
    tokens = {}
    for name in TOKEN_FIELDS:
        value = _token_content(config.get(name), folder / CONFIG_FILE, name)
        if value is None:
            value = _token_content(special.get(name), folder / SPECIAL_TOKENS_FILE, name)
        if value is not None:
            tokens[name] = value
    extra = config.get("additional_special_tokens", special.get("additional_special_tokens")) or []
    templates, template_file = _read_chat_templates(folder, config)
    generation_file = folder / GENERATION_CONFIG_FILE
    if not generation_file.is_file():
        generation_file = folder / MODEL_CONFIG_FILE
    generation = read_json_object(generation_file, TokenizerError)
    return TokenizerSettings(
        tokens=tokens,
        additional_special_tokens=tuple(t for t in (_token_content(v, folder / CONFIG_FILE, "additional_special_tokens")
                                                    for v in extra) if t),
        add_bos_token=_optional_bool(config, "add_bos_token", folder / CONFIG_FILE),
        add_eos_token=_optional_bool(config, "add_eos_token", folder / CONFIG_FILE),
        chat_templates=templates,
        chat_template_file=template_file,
        added_token_ids=tuple(sorted(int(i) for i in (config.get("added_tokens_decoder") or {}))),
        generation_eos_ids=_id_list(generation.get("eos_token_id"), generation_file),
    )


def _token_content(value: Any, path: Path, name: str) -> str | None:
    """A special token as its text: configs write either "<s>" or {"content": "<s>", ...} (an AddedToken)."""
    if value is None:
        return None
    if isinstance(value, dict):
        value = value.get("content")
    if not isinstance(value, str):
        raise TokenizerError(f"{path}: {name} must be a string or an AddedToken object, got {value!r}")
    return value


def _optional_bool(config: dict[str, Any], name: str, path: Path) -> bool | None:
    value = config.get(name)
    if value is not None and not isinstance(value, bool):
        raise TokenizerError(f"{path}: {name} must be true or false, got {value!r}")
    return value


def _id_list(value: Any, path: Path) -> tuple[int, ...]:
    values = value if isinstance(value, list) else [] if value is None else [value]
    if not all(is_int(v) and v >= 0 for v in values):
        raise TokenizerError(f"{path}: eos_token_id must be a token id or a list of them, got {value!r}")
    return tuple(values)


def _read_chat_templates(folder: Path, config: dict[str, Any]) -> tuple[dict[str, str], str | None]:
    """name -> template source, and the file they came from (transformers' precedence, module docstring)."""
    templates: dict[str, str] = {}
    source = None
    if (folder / TEMPLATE_FILE).is_file():
        templates[DEFAULT_TEMPLATE], source = _read_text(folder / TEMPLATE_FILE), str(folder / TEMPLATE_FILE)
    elif (folder / TEMPLATE_JSON_FILE).is_file():
        path = folder / TEMPLATE_JSON_FILE
        templates, source = _template_value(read_json_object(path, TokenizerError).get("chat_template"), path), str(path)
    elif config.get("chat_template") is not None:
        path = folder / CONFIG_FILE
        templates, source = _template_value(config["chat_template"], path), str(path)
    named = folder / NAMED_TEMPLATES_DIR
    if named.is_dir():
        for file in sorted(named.glob("*.jinja")):
            templates[file.stem] = _read_text(file)
        source = source or str(named)
    return templates, source


def _template_value(value: Any, path: Path) -> dict[str, str]:
    """`chat_template` is one template (a string) or named ones ([{"name": ..., "template": ...}, ...])."""
    if isinstance(value, str):
        return {DEFAULT_TEMPLATE: value}
    if isinstance(value, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                       and isinstance(t.get("template"), str) for t in value):
        return {t["name"]: t["template"] for t in value}
    raise TokenizerError(f"{path}: chat_template must be a string or a list of {{name, template}} objects")


def _read_text(path: Path) -> str:
    try:
        require_regular_file(path, TokenizerError)
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise TokenizerError(f"cannot read {path}: {err}") from None
