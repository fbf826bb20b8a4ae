import json

import pytest

from komt.errors import ConfigError
from komt.model.config import PRESETS, ModelConfig, preset


def test_2023_form_derives_head_dim_and_reads_top_level_rope_theta(fixtures):
    config = ModelConfig.from_file(fixtures / "tiny-mistral" / "config.json")
    assert config.head_dim == 64 // 4
    assert config.rope_theta == 10000.0
    assert config.sliding_window == 8
    assert config.torch_dtype == "float32"
    assert config.n_rep == 2


def test_current_form_reads_rope_parameters_dtype_and_tied_embeddings(fixtures):
    config = ModelConfig.from_file(fixtures / "tiny-llama" / "config.json")
    assert config.head_dim == 16 and config.hidden_size == 96  # explicit head_dim, not 96 // 6
    assert config.rope_theta == 500000.0
    assert config.tie_word_embeddings is True
    assert config.sliding_window is None
    assert config.torch_dtype == "float32"


def test_unknown_keys_are_ignored_and_null_window_accepted():
    raw = json.loads(json.dumps(PRESETS["komt-mistral-7b"].to_hf_dict()))
    raw["sliding_window"] = None
    raw["some_future_key"] = {"x": 1}
    config = ModelConfig.from_dict(raw)
    assert config.sliding_window is None


@pytest.mark.parametrize("key", ["vocab_size", "hidden_size", "num_hidden_layers", "model_type"])
def test_missing_required_key_names_the_key(key):
    raw = PRESETS["komt-mistral-7b"].to_hf_dict()
    del raw[key]
    with pytest.raises(ConfigError, match=key):
        ModelConfig.from_dict(raw)


def test_unsupported_model_type_is_an_error():
    raw = PRESETS["komt-mistral-7b"].to_hf_dict() | {"model_type": "gpt2"}
    with pytest.raises(ConfigError, match="gpt2"):
        ModelConfig.from_dict(raw)


def test_heads_must_divide():
    raw = PRESETS["komt-mistral-7b"].to_hf_dict() | {"num_key_value_heads": 5}
    with pytest.raises(ConfigError, match="multiple"):
        ModelConfig.from_dict(raw)


def test_komt_mistral_7b_preset_has_the_model_card_shape():
    c = preset("komt-mistral-7b")
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size) == (32, 4096, 14336)
    assert (c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == (32, 8, 32000)
    assert (c.sliding_window, c.rope_theta, c.head_dim) == (4096, 10000.0, 128)


def test_round_trip_through_hf_dict():
    for config in PRESETS.values():
        assert ModelConfig.from_dict(config.to_hf_dict()) == config


def test_unreadable_config_is_one_line_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="unreadable"):
        ModelConfig.from_file(tmp_path / "config.json")
