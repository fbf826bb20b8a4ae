"""Quantized layers (Int8Linear, Int4Linear and their CPU layouts) and quantized loading.

Each variant is checked against the reference it must equal: `x @ dequantize().T`; the CPU layouts
against the canonical layers (they compute in bf16); a quantized model against the fp32 golden logits
within the quantization error; LoRA on a quantized base against LoRA on the dequantized weights.
"""

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import komt
from komt.errors import ConfigError
from komt.model.cpu_layouts import use_cpu_layouts
from komt.model.cpu_quantized import Int4CPULinear, Int8CPULinear, Int8GroupedCPULinear
from komt.model.linear import project
from komt.model.lora import LoRAConfig, LoRALinear, inject_lora, merge_lora
from komt.model.quantized_linear import Int4Linear, Int8Linear, QuantizeSpec

from conftest import FIXTURES

MISTRAL = FIXTURES / "tiny-mistral"
LLAMA = FIXTURES / "tiny-llama"


def assert_close_bf16(got, want):
    """The CPU kernels compute in bf16 (8 bits of mantissa): compare by relative error over the tensor."""
    assert got.shape == want.shape and got.dtype == want.dtype
    assert (got - want).norm() <= 1e-2 * want.norm(), f"relative error {((got - want).norm() / want.norm()):.4f}"


def _weight(out_features=128, in_features=256, seed=0):
    torch.manual_seed(seed)
    return torch.randn(out_features, in_features) * 0.05


@pytest.mark.parametrize("make", [lambda w: Int8Linear.from_dense(w), lambda w: Int8Linear.from_dense(w, 64),
                                  lambda w: Int4Linear.from_dense(w, 32), lambda w: Int4Linear.from_dense(w, 128)])
def test_forward_is_x_times_the_dequantized_weight(make):
    layer = make(_weight())
    x = torch.randn(3, 5, 256)
    torch.testing.assert_close(layer(x), x @ layer.dequantize().T)
    assert layer(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_the_gradient_reaches_the_input_through_a_frozen_quantized_weight():
    """QLoRA needs dL/dx below a quantized layer: it must equal the dense layer's with the same weight."""
    layer = Int4Linear.from_dense(_weight())
    x = torch.randn(4, 256, requires_grad=True)
    layer(x).pow(2).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    (x2 @ layer.dequantize().T).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    assert not any(p.requires_grad for p in layer.parameters())


def test_cpu_int8_layout_equals_the_canonical_layer():
    layer = Int8Linear.from_dense(_weight())
    cpu = Int8CPULinear(layer)
    for shape in [(1, 256), (1, 1, 256), (7, 256)]:
        x = torch.randn(shape)
        want = layer(x)
        assert_close_bf16(cpu(x), want)
    torch.testing.assert_close(cpu.dequantize(), layer.dequantize())


def test_cpu_int4_layout_equals_the_canonical_layer_and_unpacks_back():
    layer = Int4Linear.from_dense(_weight(), 32)
    cpu = Int4CPULinear(layer)
    x = torch.randn(3, 256)
    assert_close_bf16(cpu(x), layer(x))
    # bf16 scale/zero table: the unpacked weight equals the canonical one to bf16 precision
    torch.testing.assert_close(cpu.dequantize(), layer.dequantize(), atol=2e-3, rtol=1e-2)


def test_grouped_int8_runs_exactly_as_two_int4_halves():
    """GGUF Q8_0's groups of 32: q = 16 hi + lo split into the int4 kernel; the weight is unchanged."""
    layer = Int8Linear.from_dense(_weight(), 32)
    model = nn.Module()
    model.a = layer
    use_cpu_layouts(model, threads=2)
    assert type(model.a) is Int8GroupedCPULinear
    x = torch.randn(5, 256)
    assert_close_bf16(model.a(x), layer(x))
    # the scale table is bf16: exact integers, scales to bf16's 8 bits
    torch.testing.assert_close(model.a.dequantize(), layer.dequantize(), atol=1e-3, rtol=1e-2)
    q_back = model.a.dequantize() / layer.scales.float().repeat_interleave(32, dim=1)
    assert (q_back.round() - layer.weight.float()).abs().max() == 0


def test_odd_output_sizes_keep_the_canonical_layer():
    model = nn.Module()
    model.b = Int4Linear.from_dense(_weight(out_features=96), 32)  # O not a multiple of 64
    use_cpu_layouts(model, threads=2)
    assert type(model.b) is Int4Linear


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_fused_projections_equal_their_members(method):
    model = komt.load_model(LLAMA, quantize=method, layout="plain")
    mlp = model.model.layers[0].mlp
    x = torch.randn(1, 1, mlp.gate_proj.in_features)
    want = (mlp.gate_proj(x), mlp.up_proj(x))
    use_cpu_layouts(model, threads=2)
    assert hasattr(mlp.gate_proj, "shared_input_group")  # fused after the swap
    for got, ref in zip(project(x, mlp.gate_proj, mlp.up_proj), want):
        assert_close_bf16(got, ref)
    for got, ref in zip((mlp.gate_proj(x), mlp.up_proj(x)), want):  # each member alone: its own rows
        assert_close_bf16(got, ref)


@pytest.mark.parametrize("method, tolerance", [("int8", 0.02), ("int4", 0.15)])
@pytest.mark.parametrize("layout", ["plain", "auto"])
def test_quantized_model_stays_close_to_the_reference_logits(method, tolerance, layout):
    expected = load_file(MISTRAL / "expected.safetensors")
    model = komt.load_model(MISTRAL, quantize=method, layout=layout)
    assert isinstance(model.model.layers[0].self_attn.q_proj, (Int8Linear, Int4Linear, Int8CPULinear, Int4CPULinear))
    assert model.model.embed_tokens.weight.dtype == torch.float32  # embeddings and norms stay dense
    with torch.no_grad():
        got = model(expected["input_ids"])
    want = expected["logits"]
    assert (got - want).abs().max() < tolerance * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.8


def test_a_tied_head_gets_its_own_int8_copy_and_the_embedding_stays_dense():
    model = komt.load_model(LLAMA, quantize="int4", layout="plain")
    assert type(model.lm_head) is Int8Linear and model.lm_head.group_size == model.lm_head.in_features
    assert model.model.embed_tokens.weight.dtype == torch.float32
    dense = komt.load_model(LLAMA, layout="plain")
    err = (model.lm_head.dequantize() - dense.model.embed_tokens.weight).abs()
    assert err.max() <= model.lm_head.scales.float().max() / 2 + 1e-6


def test_lora_on_a_quantized_base_is_lora_on_its_dequantized_weights():
    torch.manual_seed(0)
    base = Int4Linear.from_dense(_weight(), 32)
    lora = LoRALinear(base, r=4, alpha=8)
    nn.init.normal_(lora.lora_B.weight)
    x = torch.randn(2, 256)
    want = x @ base.dequantize().T + lora.scale * (x @ lora.lora_A.weight.T @ lora.lora_B.weight.T)
    torch.testing.assert_close(lora(x), want, atol=1e-5, rtol=1e-5)
    assert lora.lora_A.weight.dtype == torch.float32  # integer base: LoRA matrices in fp32


def test_qlora_step_trains_only_the_adapter_and_merges_into_the_dequantized_weights():
    model = komt.load_model(MISTRAL, quantize="int8", layout="plain")
    inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0))
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    loss = nn.functional.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    assert all(p.grad is not None for p in params)
    assert sum(p.grad.abs().sum() for p in params) > 0  # (B starts at zero: A's gradients are zero at step 1)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.01)
    model.eval()
    with torch.no_grad():
        before = model(ids)
        merged = merge_lora(model)
        assert all(type(m) is nn.Linear for n, m in merged.named_modules() if n.endswith("_proj"))
        torch.testing.assert_close(merged(ids), before, atol=1e-4, rtol=1e-4)


def test_quantize_arguments_are_checked():
    with pytest.raises(ConfigError, match="int4 group_size"):
        komt.load_model(MISTRAL, quantize="int4", group_size=48)
    with pytest.raises(ConfigError, match="quantize must be"):
        komt.load_model(MISTRAL, quantize="int3")
    with pytest.raises(ConfigError, match="group_size needs quantize"):
        komt.load_model(MISTRAL, group_size=32)
    with pytest.raises(ConfigError, match="does not divide"):
        QuantizeSpec("int8", 48).layer("x", _weight())


def test_cpu_int8_layout_survives_an_unaligned_weight():
    """PyTorch's int8 CPU kernel crashes on a weight not 64-byte aligned (as a memory-mapped safetensors
    tensor can be) for inputs of several rows: the layout copies such a weight."""
    layer = Int8Linear.from_dense(_weight(64, 64))
    buffer = torch.empty(64 * 64 + 64, dtype=torch.int8)
    start = 8 + (-buffer.data_ptr()) % 64  # 8 bytes past a 64-byte boundary
    view = buffer[start:start + 64 * 64].view(64, 64)
    view.copy_(layer.weight)
    layer.weight = nn.Parameter(view, requires_grad=False)
    cpu = Int8CPULinear(layer)
    x = torch.randn(7, 64)
    assert_close_bf16(cpu(x), layer(x))


@pytest.mark.parametrize("make", [lambda w: Int8CPULinear(Int8Linear.from_dense(w)),
                                  lambda w: Int8GroupedCPULinear(Int8Linear.from_dense(w, 32), keep_exact=True),
                                  lambda w: Int4CPULinear(Int4Linear.from_dense(w, 32), keep_exact=True)])
def test_precise_head_recomputes_the_top_logits_exactly(make):
    """bf16 kernel logits tie near-equal tokens; the head's candidates must be the exact fp32 products."""
    from komt.model.cpu_quantized import PreciseHead

    layer = make(_weight(1024, 256) * 20)  # logits of magnitude ~20, where bf16's step is 0.125
    head = PreciseHead(layer, top=16)
    x = torch.randn(3, 1, 256)
    exact = x.float() @ _exact_dense(layer).T
    got = head(x)
    top = exact.topk(8, dim=-1).indices  # well inside the head's 16 candidates (chosen by the bf16 values)
    torch.testing.assert_close(got.gather(-1, top), exact.gather(-1, top), atol=1e-4, rtol=1e-5)
    assert torch.equal(got.argmax(-1), exact.argmax(-1))
    assert (layer(x) - exact).abs().max() > 1e-2  # the kernel alone is visibly coarser


def _exact_dense(layer):
    """All rows by `exact_rows`, checked against the canonical layer's dequantization it came from."""
    return layer.exact_rows(torch.arange(layer.out_features))
