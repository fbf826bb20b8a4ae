"""The decoding loop against references: golden greedy ids, full recompute, solo vs batch, rescoring, stops."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import komt
from komt.errors import GenerationError
from komt.generate import GenerationStats, generate, generate_batch, stream_text
from komt.generate.tokenizer import load_tokenizer
from komt.model import Transformer, preset

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def mistral():
    return komt.load_model(FIXTURES / "tiny-mistral")  # sliding window 8


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(FIXTURES / "tokenizer" / "tokenizer.model")


@pytest.fixture(scope="module")
def model_32k():
    """A random tiny Mistral with the real 32000-token vocabulary, so its ids decode with the real tokenizer."""
    torch.manual_seed(0)
    return Transformer(preset("tiny-mistral-32k")).eval().requires_grad_(False)


def _full_recompute_greedy(model, prompt, n):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt):].tolist()


@pytest.mark.parametrize("name", ["tiny-mistral", "tiny-llama"])
def test_greedy_matches_reference_ids(name):
    model = komt.load_model(FIXTURES / name)
    expected = load_file(FIXTURES / name / "expected.safetensors")
    prompt = expected["greedy_prompt"][0].tolist()
    want = expected["greedy_new_ids"][0].tolist()
    assert generate(model, prompt, max_new_tokens=len(want)) == want


def test_long_generation_past_the_window_equals_full_recompute(mistral):
    prompt = [1, 17, 300, 42, 9]
    got = generate(mistral, prompt, max_new_tokens=40)  # 45 positions through a window of 8
    assert got == _full_recompute_greedy(mistral, prompt, 40)


def test_long_prompt_is_prefilled_in_window_chunks(mistral):
    torch.manual_seed(3)
    prompt = torch.randint(3, mistral.config.vocab_size, (30,)).tolist()  # 30 > W = 8
    assert generate(mistral, prompt, max_new_tokens=12) == _full_recompute_greedy(mistral, prompt, 12)


def test_batched_equals_single(mistral):
    prompts = [[1, 5, 9], [1, 200, 300, 400, 500, 600, 700, 800, 900, 17, 4], [1, 2]]
    solo = [generate(mistral, p, max_new_tokens=15) for p in prompts]
    assert generate_batch(mistral, prompts, max_new_tokens=15) == solo


def test_seeded_batch_row_b_equals_a_solo_generation_seeded_seed_plus_b(mistral):
    prompts = [[1, 5, 9], [1, 200, 300, 400], [1, 2]]
    kwargs = {"max_new_tokens": 12, "temperature": 0.9, "top_p": 0.9, "repetition_penalty": 1.1}
    batch = generate_batch(mistral, prompts, seed=7, **kwargs)
    assert batch == [generate(mistral, p, seed=7 + b, **kwargs) for b, p in enumerate(prompts)]


def test_generate_and_stream_text_share_one_decoding_state(model_32k, tokenizer):
    """The text stream of a generation is the streaming decode of its ids, EOS and limit alike."""
    prompt = tokenizer.encode("[INST]부산 여행 [/INST]")
    for max_new in (1, 7, 25):
        ids = generate(model_32k, prompt, max_new_tokens=max_new, eos_id=tokenizer.eos_id)
        text = "".join(stream_text(model_32k, tokenizer, prompt, max_new_tokens=max_new))
        assert text == tokenizer.decode(ids)


def test_batched_prompt_and_max_new_tokens_past_the_context_is_refused(mistral):
    """One rule for generate, generate_batch, the CLI and the server: prompt + max_new_tokens must fit."""
    long = [1] + [7] * (mistral.config.max_position_embeddings - 4)  # room for 3 new tokens only
    out = generate_batch(mistral, [[1, 5, 9], long], max_new_tokens=3, temperature=0.9, seed=0)
    assert [len(o) for o in out] == [3, 3]
    with pytest.raises(GenerationError, match="together past the model's context of 256; use max_new_tokens 3"):
        generate_batch(mistral, [[1, 5, 9], long], max_new_tokens=10, temperature=0.9, seed=0)


def test_generate_then_rescore_gives_the_same_logprobs(mistral):
    prompt = [1, 44, 55, 66]
    logprobs: list[float] = []
    new = generate(mistral, prompt, max_new_tokens=20, temperature=0.9, top_k=50, seed=3, token_logprobs=logprobs)
    assert len(logprobs) == len(new) == 20
    ids = torch.tensor([prompt + new])
    with torch.no_grad():
        scores = mistral(ids).log_softmax(-1)[0, len(prompt) - 1 : -1]  # position t scores token t + 1
    rescored = scores.gather(-1, torch.tensor(new)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(logprobs), rescored, atol=1e-4, rtol=0)


def test_same_seed_same_tokens_different_seed_differs(mistral):
    kwargs = {"max_new_tokens": 20, "temperature": 1.0, "top_k": 100, "top_p": 0.95}
    a = generate(mistral, [1, 3, 5], seed=11, **kwargs)
    assert a == generate(mistral, [1, 3, 5], seed=11, **kwargs)
    assert a != generate(mistral, [1, 3, 5], seed=12, **kwargs)


def test_stops_at_eos_without_yielding_it(mistral):
    prompt = [1, 17, 300, 42, 9]
    greedy = generate(mistral, prompt, max_new_tokens=10)
    eos = greedy[4]
    first = greedy.index(eos)
    assert generate(mistral, prompt, max_new_tokens=10, eos_id=eos) == greedy[:first]


def test_stops_at_max_new_tokens_and_at_the_context(mistral):
    assert len(generate(mistral, [1, 2, 3], max_new_tokens=7)) == 7
    context = mistral.config.max_position_embeddings
    prompt = [1] * (context - 2)
    assert len(generate(mistral, prompt, max_new_tokens=2)) == 2  # the last 2 positions
    with pytest.raises(GenerationError, match="254 tokens and max_new_tokens is 3: together past"):
        generate(mistral, prompt, max_new_tokens=3)  # refused, not silently cut


def test_stats_count_tokens_and_time(mistral):
    stats = GenerationStats()
    generate(mistral, [1, 2, 3, 4], max_new_tokens=6, stats=stats)
    assert (stats.prompt_tokens, stats.new_tokens) == (4, 6)
    assert stats.start <= stats.first_token_at <= stats.end
    assert stats.decode_tokens_per_s > 0 and stats.prefill_tokens_per_s > 0
    assert "prompt 4 tokens, 6 new tokens" in stats.summary()


@pytest.mark.parametrize(
    "prompt, kwargs, message",
    [
        ([], {}, "the prompt is empty"),
        ([1, 99999], {}, "token id 99999 is outside the vocabulary"),
        ([1] * 256, {}, "the prompt has 256 tokens; the model's context is 256"),
        ([1, 2], {"max_new_tokens": -1}, "max_new_tokens must be >= 0"),
        ([1, 2], {"temperature": -1.0}, "temperature must be >= 0"),
    ],
)
def test_bad_requests_raise(mistral, prompt, kwargs, message):
    with pytest.raises(GenerationError, match=message):
        generate(mistral, prompt, **kwargs)


def test_stream_text_equals_decoding_the_ids(model_32k, tokenizer):
    prompt = tokenizer.encode("[INST]제주도 여행 코스 [/INST]")
    ids = generate(model_32k, prompt, max_new_tokens=30, temperature=0.9, seed=5, eos_id=tokenizer.eos_id)
    pieces = list(stream_text(model_32k, tokenizer, prompt, max_new_tokens=30, temperature=0.9, seed=5))
    assert "".join(pieces) == tokenizer.decode(ids)
    assert len(pieces) > 1  # streamed, not one block at the end


def test_stop_string_spanning_tokens_is_not_emitted(model_32k, tokenizer):
    prompt = tokenizer.encode("[INST]안녕하세요 [/INST]")
    ids = generate(model_32k, prompt, max_new_tokens=30, eos_id=tokenizer.eos_id)
    text = tokenizer.decode(ids)
    # A stop string from the middle of one piece to the middle of the next, so no single token holds it.
    head = tokenizer.decode(ids[:10])
    assert text.startswith(head) and 2 <= len(head) <= len(text) - 2
    boundary = len(head)
    stop = text[boundary - 2 : boundary + 2]
    stats = GenerationStats()
    got = "".join(stream_text(model_32k, tokenizer, prompt, max_new_tokens=30, stop=[stop], stats=stats))
    assert got == text[: text.index(stop)]
    assert stats.end is not None and stats.new_tokens < 30  # generation really stopped there


def test_stop_string_that_never_appears_changes_nothing(model_32k, tokenizer):
    prompt = tokenizer.encode("[INST]안녕하세요 [/INST]")
    plain = "".join(stream_text(model_32k, tokenizer, prompt, max_new_tokens=20))
    assert "".join(stream_text(model_32k, tokenizer, prompt, max_new_tokens=20, stop=["\x00never"])) == plain


def test_split_gemv_generates_the_reference_ids():
    from komt.model.cpu_layouts import use_cpu_layouts

    model = komt.load_model(FIXTURES / "tiny-llama")  # tied embeddings: the transposed lm_head is shared
    expected = load_file(FIXTURES / "tiny-llama" / "expected.safetensors")
    assert use_cpu_layouts(model, threads=2) > 0
    assert model.lm_head.weight is model.model.embed_tokens.weight
    prompt = expected["greedy_prompt"][0].tolist()
    want = expected["greedy_new_ids"][0].tolist()
    assert generate(model, prompt, max_new_tokens=len(want)) == want


@pytest.mark.slow
def test_compiled_split_gemv_decode_generates_the_reference_ids():
    """The fused/split CPU products inside a compiled step (an opaque custom op there) change no token."""
    from komt.model.cpu_layouts import use_cpu_layouts

    model = komt.load_model(FIXTURES / "tiny-llama")
    expected = load_file(FIXTURES / "tiny-llama" / "expected.safetensors")
    assert use_cpu_layouts(model, threads=2) > 0
    prompt = expected["greedy_prompt"][0].tolist()
    want = expected["greedy_new_ids"][0].tolist()
    assert generate(model, prompt, max_new_tokens=len(want), compile_mode="default") == want


@pytest.mark.slow
def test_compiled_decode_step_generates_the_same_tokens(mistral):
    prompt = [1, 17, 300, 42, 9]
    want = _full_recompute_greedy(mistral, prompt, 20)
    assert generate(mistral, prompt, max_new_tokens=20, compile_mode="default") == want
    # a different prompt length reuses the compiled step (the static cache is bucketed)
    assert generate(mistral, prompt[:3], max_new_tokens=20, compile_mode="default") == \
        _full_recompute_greedy(mistral, prompt[:3], 20)


@pytest.mark.slow
def test_a_compiled_batch_decodes_the_tokens_of_an_eager_batch(mistral):
    """`generate_batch(compile_mode=...)` compiles its batched step (bench --batch-size 2 --compile ran eager)."""
    import torch._dynamo

    prompts = [[1, 5, 9], [1, 200, 300, 400, 500, 600, 700, 800, 900, 17, 4]]
    want = generate_batch(mistral, prompts, max_new_tokens=20)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    assert generate_batch(mistral, prompts, max_new_tokens=20, compile_mode="default") == want
    assert counters["stats"]["unique_graphs"] >= 1  # it really compiled


@pytest.mark.cuda
@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_decode_on_cuda_generates_the_same_tokens(mode, kernels):
    model = komt.load_model(FIXTURES / "tiny-mistral", device="cuda", kernels=kernels)
    prompt = [1, 17, 300, 42, 9]
    want = generate(model, prompt, max_new_tokens=24)
    assert generate(model, prompt, max_new_tokens=24, compile_mode=mode) == want
    shorter = prompt[:4]  # another length reuses the compiled step
    assert generate(model, shorter, max_new_tokens=24, compile_mode=mode) == generate(model, shorter, max_new_tokens=24)


def test_decode_speed_leaves_out_the_step_that_compiles():
    stats = GenerationStats(prompt_tokens=4, new_tokens=12, start=0.0, first_token_at=1.0, end=13.0)
    assert stats.decode_tokens_per_s == pytest.approx(11 / 12)
    stats.first_step_s = 10.0  # the first decode step compiled: 10 s; the other 10 steps took 2 s
    assert stats.decode_tokens_per_s == pytest.approx(10 / 2)
    assert stats.summary().endswith("decode 5.0 tok/s, compiling 10.0 s")
