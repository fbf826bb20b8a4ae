"""NF4 (komt/model/nf4.py) against bitsandbytes 0.50 (tests/fixtures/nf4/expected.safetensors, written by
baselines/nf4_reference_bnb.py) and against its definition: the 16 published levels, the 8-bit dynamic code of
the double-quantized scales, the same indices as bitsandbytes, a round-trip error bound, and NF4Linear's
contract (forward == F.linear(x, dequantize()))."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from komt.errors import ConfigError
from komt.model import Transformer, preset
from komt.model.nf4 import (BLOCK, NESTED_BLOCK, NF4_LEVELS, NF4Linear, NF4Tensor, dequantize_nf4, dynamic_code,
                            quantize_nf4)
from komt.model.safetensors_file import SafetensorsFile

# bitsandbytes.functional.get_4bit_type("nf4"), as published (QLoRA, Dettmers et al. 2023)
PUBLISHED_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                 -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                 0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]


@pytest.fixture(scope="module")
def bnb() -> dict[str, torch.Tensor]:
    f = SafetensorsFile(Path(__file__).parent / "fixtures" / "nf4" / "expected.safetensors")
    return {k: f.tensor(k) for k in f.keys()}


def indices(t: NF4Tensor) -> torch.Tensor:
    O, half = t.weight.shape
    return torch.stack([t.weight & 0xF, t.weight >> 4], dim=-1).reshape(O, 2 * half)  # (O, I)


def test_levels_are_the_published_nf4_values_and_normal_quantiles():
    assert NF4_LEVELS.tolist() == torch.tensor(PUBLISHED_NF4, dtype=torch.float32).tolist()  # exact
    # QLoRA's construction (its appendix; bitsandbytes' create_normal_map): 8 quantiles of N(0, 1) on the
    # positive side, 7 on the negative, a zero, scaled into [-1, 1]
    offset = 0.9677083
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    assert torch.allclose(levels / levels.max(), NF4_LEVELS.double(), atol=2e-7, rtol=0)


def test_dynamic_code_is_bitsandbytes_and_quantized_tensors_store_both_maps(bnb):
    code = dynamic_code()
    assert torch.equal(code, bnb["nested_quant_map"]) and code.numel() == 256
    assert code[-1] == 1 and (code == 0).any() and (code.diff() > 0).all()  # sorted, distinct, 0 and 1 exact
    assert code[0] == pytest.approx(-0.99296875)  # the negative side has no -1: the largest fraction midpoint
    t = quantize_nf4(bnb["weight"])
    assert torch.equal(t.quant_map, bnb["quant_map"]) and torch.equal(t.nested_quant_map, code)


def test_indices_and_double_quantized_scales_match_bitsandbytes(bnb):
    t = quantize_nf4(bnb["weight"])
    assert torch.equal(indices(t), bnb["indices"].to(torch.uint8))  # every 4-bit index, outliers and zeros included
    assert torch.equal(t.nested_absmax, bnb["nested_absmax"]) and torch.equal(t.nested_offset, bnb["nested_offset"])
    # The block maxima's 8-bit codes: bitsandbytes' C search sometimes takes the neighbour of the nearest code;
    # komt takes the nearest, so it is never further from the true maximum, and never more than one code away.
    absmax = bnb["weight"].reshape(-1, BLOCK).abs().amax(dim=1)
    target = (absmax - absmax.mean()) / t.nested_absmax.repeat_interleave(NESTED_BLOCK)[:absmax.numel()]
    code = dynamic_code()
    mine, theirs = code[t.absmax.long()], code[bnb["absmax_codes"].long()]
    assert ((mine - target).abs() <= (theirs - target).abs() + 1e-9).all()
    assert (t.absmax.int() - bnb["absmax_codes"].int()).abs().max() <= 1
    assert (t.absmax == bnb["absmax_codes"]).float().mean() > 0.95


def test_dequantizing_bitsandbytes_own_tensors_gives_its_weights(bnb):
    q = bnb["indices"].to(torch.uint8)
    t = NF4Tensor(q[:, 0::2] | (q[:, 1::2] << 4), bnb["absmax_codes"], bnb["nested_absmax"], bnb["nested_offset"],
                  bnb["quant_map"], bnb["nested_quant_map"])
    assert torch.allclose(dequantize_nf4(t), bnb["dequantized"], atol=1e-7, rtol=0)


def test_round_trip_error_is_within_half_a_level_gap_plus_the_scale_error():
    torch.manual_seed(0)
    w = torch.randn(96, 512) * 0.02
    w[5, 7] = 0.4  # an outlier blows up one block's step, no other's
    t = quantize_nf4(w)
    back = dequantize_nf4(t)
    blocks = w.reshape(-1, BLOCK)
    m = blocks.abs().amax(dim=1, keepdim=True)  # (n_blocks, 1) true maxima
    s = t.nested_absmax.repeat_interleave(NESTED_BLOCK)[:m.numel()][:, None]
    bound = 0.5 * NF4_LEVELS.diff().max() * m + 0.5 * dynamic_code().diff().max() * s + 1e-7
    assert ((back.reshape(-1, BLOCK) - blocks).abs() <= bound).all()
    # and the scales themselves: each block's maximum comes back within half a dynamic-code step
    stored = dynamic_code()[t.absmax.long()][:, None] * s + t.nested_offset
    assert ((stored - m).abs() <= 0.5 * dynamic_code().diff().max() * s + 1e-7).all()
    assert (back - w).pow(2).mean().sqrt() < 0.12 * w.std()  # ~4 bits of a Gaussian: a tenth of its spread


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_linear_is_linear_on_its_dequantized_weight(dtype):
    torch.manual_seed(0)
    dense = nn.Linear(128, 48, bias=False)
    layer = NF4Linear.from_weight(dense.weight)
    assert (layer.in_features, layer.out_features) == (128, 48)
    x = torch.randn(2, 5, 128, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (2, 5, 48)
    assert torch.equal(y, F.linear(x, layer.dequantize(dtype)))
    assert layer.dequantize().shape == (48, 128) and layer.dequantize().dtype == torch.float32
    state = layer.state_dict()
    assert {k: (v.dtype, tuple(v.shape)) for k, v in state.items()} == {
        "weight": (torch.uint8, (48, 64)), "absmax": (torch.uint8, (96,)), "nested_absmax": (torch.float32, (1,)),
        "nested_offset": (torch.float32, ()), "quant_map": (torch.float32, (16,)),
        "nested_quant_map": (torch.float32, (256,))}
    assert not any(p.requires_grad for p in layer.parameters())  # a frozen base: nothing to train
    x = x.detach().requires_grad_(True)  # the gradient that flows through to the layers below
    layer(x).sum().backward()
    assert torch.allclose(x.grad, torch.ones(2, 5, 48, dtype=dtype) @ layer.dequantize(dtype), atol=1e-2, rtol=0)
    stored_bits = 8 * (state["weight"].numel() + state["absmax"].numel()) + 32 * state["nested_absmax"].numel()
    assert stored_bits / (48 * 128) == 4 + 8 / BLOCK + 32 / (48 * 128)  # 4 bits, 8 per 64, one fp32 block of 256


def test_swapped_into_a_model_nf4_layers_compute_like_dense_layers_of_their_dequantized_weights():
    torch.manual_seed(0)
    model = Transformer(preset("tiny-mistral-32k", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=16, vocab_size=512)).eval()
    dense = Transformer(model.config).eval()
    dense.load_state_dict(model.state_dict())
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name != "lm_head":
            nf4 = NF4Linear.from_weight(module.weight)
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, nf4)
            with torch.no_grad():
                dense.get_submodule(name).weight.copy_(nf4.dequantize())
    ids = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        assert torch.allclose(model(ids), dense(ids), atol=1e-5, rtol=0)


def test_weights_that_do_not_fit_nf4_blocks_are_config_errors():
    with pytest.raises(ConfigError, match=r"multiple of 64, got \(8, 100\)"):
        quantize_nf4(torch.randn(8, 100))
    with pytest.raises(ConfigError, match="2-D weight"):
        NF4Linear.from_weight(torch.randn(64))


def test_lora_trains_on_an_nf4_base_through_the_variant_contract():
    """What QLoRA needs from the layer: LoRALinear(base_layer) over NF4 is base(x) + the scaled update, and only
    the LoRA matrices (fp32: the base holds integers) receive gradients."""
    from komt.model.lora import LoRALinear

    torch.manual_seed(0)
    base = NF4Linear.from_weight(torch.randn(32, 64) * 0.02)
    layer = LoRALinear(base, r=4, alpha=8)
    nn.init.normal_(layer.lora_B.weight)
    assert layer.lora_A.weight.dtype == torch.float32 and (layer.in_features, layer.out_features) == (64, 32)
    x = torch.randn(3, 64)
    out = layer(x)
    update = layer.scale * (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    assert torch.allclose(out, F.linear(x, base.dequantize()) + update, atol=1e-6, rtol=0)
    out.sum().backward()
    assert layer.lora_B.weight.grad is not None and layer.lora_A.weight.grad is not None
    assert all(p.grad is None for p in base.parameters())
    assert torch.allclose(layer.dequantize(), base.dequantize() + layer.delta_weight(), atol=1e-7, rtol=0)
