"""LoRA layer and PEFT adapters: the PEFT fixture's logits, invariants (fresh = base, merged = unmerged),
adapter files written by komt and by older PEFT, and loud failures for anything that does not fit."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import komt
from komt.errors import CheckpointError, ConfigError
from komt.model import Transformer, preset
from komt.model.lora import (
    DEFAULT_TARGETS,
    LoRAConfig,
    LoRALinear,
    count_parameters,
    inject_lora,
    load_adapter,
    lora_disabled,
    lora_state_dict,
    merge_lora,
    save_adapter,
)
from komt.model.safetensors_file import SafetensorsFile, write_safetensors

FIXTURES = Path(__file__).parent / "fixtures"
BASE = FIXTURES / "tiny-mistral"
ADAPTER = FIXTURES / "tiny-mistral-lora"


@pytest.fixture(scope="module")
def expected():
    f = SafetensorsFile(ADAPTER / "expected.safetensors")
    return f.tensor("input_ids"), f.tensor("logits")


def logits_of(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids)


def random_lora(model: nn.Module, seed: int = 0) -> None:
    """Give every LoRA B a non-zero value, so the adapter changes the model (a fresh one does not)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in lora_state_dict(model).items():
            if name.endswith("lora_B.weight"):
                param.copy_(torch.randn(param.shape, generator=g) * 0.1)


def copy_adapter(tmp_path: Path, name: str = "adapter") -> Path:
    dest = tmp_path / name
    shutil.copytree(ADAPTER, dest)
    (dest / "expected.safetensors").unlink()
    return dest


def edit_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


def rewrite_weights(folder: Path, transform) -> None:
    """Replace adapter_model.safetensors by transform({key: tensor}) -> {key: tensor}."""
    f = SafetensorsFile(folder / "adapter_model.safetensors")
    tensors = transform({k: f.tensor(k).clone() for k in f.keys()})
    write_safetensors(folder / "adapter_model.safetensors", list(tensors.items()))


# --- the PEFT fixture ------------------------------------------------------------------------------------

def test_peft_fixture_adapter_reproduces_expected_logits(expected):
    input_ids, want = expected
    model = komt.load_model(BASE, adapter=ADAPTER)
    assert torch.allclose(logits_of(model, input_ids), want, atol=1e-4, rtol=0)
    # ... and the adapter matters: the base alone is far from those logits.
    assert (logits_of(komt.load_model(BASE), input_ids) - want).abs().max() > 0.1


def add_adapter_by_hand(model: nn.Module, adapter: Path, scale: float) -> nn.Module:
    """`model` with W += scale * B A written into each plain weight from a PEFT adapter folder's file: the
    adapter's effect computed without LoRALinear."""
    f = SafetensorsFile(adapter / "adapter_model.safetensors")
    with torch.no_grad():
        for key in f.keys():
            if ".lora_A." in key:
                module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                model.get_submodule(module).weight += scale * f.tensor(key.replace("lora_A", "lora_B")) @ f.tensor(key)
    return model


def test_loaded_adapter_equals_explicitly_added_delta_weights(expected):
    """Independent of LoRALinear's forward: W + (alpha/r) B A written into a plain model gives the same logits."""
    input_ids, want = expected
    model = add_adapter_by_hand(komt.load_model(BASE), ADAPTER, scale=32 / 8)
    assert torch.allclose(logits_of(model, input_ids), want, atol=1e-4, rtol=0)


def test_loaded_adapter_is_frozen_and_named_like_peft():
    model = komt.load_model(BASE)
    config = load_adapter(model, ADAPTER)
    assert (config.r, config.alpha, config.dropout, config.use_rslora) == (8, 32, 0.05, False)
    assert set(config.targets) == set(DEFAULT_TARGETS)
    assert all(not p.requires_grad for p in model.parameters())
    layer = model.model.layers[1].mlp.down_proj
    assert isinstance(layer, LoRALinear) and layer.scale == 32 / 8
    assert "model.layers.1.mlp.down_proj.lora_B.weight" in lora_state_dict(model)


# --- the layer and its invariants --------------------------------------------------------------------------

def test_fresh_lora_model_equals_base_and_only_lora_trains(expected):
    input_ids, _ = expected
    model = komt.load_model(BASE)
    before = logits_of(model, input_ids)
    names = inject_lora(model, LoRAConfig())
    assert len(names) == 2 * 7
    assert torch.equal(logits_of(model, input_ids), before)
    trainable, total = count_parameters(model)
    cfg = model.config
    q, kv, c, f = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim, cfg.hidden_size, cfg.intermediate_size
    per_layer = 8 * ((c + q) + 2 * (c + kv) + (q + c) + 2 * (c + f) + (f + c))  # r * (in + out) per projection
    assert trainable == cfg.num_hidden_layers * per_layer
    assert total == sum(p.numel() for p in komt.load_model(BASE).parameters()) + trainable
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {k for k in lora_state_dict(model)}


def test_base_checkpoint_loads_into_lora_model_unchanged():
    base = komt.load_model(BASE)
    lora_model = Transformer(base.config)
    inject_lora(lora_model, LoRAConfig())
    missing, unexpected = lora_model.load_state_dict(base.state_dict(), strict=False)
    assert unexpected == []
    assert missing and all(".lora_A." in k or ".lora_B." in k for k in missing)


def test_lora_forward_is_base_plus_scaled_low_rank_update():
    torch.manual_seed(0)
    linear = nn.Linear(12, 10, bias=False)
    layer = LoRALinear(linear, r=4, alpha=8, dropout=0.0)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 5, 12)
    want = x @ linear.weight.T + 2.0 * (x @ layer.lora_A.weight.T) @ layer.lora_B.weight.T
    assert torch.allclose(layer(x), want, atol=1e-5)
    assert layer.lora_A.weight.shape == (4, 12) and layer.lora_B.weight.shape == (10, 4)


def test_merged_equals_unmerged_and_unmerge_restores_weights(expected):
    input_ids, _ = expected
    model = komt.load_model(BASE)
    inject_lora(model, LoRAConfig())
    random_lora(model)
    weights = {n: m.base_layer.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    unmerged = logits_of(model, input_ids)
    for _, m in model.named_modules():
        if isinstance(m, LoRALinear):
            m.merge()
    merged = logits_of(model, input_ids)
    assert torch.allclose(merged, unmerged, atol=1e-4, rtol=0)
    assert (merged - logits_of(komt.load_model(BASE), input_ids)).abs().max() > 1e-2  # the update is real
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            m.unmerge()
            assert torch.allclose(m.base_layer.weight, weights[name], atol=1e-6)
    assert torch.allclose(logits_of(model, input_ids), unmerged, atol=1e-5, rtol=0)


def test_merge_lora_leaves_plain_linear_layers_with_the_same_logits(expected):
    input_ids, want = expected
    model = merge_lora(komt.load_model(BASE, adapter=ADAPTER))
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == set(komt.load_model(BASE).state_dict())
    assert torch.allclose(logits_of(model, input_ids), want, atol=1e-4, rtol=0)


def test_dropout_acts_on_the_lora_path_in_training_only():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 16, bias=False), r=4, alpha=8, dropout=0.5)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(4, 16)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_dropout_keeps_the_expected_lora_output(p):
    """Inverted dropout (nn.Dropout's contract): kept inputs are scaled by 1 / (1 - p), so the LoRA output
    averaged over many masks equals the no-dropout output. Without the rescale the mean would be (1 - p)
    times too small: at p = 0.5 half, at p = 0.05 5 %, both far outside the bound checked here."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 8, bias=False), r=4, alpha=8, dropout=p)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(1, 16)
    base = x @ layer.base_layer.weight.T  # (1, 8)
    layer.eval()
    want = layer(x) - base  # the update without dropout
    layer.train()
    draws = 20000
    with torch.no_grad():
        updates = layer(x.expand(draws, 16)) - base  # (draws, 8): one mask per row
    mean, sem = updates.mean(0), updates.std(0) / math.sqrt(draws)
    assert ((mean - want[0]).abs() <= 5 * sem + 1e-6).all(), (mean, want)
    assert ((mean - (1 - p) * want[0]).abs() > 5 * sem).any()  # the un-rescaled mean is excluded
    # and exactly nn.Dropout's values: each input is 0 or x / (1 - p)
    ones = torch.ones(4096, 16)
    kept = layer.dropout(ones)
    values = kept.unique()
    assert len(values) == 2 and values[0] == 0 and values[1].item() == pytest.approx(1 / (1 - p), rel=1e-6)


def test_lora_disabled_gives_the_base_layer_and_restores_the_adapter(expected):
    input_ids, want = expected
    model = komt.load_model(BASE, adapter=ADAPTER)
    with lora_disabled(model):
        assert torch.allclose(logits_of(model, input_ids), logits_of(komt.load_model(BASE), input_ids), atol=0, rtol=0)
    assert torch.allclose(logits_of(model, input_ids), want, atol=1e-4, rtol=0)
    merge_lora(komt.load_model(BASE, adapter=ADAPTER))  # merge_lora swaps the layers out: nothing to disable
    layer = LoRALinear(nn.Linear(4, 4, bias=False), r=2, alpha=2)
    layer.merge()
    with pytest.raises(ConfigError, match="cannot disable merged LoRA layers"):
        with lora_disabled(layer):
            pass


def test_bf16_base_with_fp32_lora_trains_in_fp32():
    torch.manual_seed(0)
    base = nn.Linear(16, 8, bias=False, dtype=torch.bfloat16).requires_grad_(False)
    layer = LoRALinear(base, r=2, alpha=4, lora_dtype=torch.float32)
    out = layer(torch.randn(3, 16, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and layer.lora_A.weight.dtype == torch.float32
    out.float().sum().backward()
    assert layer.lora_B.weight.grad is not None and layer.lora_B.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("targets, message", [(("qproj",), "qproj"), ((), "at least one")])
def test_bad_targets_are_config_errors(targets, message):
    model = komt.load_model(BASE)
    with pytest.raises(ConfigError, match=message):
        inject_lora(model, LoRAConfig(targets=targets))


def test_tied_lm_head_cannot_take_lora():
    model = Transformer(preset("tiny-mistral-32k", tie_word_embeddings=True, vocab_size=64))
    with pytest.raises(ConfigError, match="tied"):
        inject_lora(model, LoRAConfig(targets=("lm_head",)))


@pytest.mark.parametrize("field, value", [("r", 0), ("alpha", 0), ("dropout", 1.0)])
def test_bad_lora_hyperparameters_are_config_errors(field, value):
    with pytest.raises(ConfigError):
        LoRAConfig(**{field: value})


# --- adapter files: komt's own, older PEFT's, partial ones ----------------------------------------------

def test_saved_adapter_is_peft_layout_and_loads_back(tmp_path, expected):
    input_ids, _ = expected
    model = komt.load_model(BASE)
    config = LoRAConfig(r=4, alpha=16, dropout=0.1, targets=("q_proj", "v_proj"))
    inject_lora(model, config)
    random_lora(model, seed=3)
    save_adapter(model, tmp_path / "a", config, base_model_name_or_path="tiny-mistral")
    raw = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert raw["peft_type"] == "LORA" and raw["task_type"] == "CAUSAL_LM" and raw["bias"] == "none"
    assert (raw["r"], raw["lora_alpha"], raw["lora_dropout"]) == (4, 16, 0.1)
    assert raw["target_modules"] == ["q_proj", "v_proj"] and raw["base_model_name_or_path"] == "tiny-mistral"
    keys = set(SafetensorsFile(tmp_path / "a" / "adapter_model.safetensors").keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys and len(keys) == 2 * 2 * 2
    reloaded = komt.load_model(BASE, adapter=tmp_path / "a")
    assert torch.allclose(logits_of(reloaded, input_ids), logits_of(model.eval(), input_ids), atol=1e-5, rtol=0)


def test_old_peft_bin_adapter_with_adapter_name_in_keys(tmp_path, expected):
    input_ids, want = expected
    folder = copy_adapter(tmp_path)
    f = SafetensorsFile(folder / "adapter_model.safetensors")
    state = {k.replace(".weight", ".default.weight"): f.tensor(k).clone() for k in f.keys()}
    torch.save(state, folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()
    model = komt.load_model(BASE, adapter=folder)
    assert torch.allclose(logits_of(model, input_ids), want, atol=1e-4, rtol=0)


def test_adapter_on_some_projections_only(tmp_path, expected):
    """komt's DPO adapter targets q/k/v only: the other layers stay plain and the math still matches."""
    input_ids, _ = expected
    folder = copy_adapter(tmp_path)
    edit_config(folder, target_modules=["q_proj", "k_proj", "v_proj"])
    rewrite_weights(folder, lambda t: {k: v for k, v in t.items() if "self_attn" in k and "o_proj" not in k})
    model = komt.load_model(BASE, adapter=folder, layout="plain")
    assert isinstance(model.model.layers[0].self_attn.k_proj, LoRALinear)
    assert type(model.model.layers[0].self_attn.o_proj) is nn.Linear
    assert type(model.model.layers[0].mlp.up_proj) is nn.Linear
    reference = add_adapter_by_hand(komt.load_model(BASE), folder, scale=4.0)
    assert torch.allclose(logits_of(model, input_ids), logits_of(reference, input_ids), atol=1e-4, rtol=0)


def test_rslora_scales_by_alpha_over_sqrt_r(tmp_path, expected):
    """rsLoRA with B / sqrt(r) * ... equals plain LoRA: alpha/sqrt(r) * B' A == alpha/r * B A when B' = B/sqrt(r)."""
    input_ids, want = expected
    folder = copy_adapter(tmp_path)
    edit_config(folder, use_rslora=True)
    rewrite_weights(folder, lambda t: {k: (v / math.sqrt(8) if "lora_B" in k else v) for k, v in t.items()})
    model = komt.load_model(BASE, adapter=folder)
    assert torch.allclose(logits_of(model, input_ids), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "transform, message",
    [
        (lambda t: {**t, "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight": torch.zeros(8, 64),
                    "base_model.model.model.layers.9.self_attn.q_proj.lora_B.weight": torch.zeros(64, 8)},
         "layers.9.self_attn.q_proj"),
        (lambda t: {**t, "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(8, 65)},
         r"q_proj.lora_A.weight.*\(8, 65\)"),
        (lambda t: {k: v for k, v in t.items() if k != "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"},
         "layers.1.mlp.up_proj.*lora_B"),
        (lambda t: {**t, "base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(8, 1024)},
         "lora_embedding_A"),
        (lambda t: {**t, "base_model.model.model.norm.lora_A.weight": torch.zeros(8, 64),
                    "base_model.model.model.norm.lora_B.weight": torch.zeros(64, 8)},
         "model.norm"),
    ],
    ids=["no-such-module", "bad-shape", "missing-B", "embedding-lora", "not-linear"],
)
def test_adapter_tensors_that_do_not_fit_are_checkpoint_errors(tmp_path, transform, message):
    folder = copy_adapter(tmp_path)
    rewrite_weights(folder, transform)
    with pytest.raises(CheckpointError, match=message):
        komt.load_model(BASE, adapter=folder)


@pytest.mark.parametrize(
    "changes, message",
    [({"use_dora": True}, "DoRA"), ({"rank_pattern": {"q_proj": 4}}, "rank_pattern"),
     ({"modules_to_save": ["lm_head"]}, "modules_to_save"), ({"bias": "all"}, "bias"),
     ({"peft_type": "IA3"}, "IA3"), ({"r": 4}, r"expected \(4, ")],
    ids=["dora", "rank-pattern", "modules-to-save", "bias", "not-lora", "r-disagrees-with-weights"],
)
def test_unsupported_or_inconsistent_adapter_configs_are_refused(tmp_path, changes, message):
    folder = copy_adapter(tmp_path)
    edit_config(folder, **changes)
    with pytest.raises((ConfigError, CheckpointError), match=message):
        komt.load_model(BASE, adapter=folder)


def test_missing_adapter_files_are_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not a folder"):
        komt.load_model(BASE, adapter=tmp_path / "nope")
    folder = copy_adapter(tmp_path)
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no adapter weights"):
        komt.load_model(BASE, adapter=folder)
    (folder / "adapter_config.json").unlink()
    with pytest.raises(CheckpointError, match="adapter_config.json"):
        komt.load_model(BASE, adapter=folder)


def test_default_recipe_is_komts():
    config = LoRAConfig()
    assert (config.r, config.alpha, config.dropout, config.scale) == (8, 32, 0.05, 4.0)
    assert config.targets == DEFAULT_TARGETS == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
