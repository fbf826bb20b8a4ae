"""The block-paged KV cache (komt.generate.paged_cache) as the server's runner drives it: every logit it
produces, in packed steps (prefill chunks beside decode tokens of other requests) and in row steps
(decode only), equals a full forward of the same tokens with no cache."""

from pathlib import Path

import pytest
import torch

import komt
from komt.generate.decoding import DecodingState
from komt.generate.paged_cache import PagedKVCache, bytes_per_token
from komt.serve.blocks import BlockManager
from komt.serve.runner import Runner
from komt.serve.scheduler import Request, Scheduler

FIXTURES = Path(__file__).parent / "fixtures"
BS = 4


@pytest.fixture(scope="module", params=["tiny-mistral", "tiny-llama"])  # window 8 / none
def model(request):
    return komt.load_model(FIXTURES / request.param)


def _requests(model, prompts, max_new):
    g = torch.Generator().manual_seed(0)
    V = model.config.vocab_size
    device = model.model.embed_tokens.weight.device
    return [Request(DecodingState(torch.randint(3, V, (n,), generator=g).tolist(), max_new_tokens=max_new,
                                  vocab_size=V, device=device)) for n in prompts]


def _drive(model, requests, arrivals, *, n_blocks=64, budget=7, compile_mode=None, atol=1e-4):
    """Run requests (request i joins at step arrivals[i]) greedily to the end through the scheduler and the
    runner; check each sampled position's logits against a full forward (unless atol is None). Returns the
    number of packed and of row steps."""
    blocks = BlockManager(n_blocks, BS, model.config.sliding_window)
    sched = Scheduler(blocks, max_num_seqs=8, max_num_batched_tokens=budget)
    device = model.model.embed_tokens.weight.device
    runner = Runner(model, PagedKVCache(model.config, n_blocks, BS, device, torch.float32),
                    max_model_len=model.config.max_position_embeddings, compile_mode=compile_mode)
    layouts = {"packed": 0, "rows": 0}
    t = 0
    while len(sched) or t <= max(arrivals):
        for r, at in zip(requests, arrivals):
            if at == t:
                sched.add(r)
        t += 1
        step = sched.schedule()
        if not step.scheduled:
            continue
        layouts["rows" if all(s.count == 1 for s in step.scheduled) else "packed"] += 1
        sampling, logits = runner.forward(step)
        sched.advance(step)
        for s, row in zip(sampling, logits):
            if atol is not None:
                with torch.no_grad():
                    want = model(torch.tensor([s.request.tokens], device=device))[0, -1]
                torch.testing.assert_close(row, want, atol=atol, rtol=atol)
            s.request.state.accept(int(row.argmax()))
            if s.request.state.finished:
                sched.finish(s.request)
    return layouts


def test_packed_and_row_steps_equal_a_full_forward(model):
    # 23 tokens: chunked by the budget of 7 while the others decode; with W = 8 its early blocks are freed.
    reqs = _requests(model, [23, 3, 13, 5], max_new=12)
    layouts = _drive(model, reqs, arrivals=[0, 0, 2, 6])
    assert layouts["packed"] > 0 and layouts["rows"] > 0


# SmolLM2-135M-Instruct's greedy answer to "What is the capital of France?" as transformers gives it
# (tests/test_gguf_model.py pins the same ids; see its comment for how they were produced).
SMOLLM2_PROMPT = [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]
SMOLLM2_ANSWER = [504, 3575, 282, 4649, 314, 7042, 30]


def test_the_real_quantized_smollm2_answers_as_transformers_does_through_prompt_chunks():
    """Prompt chunks of 5 tokens, the first ones scoring no position: SmolLM2's int4 head (exact top logits,
    no 0-row case) must not run on them, and the answer through the paged runner is transformers'."""
    from conftest import smollm2_gguf

    model = komt.load_model(smollm2_gguf())
    V = model.config.vocab_size
    request = Request(DecodingState(SMOLLM2_PROMPT, max_new_tokens=len(SMOLLM2_ANSWER), vocab_size=V, device="cpu"))
    other = Request(DecodingState([1, 520, 9531, 198], max_new_tokens=4, vocab_size=V, device="cpu"))
    layouts = _drive(model, [request, other], arrivals=[0, 0], budget=5, atol=None)
    assert layouts["packed"] > 1
    assert request.state.output_ids == SMOLLM2_ANSWER


def test_a_prefix_hit_keeps_the_logits_exact(model):
    reqs = _requests(model, [18, 18, 9], max_new=10)
    reqs[1].state.prompt_ids[:] = reqs[0].state.prompt_ids  # the same prompt again, after the first has run
    _drive(model, reqs, arrivals=[0, 12, 1])
    assert reqs[1].cached_tokens == 16  # (with W = 8, only blocks 2 and 3 of them are taken: komt.serve.blocks)


def test_preemption_and_recompute_keep_the_logits_exact(model):
    reqs = _requests(model, [18, 11, 9], max_new=10)
    _drive(model, reqs, arrivals=[0, 0, 1], n_blocks=8, budget=8)  # 7 usable blocks: someone is preempted
    assert sum(r.preemptions for r in reqs) > 0


@pytest.mark.parametrize("device, mode", [pytest.param("cpu", "default", marks=pytest.mark.slow),
                                          pytest.param("cuda", "reduce-overhead", marks=pytest.mark.cuda)])
def test_the_compiled_decode_step_gives_the_same_logits(device, mode):
    """Decode steps compiled (padded to the batch ladder; on CUDA replayed as one graph per shape)."""
    model = komt.load_model(FIXTURES / "tiny-mistral", device=device)
    reqs = _requests(model, [6, 3, 9, 4, 12], max_new=10)  # 1 to 5 rows: padded to 1, 2, 4 and 8
    layouts = _drive(model, reqs, arrivals=[0, 0, 3, 5, 5], compile_mode=mode)
    assert layouts["rows"] > 0


def test_bytes_per_token_counts_keys_and_values_of_every_layer():
    config = komt.load_model(FIXTURES / "tiny-llama").config
    assert bytes_per_token(config, torch.bfloat16) == (2 * config.num_hidden_layers * config.num_key_value_heads
                                                        * config.head_dim * 2)


def test_packed_sequences_attend_per_segment_as_the_whole_masked_row():
    """Three sequences packed in one row (shifted positions, as the runner packs them): one SDPA per
    sequence over its own keys equals one SDPA over the whole row with the block-diagonal mask."""
    from komt.model.attention import AttentionContext, attend

    g = torch.Generator().manual_seed(0)
    lengths = [(5, 9), (1, 12), (3, 3)]  # (queries, keys) of each sequence: a chunk, a decode token, a prompt
    stride = 100
    q_pos = torch.cat([torch.arange(k - t, k) + r * stride for r, (t, k) in enumerate(lengths)])[None]
    k_pos = torch.cat([torch.arange(k) + r * stride for r, (_, k) in enumerate(lengths)])[None]
    segments, T, S = [], 0, 0
    for t, k in lengths:
        segments.append((T, T + t, S, S + k))
        T, S = T + t, S + k
    q = torch.randn(1, 4, T, 8, generator=g)
    k, v = torch.randn(1, 2, S, 8, generator=g), torch.randn(1, 2, S, 8, generator=g)
    whole = attend(q, k, v, AttentionContext.build(q_pos, k_pos, 6, "torch"))
    split = attend(q, k, v, AttentionContext.build(q_pos, k_pos, 6, "torch", tuple(segments)))
    torch.testing.assert_close(split, whole)
