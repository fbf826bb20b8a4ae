"""The engine's features over real HTTP (loopback), each against a reference: prefix caching (a second chat turn
answers as a cold run does), log-probabilities (equal to rescoring with a full forward), n choices (each the
solo answer of its seed), preemption (a tiny KV budget loses nothing), chunked prefill (running streams keep
decoding while a long prompt goes in), and the repetition penalty covering generated tokens."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import pytest
import torch

from serving import (  # noqa: F401, F811 (checkpoint, model, tokenizer, server, client: fixtures)
    chat_ids,
    checkpoint,
    client,
    httpx,
    model,
    reference,
    scrape,
    server,
    serving,
    slowed,
    sse_events,
    tokenizer,
)

from komt import load_model
from komt.errors import ConfigError
from komt.generate import generate
from komt.generate.prompt import format_chat
from komt.serve import Engine
from komt.serve.responses import token_string

BS = 16  # the engine's default block size
FIXTURES = Path(__file__).parent / "fixtures"


def post(client, path, body):
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def salt():
    return uuid.uuid4().hex  # a fresh cache_salt: nothing cached under it yet


# ---- prefix caching --------------------------------------------------------------------------------------

SYSTEM = ("당신은 친절한 한국어 비서입니다. 질문에 정확하고 간결하게 답하고, 모르는 것은 모른다고 말하세요. "
          "You are a helpful assistant who answers in Korean unless asked otherwise.")


def test_a_second_chat_turn_reuses_the_first_turns_blocks_and_answers_as_a_cold_run(client, model, tokenizer):
    key = salt()
    turn1 = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "서울의 인구는 얼마인가요?"}]
    first = post(client, "/v1/chat/completions", {"messages": turn1, "temperature": 0, "max_tokens": 16,
                                                  "cache_salt": key})
    answer = first["choices"][0]["message"]["content"]
    turn2 = turn1 + [{"role": "assistant", "content": answer}, {"role": "user", "content": "부산은요?"}]
    body = {"messages": turn2, "temperature": 0, "max_tokens": 16}
    warm = post(client, "/v1/chat/completions", {**body, "cache_salt": key})
    cold = post(client, "/v1/chat/completions", {**body, "cache_salt": key + "-cold"})
    expected, _, _ = reference(model, tokenizer, format_chat(tokenizer, turn2), 16)
    assert warm["choices"][0]["message"]["content"] == cold["choices"][0]["message"]["content"] == expected
    # What the first turn left in the cache: its prompt and all but its last sampled token, in full blocks.
    prompt1, prompt2 = format_chat(tokenizer, turn1), format_chat(tokenizer, turn2)
    computed = prompt1 + reference(model, tokenizer, prompt1, 16)[1][:-1]
    common = next((i for i, (a, b) in enumerate(zip(computed, prompt2)) if a != b), min(len(computed), len(prompt2)))
    assert warm["usage"]["prompt_tokens_details"]["cached_tokens"] == min(common, len(prompt2) - 1) // BS * BS >= 3 * BS
    assert cold["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


# ---- log-probabilities -----------------------------------------------------------------------------------


def rescore(model, prompt, ids, top):
    """Each new token's log-probability and the `top` most likely at its position, from one full forward."""
    with torch.no_grad():
        logprobs = model(torch.tensor([prompt + ids]))[0].log_softmax(-1)[len(prompt) - 1 : -1]  # (n, V)
    chosen = logprobs.gather(-1, torch.tensor(ids)[:, None])[:, 0]
    values, top_ids = logprobs.topk(top, dim=-1)
    return chosen.tolist(), values.tolist(), top_ids.tolist()


def test_chat_logprobs_equal_rescoring_the_answer_with_a_full_forward(client, model, tokenizer):
    text = "김치찌개 만드는 법을 알려 주세요."
    sampling = {"temperature": 0.9, "seed": 5}
    body = post(client, "/v1/chat/completions", {"messages": [{"role": "user", "content": text}], "max_tokens": 12,
                                                 "logprobs": True, "top_logprobs": 3, **sampling})
    prompt = chat_ids(tokenizer, text)
    _, ids, _ = reference(model, tokenizer, prompt, 12, **sampling)
    content = body["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == [token_string(tokenizer, i)[0] for i in ids]
    assert [c["bytes"] for c in content] == [token_string(tokenizer, i)[1] for i in ids]
    chosen, values, top_ids = rescore(model, prompt, ids, 3)
    torch.testing.assert_close(torch.tensor([c["logprob"] for c in content]), torch.tensor(chosen), atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.tensor([[t["logprob"] for t in c["top_logprobs"]] for c in content]),
                               torch.tensor(values), atol=1e-4, rtol=0)
    assert [[t["token"] for t in c["top_logprobs"]] for c in content] == \
        [[token_string(tokenizer, i)[0] for i in row] for row in top_ids]
    # Streamed, the same entries arrive one chunk at a time.
    with client.stream("POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": text}],
                       "max_tokens": 12, "logprobs": True, "top_logprobs": 3, "stream": True, **sampling}) as r:
        events = sse_events(r)
    streamed = [c for e in events if e["choices"] and e["choices"][0]["logprobs"]
                for c in e["choices"][0]["logprobs"]["content"]]
    assert [(c["token"], c["top_logprobs"]) for c in streamed] == [(c["token"], c["top_logprobs"]) for c in content]


def test_completion_logprobs_equal_rescoring(client, model, tokenizer):
    prompt = tokenizer.encode("The capital of Korea is", bos=True)
    body = post(client, "/v1/completions", {"prompt": prompt, "max_tokens": 10, "temperature": 0, "logprobs": 2})
    _, ids, _ = reference(model, tokenizer, prompt, 10)
    lp = body["choices"][0]["logprobs"]
    chosen, values, top_ids = rescore(model, prompt, ids, 2)
    assert lp["tokens"] == [token_string(tokenizer, i)[0] for i in ids]
    torch.testing.assert_close(torch.tensor(lp["token_logprobs"]), torch.tensor(chosen), atol=1e-4, rtol=0)
    assert [list(d) for d in lp["top_logprobs"]] == [[token_string(tokenizer, i)[0] for i in row] for row in top_ids]
    torch.testing.assert_close(torch.tensor([list(d.values()) for d in lp["top_logprobs"]]), torch.tensor(values),
                               atol=1e-4, rtol=0)
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])


# ---- n choices -------------------------------------------------------------------------------------------


def test_n_choices_are_seeded_seed_plus_i_and_share_the_prompts_blocks(server, client, model, tokenizer):
    text = "Tell me a story about a cat who lives in Seoul and likes kimchi very much."
    prompt = chat_ids(tokenizer, text)
    sampling = {"temperature": 1.0, "top_k": 50, "seed": 11}
    before = scrape(server)["komt_prefix_cache_hits_total"]
    body = post(client, "/v1/chat/completions", {"messages": [{"role": "user", "content": text}], "max_tokens": 12,
                                                 "n": 3, "cache_salt": salt(), **sampling})
    hits = scrape(server)["komt_prefix_cache_hits_total"] - before
    assert hits == 2 * ((len(prompt) - 1) // BS * BS) > 0  # choices 1 and 2 took choice 0's full prompt blocks
    texts = [c["message"]["content"] for c in body["choices"]]
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    expected = [reference(model, tokenizer, prompt, 12, **{**sampling, "seed": 11 + i}) for i in range(3)]
    assert texts == [e[0] for e in expected]
    assert len(set(texts)) > 1
    assert body["usage"]["prompt_tokens"] == len(prompt)
    assert body["usage"]["completion_tokens"] == sum(len(e[1]) for e in expected)
    # Choice i alone, with seed 11 + i, is the same answer; and streamed choices reassemble by index.
    alone = post(client, "/v1/chat/completions", {"messages": [{"role": "user", "content": text}], "max_tokens": 12,
                                                  **{**sampling, "seed": 12}})
    assert alone["choices"][0]["message"]["content"] == texts[1]
    with client.stream("POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": text}],
                       "max_tokens": 12, "n": 2, "stream": True, **sampling}) as r:
        events = sse_events(r)
    streamed = ["", ""]
    for e in events:
        for c in e["choices"]:
            streamed[c["index"]] += c["delta"].get("content", "")
    assert streamed == texts[:2]
    assert sum(1 for e in events if e["choices"] and e["choices"][0]["finish_reason"]) == 2


# ---- preemption ------------------------------------------------------------------------------------------

PROMPTS = ["안녕하세요, 자기소개 해 주세요.", "Tell me a story about a cat.", "서울에서 부산까지 얼마나 걸려요?",
           "What is 2+2? Explain step by step, please."]


def test_preemption_under_a_tiny_kv_budget_loses_nothing(model, tokenizer):
    # 8 blocks of 16 tokens for four requests of ~20 prompt + 40 new tokens: they cannot all hold their blocks.
    settings = [{"temperature": 0}, {"temperature": 0.8, "seed": 3}, {"temperature": 0},
                {"temperature": 1.0, "seed": 4, "repetition_penalty": 1.2}]
    expected = [reference(model, tokenizer, chat_ids(tokenizer, p), 40, **s)[0] for p, s in zip(PROMPTS, settings)]
    answers = [None] * len(PROMPTS)
    with serving(model, tokenizer, engine_kwargs={"kv_cache_tokens": 8 * BS, "max_num_batched_tokens": 16}) as (url, _):
        def ask(i):
            with httpx.Client(base_url=url, timeout=120) as c:
                answers[i] = post(c, "/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPTS[i]}],
                                                              "max_tokens": 40, **settings[i]})
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert scrape(url)["komt_preemptions_total"] > 0
    assert [a["choices"][0]["message"]["content"] for a in answers] == expected


def test_a_budget_that_cannot_hold_one_request_is_refused_at_start(model, tokenizer):
    # With a window of 64 and 16-token chunks a request holds at most 6 blocks; 4 cannot hold one.
    with pytest.raises(ConfigError, match="cannot hold|needs .* lower --max-model-len"):
        Engine(model, tokenizer, kv_cache_tokens=4 * BS, max_num_batched_tokens=16)
    with pytest.raises(ConfigError, match="--max-num-batched-tokens 4 must be >= --max-batch 8"):
        Engine(model, tokenizer, max_num_batched_tokens=4)


def test_a_huge_context_config_is_refused_with_one_line(tmp_path, capsys):
    from conftest import write_checkpoint

    from komt.model import Transformer, preset
    from komt.serve.cli import main

    model = Transformer(preset("tiny-mistral-32k", sliding_window=None, max_position_embeddings=10**9))
    write_checkpoint(model, tmp_path / "huge", tokenizer=True)
    assert main(["--model", str(tmp_path / "huge"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the KV cache budget") and "--max-model-len 1000000000" in err
    assert err.count("\n") == 1


def test_kv_and_prefix_gauges_follow_the_blocks(model, tokenizer):
    with serving(model, tokenizer) as (url, engine), httpx.Client(base_url=url, timeout=60) as c:
        capacity = engine.blocks.capacity
        for _ in range(2):  # the same prompt twice: the second takes the first's full blocks
            post(c, "/v1/chat/completions", {"messages": [{"role": "user", "content": SYSTEM}], "max_tokens": 4,
                                             "temperature": 0})
        m = scrape(url)
    assert m["komt_kv_blocks_used"] == 0 and m["komt_kv_blocks_free"] == capacity  # all freed, some still cached
    assert m["komt_prefix_cache_hit_rate"] == m["komt_prefix_cache_hits_total"] / m["komt_prefix_cache_queries_total"]
    assert 0 < m["komt_prefix_cache_hit_rate"] < 0.5
    assert m["komt_scheduled_tokens_count"] >= 2 + 2 * 3  # two prefills and their decode steps


def test_a_lone_request_decodes_one_row_at_a_time(model, tokenizer):
    """On the CPU a single stream must stay a [1, 1] forward, the shape the split/fused GEMV layouts speed up."""
    shapes = []
    handle = model.register_forward_pre_hook(lambda _m, args: shapes.append(tuple(args[0].shape)))
    try:
        with serving(model, tokenizer) as (url, _), httpx.Client(base_url=url, timeout=60) as c:
            body = post(c, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6,
                                                    "temperature": 0})
    finally:
        handle.remove()
    prompt = len(chat_ids(tokenizer, "hi"))
    assert shapes[0] == (1, prompt) and set(shapes[1:]) == {(1, 1)}
    sampled = body["usage"]["completion_tokens"] + (body["choices"][0]["finish_reason"] == "stop")  # EOS is sampled too
    assert len(shapes) == sampled  # one forward per sampled token: the prefill, then one row each


# ---- chunked prefill -------------------------------------------------------------------------------------


def test_running_streams_keep_decoding_while_a_long_prompt_is_prefilled(checkpoint, tokenizer):
    slow = load_model(checkpoint, device="cpu")
    long_text = " ".join(f"문장 {i}: 오늘은 날씨가 좋습니다." for i in range(20))
    long_prompt = chat_ids(tokenizer, long_text)
    assert len(long_prompt) > 12 * 16  # more than 12 steps of prefill at 16 tokens a step
    b_expected, _, _ = reference(slow, tokenizer, long_prompt, 4)
    a_text = "Tell me a story about a cat."
    assert len(reference(slow, tokenizer, chat_ids(tokenizer, a_text), 120)[1]) == 120  # A does not stop early
    with slowed(slow, 0.01), serving(slow, tokenizer, engine_kwargs={"max_num_batched_tokens": 16}) as (url, _), \
            httpx.Client(base_url=url, timeout=120) as c:
        a_times, done = [], {}
        body = {"messages": [{"role": "user", "content": a_text}], "temperature": 0, "max_tokens": 120, "stream": True}

        def ask_b():
            done["start"] = time.monotonic()
            done["b"] = post(c, "/v1/chat/completions", {"messages": [{"role": "user", "content": long_text}],
                                                         "temperature": 0, "max_tokens": 4})
            done["end"] = time.monotonic()

        with c.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            for line in lines:
                if line.startswith("data: {") and '"content"' in line:
                    break  # A is decoding
            b = threading.Thread(target=ask_b)
            b.start()
            for line in lines:
                if line.startswith("data: {") and '"content"' in line:
                    a_times.append(time.monotonic())
                if "end" in done:
                    break
            b.join()
    during = sum(1 for t in a_times if done["start"] <= t <= done["end"])
    # B's prompt took >= 12 steps; A decoded a token in each of them (a whole-prompt prefill: 1 at most).
    assert during >= 10, during
    assert done["b"]["choices"][0]["message"]["content"] == b_expected


# ---- the repetition penalty covers what was generated ----------------------------------------------------


def _greedy_with_penalty(model, prompt, n, penalty, on_output: bool):
    """Greedy decoding by full recompute, penalising the prompt's tokens and (if on_output) the output's."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]))[0, -1]
            seen = list(set(ids if on_output else prompt))
            penalised = torch.where(logits[seen] > 0, logits[seen] / penalty, logits[seen] * penalty)
            logits[seen] = penalised
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def test_the_engines_repetition_penalty_covers_generated_tokens(tokenizer):
    model = load_model(FIXTURES / "tiny-mistral")  # a model whose greedy answer repeats itself without the penalty
    prompt = [1, 44, 55, 66]
    want = _greedy_with_penalty(model, prompt, 30, 1.3, on_output=True)
    assert want == generate(model, prompt, max_new_tokens=30, repetition_penalty=1.3)  # solo generate agrees
    assert want != _greedy_with_penalty(model, prompt, 30, 1.3, on_output=False)  # here it matters
    assert tokenizer.eos_id not in want
    with serving(model, tokenizer) as (url, _), httpx.Client(base_url=url, timeout=60) as c:
        body = post(c, "/v1/completions", {"prompt": prompt, "max_tokens": 30, "temperature": 0,
                                           "repetition_penalty": 1.3, "logprobs": 0})
    assert body["choices"][0]["logprobs"]["tokens"] == [token_string(tokenizer, i)[0] for i in want]
