"""The CPU layouts (komt.model.cpu_layouts): each variant equals the layer it replaces, the state dict and
ties are kept, fused groups equal their members, and anything a layout does not cover falls back."""

import pytest
import torch
from torch import nn

from komt.model.cpu_gemv import SplitGEMVLinear
from komt.model.cpu_layouts import use_cpu_layouts
from komt.model.linear import project
from komt.model import Transformer, preset


@pytest.mark.parametrize("out_features, n_blocks", [(96, 2), (96, 3), (100, 4)])
@pytest.mark.parametrize("transposed", [False, True])
def test_split_product_equals_linear(out_features, n_blocks, transposed):
    torch.manual_seed(0)
    linear = nn.Linear(48, out_features, bias=False).requires_grad_(False)
    if transposed:  # the same (O, I) weight stored column-major, as use_cpu_layouts stores lm_head
        linear.weight.data = linear.weight.data.t().contiguous().t()
    split = SplitGEMVLinear(linear, n_blocks)
    for shape in [(1, 48), (1, 1, 48), (48,), (3, 48), (2, 5, 48)]:  # one row -> bmm; more -> F.linear
        x = torch.randn(shape)
        torch.testing.assert_close(split(x), linear(x), atol=1e-5, rtol=1e-5)


def test_new_weights_are_picked_up():
    linear = nn.Linear(8, 6, bias=False).requires_grad_(False)
    split = SplitGEMVLinear(linear, 2)
    x = torch.randn(1, 8)
    split(x)
    split.weight = nn.Parameter(torch.randn(6, 8), requires_grad=False)
    torch.testing.assert_close(split(x), x @ split.weight.T)


def _small_model():
    torch.manual_seed(0)
    return Transformer(preset("smollm2-135m", num_hidden_layers=2, vocab_size=512)).eval().requires_grad_(False)


def test_swap_keeps_state_dict_and_tied_weights():
    model = _small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 512, (1, 6))
    with torch.no_grad():
        want = model(ids)
    assert use_cpu_layouts(model, threads=2) == 2 * 7 + 1
    assert isinstance(model.lm_head, SplitGEMVLinear) and isinstance(model.lm_head, nn.Linear)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert model.lm_head.weight.t().is_contiguous()  # the vocabulary projection is stored transposed
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), want, atol=1e-4, rtol=1e-4)  # GEMM order differs a little
        x = torch.randn(1, 1, 576)
        torch.testing.assert_close(model.lm_head(x), x @ before["lm_head.weight"].T, atol=1e-4, rtol=1e-4)


def test_nothing_to_do_on_one_thread_or_for_bf16():
    model = Transformer(preset("tiny-mistral-32k", vocab_size=64)).eval()
    assert use_cpu_layouts(model, threads=1) == 0
    assert use_cpu_layouts(model.to(torch.bfloat16), threads=2) == 0
    assert type(model.lm_head) is nn.Linear


def test_lora_layers_are_left_alone():
    from komt.model.lora import LoRAConfig, LoRALinear, inject_lora

    model = Transformer(preset("tiny-mistral-32k", vocab_size=64)).eval()
    inject_lora(model, LoRAConfig(r=4, alpha=8, targets=("q_proj",)))
    use_cpu_layouts(model, threads=2)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, LoRALinear) and type(q.lora_A) is nn.Linear and type(q.lora_B) is nn.Linear
    assert isinstance(q.base_layer, SplitGEMVLinear)  # the LoRA layer's base gets the layout
    assert not hasattr(model.model.layers[0].self_attn.k_proj, "shared_input_group")  # q/k/v stay separate
    assert isinstance(model.model.layers[0].self_attn.k_proj, SplitGEMVLinear)
    assert hasattr(model.model.layers[0].mlp.gate_proj, "shared_input_group")


def test_fused_projections_equal_the_separate_ones_and_share_one_matrix():
    model = _small_model()
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    weights = {n: getattr(attn, n).weight.clone() for n in ("q_proj", "k_proj", "v_proj")}
    weights |= {n: getattr(mlp, n).weight.clone() for n in ("gate_proj", "up_proj")}
    use_cpu_layouts(model, threads=2)
    storage = attn.q_proj.weight.untyped_storage().data_ptr()
    assert all(getattr(attn, n).weight.untyped_storage().data_ptr() == storage for n in ("k_proj", "v_proj"))
    for shape in [(1, 1, 576), (576,), (2, 3, 576)]:  # one row: the fused product; more: one by one
        x = torch.randn(shape)
        for owner, names in ((attn, ("q_proj", "k_proj", "v_proj")), (mlp, ("gate_proj", "up_proj"))):
            outs = project(x, *(getattr(owner, n) for n in names))
            assert len(outs) == len(names)
            for out, name in zip(outs, names):
                torch.testing.assert_close(out, x @ weights[name].T, atol=1e-5, rtol=1e-5)


def test_a_lora_layer_swapped_in_after_fusing_is_not_bypassed():
    from komt.model.lora import LoRAConfig, inject_lora

    model = _small_model()
    use_cpu_layouts(model, threads=2)
    inject_lora(model, LoRAConfig(r=4, alpha=8, targets=("k_proj",)))
    attn = model.model.layers[0].self_attn
    torch.nn.init.normal_(attn.k_proj.lora_B.weight)  # a non-zero update
    x = torch.randn(1, 1, 576)
    with torch.no_grad():
        _, k, _ = project(x, attn.q_proj, attn.k_proj, attn.v_proj)
        torch.testing.assert_close(k, attn.k_proj(x))
        assert not torch.allclose(k, x @ attn.k_proj.base_layer.weight.T)


def test_a_replaced_weight_is_used_not_the_fused_copy():
    model = _small_model()
    use_cpu_layouts(model, threads=2)
    mlp = model.model.layers[0].mlp
    mlp.up_proj.weight = nn.Parameter(torch.randn(1536, 576), requires_grad=False)
    x = torch.randn(1, 576)
    torch.testing.assert_close(project(x, mlp.gate_proj, mlp.up_proj)[1], x @ mlp.up_proj.weight.T, atol=1e-4, rtol=1e-4)


def test_fusing_twice_changes_nothing():
    model = _small_model()
    assert use_cpu_layouts(model, threads=2) == 2 * 7 + 1
    group = model.model.layers[0].self_attn.q_proj.shared_input_group
    assert use_cpu_layouts(model, threads=2) == 2 * 7 + 1
    assert model.model.layers[0].self_attn.q_proj.shared_input_group is group
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear


def test_each_swapped_out_layer_is_freed_before_the_next_one_is_converted(monkeypatch):
    """The pass's peak memory: converting a quantized model (7B int4: 4.4 GB canonical, as much packed)
    must not keep the old layers alive until it ends, which would hold both copies of every weight."""
    import weakref

    from komt.model import cpu_layouts
    from komt.model.checkpoint import random_model
    from komt.model.quantized_linear import QuantizeSpec

    config = preset("smollm2-135m", num_hidden_layers=2, vocab_size=512)
    model = random_model(config, torch.device("cpu"), torch.float32, quantize=QuantizeSpec("int4"))
    real, swapped, alive_at_each_call = cpu_layouts._cpu_variant, [], []

    def watching(module, threads, **options):
        alive_at_each_call.append(sum(ref() is not None for ref in swapped))
        new = real(module, threads, **options)
        if new is not None:
            swapped.append(weakref.ref(module))
        return new

    monkeypatch.setattr(cpu_layouts, "_cpu_variant", watching)
    assert use_cpu_layouts(model, threads=2) == 2 * 7 + 1
    assert len(swapped) == 2 * 7 + 1  # every projection and the int8 head were converted
    assert max(alive_at_each_call) == 0
