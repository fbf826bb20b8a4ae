"""Parity with the Hugging Face reference on the golden tiny checkpoints, and model invariants."""

import pytest
import torch
from safetensors.torch import load_file

import komt
from komt.model import Transformer, preset


@pytest.mark.parametrize("name", ["tiny-mistral", "tiny-llama"])
def test_logits_match_reference(fixtures, name):
    model = komt.load_model(fixtures / name)
    expected = load_file(fixtures / name / "expected.safetensors")
    with torch.no_grad():
        logits = model(expected["input_ids"])
    assert logits.dtype == torch.float32
    assert logits.shape == expected["logits"].shape
    torch.testing.assert_close(logits, expected["logits"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["tiny-mistral", "tiny-llama"])
def test_greedy_full_recompute_matches_reference(fixtures, name):
    model = komt.load_model(fixtures / name)
    expected = load_file(fixtures / name / "expected.safetensors")
    ids = expected["greedy_prompt"]
    with torch.no_grad():
        for _ in range(expected["greedy_new_ids"].shape[1]):
            next_id = model(ids)[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
    assert torch.equal(ids[:, expected["greedy_prompt"].shape[1]:], expected["greedy_new_ids"])


def test_model_is_in_eval_mode_with_hf_parameter_names(fixtures):
    model = komt.load_model(fixtures / "tiny-mistral")
    assert not model.training
    names = dict(model.named_parameters())
    assert "model.layers.0.self_attn.q_proj.weight" in names
    assert "model.layers.1.mlp.down_proj.weight" in names
    assert "lm_head.weight" in names


def test_tied_embeddings_share_one_tensor(fixtures):
    model = komt.load_model(fixtures / "tiny-llama")
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_sliding_window_limits_what_a_position_sees():
    """With W = 4, changing token 0 must not change the logits at position >= 4 in the last layer's view...
    but it does through earlier layers' receptive field; with one layer the field is exactly W."""
    torch.manual_seed(0)
    config = preset("tiny-mistral-32k", num_hidden_layers=1, sliding_window=4, vocab_size=64)
    model = Transformer(config).eval()
    ids = torch.randint(0, 64, (1, 10))
    other = ids.clone()
    other[0, 0] = (ids[0, 0] + 1) % 64
    with torch.no_grad():
        a, b = model(ids), model(other)
    assert not torch.allclose(a[0, :4], b[0, :4])  # positions 0..3 see token 0
    torch.testing.assert_close(a[0, 4:], b[0, 4:])  # position 4 sees 1..4 only


def test_batch_rows_are_independent():
    torch.manual_seed(0)
    model = Transformer(preset("tiny-mistral-32k", vocab_size=64)).eval()
    ids = torch.randint(0, 64, (3, 12))
    with torch.no_grad():
        batched = model(ids)
        single = torch.cat([model(ids[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_last_only_returns_the_last_position():
    torch.manual_seed(0)
    model = Transformer(preset("tiny-mistral-32k", vocab_size=64)).eval()
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, last_only=True), model(ids)[:, -1:])


def test_rejects_wrong_input_rank():
    model = Transformer(preset("tiny-mistral-32k", vocab_size=64)).eval()
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        model(torch.zeros(5, dtype=torch.long))
