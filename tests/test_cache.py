"""The KV cache: rolling buffer equals full recompute, chunked prefill equals one shot, overflow, row views."""

from pathlib import Path

import pytest
import torch

import komt
from komt.errors import GenerationError
from komt.generate.cache import KVCache, cache_size
from komt.generate.generation import decode_step, prefill
from komt.model import Transformer, preset

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def mistral():
    return komt.load_model(FIXTURES / "tiny-mistral")  # W = 8


@pytest.fixture(scope="module")
def llama():
    return komt.load_model(FIXTURES / "tiny-llama")  # no window


def _cached_logits(model, cache, ids, prompt_len):
    """Logits for positions prompt_len-1 .. T-1 of ids [1, T]: prefill the prompt, then one token per step."""
    out = [prefill(model, cache, ids[:, :prompt_len])]
    for pos in range(prompt_len, ids.shape[1]):
        out.append(decode_step(model, cache, ids[:, pos], torch.tensor([pos])))
    return torch.stack(out, dim=1)  # (1, T - prompt_len + 1, V)


def _full_logits(model, ids, prompt_len):
    with torch.no_grad():
        return model(ids)[:, prompt_len - 1 :]


@pytest.mark.parametrize("static", [False, True])
def test_rolling_cache_matches_full_recompute_past_window(mistral, static):
    torch.manual_seed(0)
    ids = torch.randint(0, mistral.config.vocab_size, (1, 40))
    prompt_len = 5
    cache = KVCache(mistral.config, 1, 40, prefill_chunk=prompt_len, device="cpu", dtype=torch.float32, static=static)
    assert cache.wraps and cache.size == 8 + prompt_len - 1 < 40  # the buffer really rolls over
    got = _cached_logits(mistral, cache, ids, prompt_len)
    torch.testing.assert_close(got, _full_logits(mistral, ids, prompt_len), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["mistral", "llama"])
def test_chunked_prefill_equals_one_shot(name, request):
    model = request.getfixturevalue(name)
    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (1, 23))
    one_shot = KVCache(model.config, 1, 30, prefill_chunk=23, device="cpu", dtype=torch.float32)
    chunked = KVCache(model.config, 1, 30, prefill_chunk=3, device="cpu", dtype=torch.float32)
    a = prefill(model, one_shot, ids)
    b = torch.cat([prefill(model, chunked, ids[:, lo : lo + 3], start=lo) for lo in range(0, 23, 3)])[-1:]
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # and the caches keep agreeing afterwards
    token = torch.tensor([7])
    torch.testing.assert_close(decode_step(model, one_shot, token, torch.tensor([23])),
                               decode_step(model, chunked, token, torch.tensor([23])), atol=1e-4, rtol=1e-4)


def test_prefill_splits_long_prompt_into_window_chunks(mistral):
    """A prompt 3x the window through a cache whose chunk is the window: `prefill` chunks it itself."""
    torch.manual_seed(2)
    ids = torch.randint(0, mistral.config.vocab_size, (1, 24))
    cache = KVCache(mistral.config, 1, 40, prefill_chunk=8, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        want = mistral(ids)[:, -1]
    torch.testing.assert_close(prefill(mistral, cache, ids), want, atol=1e-4, rtol=1e-4)


def test_plain_cache_reports_context_full(llama):
    cache = KVCache(llama.config, 1, 6, prefill_chunk=6, device="cpu", dtype=torch.float32)
    assert not cache.wraps and cache.size == 6
    prefill(llama, cache, torch.tensor([[1, 2, 3, 4, 5, 6]]))
    with pytest.raises(GenerationError, match="position 6 is past the cache's 6 positions"):
        decode_step(llama, cache, torch.tensor([7]), torch.tensor([6]))


def test_static_plain_cache_is_checked_by_prefill(llama):
    cache = KVCache(llama.config, 1, 4, prefill_chunk=4, device="cpu", dtype=torch.float32, static=True)
    with pytest.raises(GenerationError, match="context full"):
        prefill(llama, cache, torch.tensor([[1, 2, 3, 4, 5]]))


def test_chunk_larger_than_the_rolling_buffer_allows_is_an_error(mistral):
    cache = KVCache(mistral.config, 1, 100, prefill_chunk=4, device="cpu", dtype=torch.float32)
    with pytest.raises(GenerationError, match="a chunk of 6 positions exceeds the cache's prefill chunk of 4"):
        mistral(torch.zeros(1, 6, dtype=torch.long), positions=torch.arange(6)[None], cache=cache)


def test_short_generation_needs_no_more_than_its_positions(mistral):
    assert cache_size(mistral.config, 5, 5) == 5  # shorter than the window: a plain buffer
    assert cache_size(mistral.config, 1000, 8) == 8 + 8 - 1
    assert cache_size(komt.model.preset("smollm2-135m"), 1000, 8) == 1000  # no window: every position


def test_slots_follow_the_docstring_walkthrough():
    """W = 4, chunk 3: size 6; positions 6 and 7 overwrite slots 0 and 1 (module docstring)."""
    config = preset("tiny-mistral-32k", sliding_window=4, vocab_size=64, num_hidden_layers=1)
    model = Transformer(config).eval()
    cache = KVCache(config, 1, 100, prefill_chunk=3, device="cpu", dtype=torch.float32)
    assert cache.size == 6
    prefill(model, cache, torch.tensor([[1, 2, 3, 4, 5, 6]]))
    assert cache.slot_positions.tolist() == [[0, 1, 2, 3, 4, 5]]
    decode_step(model, cache, torch.tensor([7]), torch.tensor([6]))
    decode_step(model, cache, torch.tensor([8]), torch.tensor([7]))
    assert cache.slot_positions.tolist() == [[6, 7, 2, 3, 4, 5]]


def test_row_views_write_only_their_row(mistral):
    cache = KVCache(mistral.config, 3, 20, prefill_chunk=8, device="cpu", dtype=torch.float32)
    prefill(mistral, cache.row(1), torch.tensor([[5, 6, 7]]))
    assert cache.slot_positions[1, :3].tolist() == [0, 1, 2]
    assert (cache.slot_positions[[0, 2]] == -1).all()
    assert all(k[[0, 2]].abs().sum() == 0 and k[1].abs().sum() > 0 for k in cache.k)
    pair = cache.rows(1, 3)
    assert pair.batch_size == 2 and all(p.data_ptr() == k[1].data_ptr() for p, k in zip(pair.k, cache.k))
    cache.clear(1)
    assert (cache.slot_positions == -1).all()


def test_rows_prefilled_separately_decode_like_solo_caches(mistral):
    """Two prompts prefilled into rows of one cache, then one batched step == each through its own cache."""
    prompts = [torch.tensor([[3, 1, 4, 1, 5]]), torch.tensor([[9, 2, 6, 5, 3, 5, 8, 9, 7, 9]])]
    shared = KVCache(mistral.config, 2, 30, prefill_chunk=8, device="cpu", dtype=torch.float32)
    solo = []
    for b, ids in enumerate(prompts):
        prefill(mistral, shared.row(b), ids)
        own = KVCache(mistral.config, 1, 30, prefill_chunk=8, device="cpu", dtype=torch.float32)
        prefill(mistral, own, ids)
        solo.append(decode_step(mistral, own, torch.tensor([11]), torch.tensor([ids.shape[1]])))
    batched = decode_step(mistral, shared, torch.tensor([11, 11]), torch.tensor([5, 10]))
    torch.testing.assert_close(batched, torch.cat(solo), atol=1e-4, rtol=1e-4)


def test_bad_sizes_are_an_error(mistral):
    with pytest.raises(GenerationError, match="batch_size, max_positions and prefill_chunk >= 1"):
        KVCache(mistral.config, 0, 10, 4, "cpu", torch.float32)
