"""The load test's two scenarios (komt.serve.loadtest): long prompts arriving while streams decode, and a
second chat turn with and without the prefix cache. Each returns a summary dict; `*_report` prints it.

The decoding streams ask for `logprobs`, so that a server that honours it (komt) sends a chunk for every
token and the gaps are token gaps; one that ignores it is timed by its text chunks.

Long texts are sized in the server's own tokens: one probe request (max_tokens 1) reads `usage.prompt_tokens`
of a known text, and the filler is repeated to the wanted count, so the same flags mean the same load on
komt and on llama-cpp-python whatever their tokenizers.
"""

from __future__ import annotations

import statistics
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from komt.serve.loadtest import RequestResult, percentile, post_json, stream_chat

FILLER = "서울은 한국의 수도이며 많은 사람들이 살고 있습니다. Seoul has old palaces, markets and mountains. "
LONG_ANSWER = "한국의 역사와 문화에 대해 아주 길고 자세하게 설명해 주세요."


def _body(messages: list[dict], max_tokens: int, **fields) -> dict:
    return {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, **fields}


def text_of_tokens(url: str, n_tokens: int, api_key: str | None = None) -> str:
    """A user message of about `n_tokens` prompt tokens, chat template included (calibrated on the server)."""
    def prompt_tokens(reps: int) -> int:
        body = {"messages": [{"role": "user", "content": FILLER * reps + "?"}], "max_tokens": 1,
                "cache_salt": uuid.uuid4().hex}
        return post_json(url, "/v1/chat/completions", body, api_key)["usage"]["prompt_tokens"]

    base, ten = prompt_tokens(0), prompt_tokens(10)
    per_rep = max((ten - base) / 10, 1e-9)
    return FILLER * max(0, round((n_tokens - base) / per_rep)) + "?"


def interference(url: str, *, streams: int = 4, arrivals: int = 4, long_tokens: int = 2000, stream_tokens: int = 512,
                 api_key: str | None = None) -> dict:
    """While `streams` requests decode, `arrivals` prompts of `long_tokens` tokens arrive at once."""
    long_text = text_of_tokens(url, long_tokens, api_key)
    started = [threading.Event() for _ in range(streams)]
    results: list[RequestResult | None] = [None] * streams

    def decode(i: int) -> None:
        # logprobs: one chunk per token. Without them a server streams text, and a byte-level BPE spells a
        # Korean syllable in up to three tokens, held back until the character is whole: the chunk gaps
        # would be multiples of the step time (measured: a p99 of 3 mixed steps), not the scheduler's gaps.
        body = _body([{"role": "user", "content": f"{LONG_ANSWER} ({i + 1})"}], stream_tokens, logprobs=True)
        results[i] = stream_chat(url, body, api_key, on_first_token=started[i].set)
        started[i].set()  # (also when it failed before its first token)

    threads = [threading.Thread(target=decode, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for event in started:
        event.wait()
    time.sleep(0.5)  # some steady decoding first: the median gap
    arrived = time.perf_counter()
    with ThreadPoolExecutor(max_workers=arrivals) as pool:
        longs = list(pool.map(lambda i: stream_chat(url, _body([{"role": "user", "content": f"({i}) {long_text}"}], 8,
                                                               cache_salt=uuid.uuid4().hex), api_key),
                              range(arrivals)))
    prefilled = max((r.first_token or r.end) for r in longs)
    for t in threads:
        t.join()
    ok = [r for r in results if r is not None and r.ok]
    during = [b - a for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:]) if arrived <= b <= prefilled]
    before = [b - a for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:]) if b < arrived]
    running = sum(1 for r in ok if r.chunk_times and r.chunk_times[-1] >= prefilled)
    median = statistics.median(before) if before else float("nan")
    return {
        "scenario": "interference", "streams": streams, "arrivals": arrivals,
        # (a server that streams no usage: the calibrated target)
        "long_prompt_tokens": statistics.median(r.prompt_tokens or long_tokens for r in longs) if longs else 0,
        "streams_running_throughout": running,
        "gap_median_ms": 1000 * median, "gap_p99_during_ms": 1000 * percentile(during, 99),
        "p99_over_median": percentile(during, 99) / median if before and during else float("nan"),
        "long_ttft_ms": {p: 1000 * percentile([r.first_token - r.start for r in longs if r.first_token], p)
                         for p in (50, 100)},
        "errors": sorted({r.error for r in [*results, *longs] if r is not None and not r.ok})[:3],
    }


def interference_report(s: dict) -> str:
    return (f"interference: {s['streams']} streams decoding ({s['streams_running_throughout']} throughout), "
            f"{s['arrivals']} prompts of {s['long_prompt_tokens']:.0f} tokens arrive: streams' gap median "
            f"{s['gap_median_ms']:.1f} ms, p99 while prefilling {s['gap_p99_during_ms']:.1f} ms "
            f"({s['p99_over_median']:.2f}x median); long prompts' TTFT p50 {s['long_ttft_ms'][50]:.0f} ms, "
            f"max {s['long_ttft_ms'][100]:.0f} ms")


def prefix(url: str, *, history_tokens: int = 1500, max_tokens: int = 32, repeat: int = 3,
           api_key: str | None = None) -> dict:
    """A second chat turn over a `history_tokens` history: TTFT with the first turn cached vs cold."""
    history = [{"role": "user", "content": text_of_tokens(url, history_tokens, api_key)}]
    warm, cold, identical, errors = [], [], [], []
    for _ in range(repeat):
        salt = uuid.uuid4().hex
        first = stream_chat(url, _body(history, max_tokens, cache_salt=salt), api_key)
        turn2 = history + [{"role": "assistant", "content": first.text or "네."},
                           {"role": "user", "content": "방금 한 말을 한 문장으로 요약해 주세요."}]
        hot = stream_chat(url, _body(turn2, max_tokens, cache_salt=salt), api_key)
        fresh = stream_chat(url, _body(turn2, max_tokens, cache_salt=uuid.uuid4().hex), api_key)
        errors += [r.error for r in (first, hot, fresh) if not r.ok]
        if hot.ok and fresh.ok and hot.first_token and fresh.first_token:
            warm.append(hot)
            cold.append(fresh)
            identical.append(hot.text == fresh.text)
    ttft = lambda rs: statistics.median(r.first_token - r.start for r in rs) if rs else float("nan")  # noqa: E731
    return {
        "scenario": "prefix",
        "history_tokens": statistics.median(r.prompt_tokens or history_tokens for r in warm) if warm else 0,
        "cached_tokens": statistics.median(r.cached_tokens for r in warm) if warm else 0,
        "ttft_warm_ms": 1000 * ttft(warm), "ttft_cold_ms": 1000 * ttft(cold),
        "cold_over_warm": ttft(cold) / ttft(warm) if warm else float("nan"),
        "identical": bool(identical) and all(identical), "pairs": len(warm), "errors": sorted(set(errors))[:3],
    }


def prefix_report(s: dict) -> str:
    return (f"prefix: second turn over {s['history_tokens']:.0f} prompt tokens ({s['cached_tokens']:.0f} cached): "
            f"TTFT warm {s['ttft_warm_ms']:.0f} ms, cold {s['ttft_cold_ms']:.0f} ms ({s['cold_over_warm']:.2f}x); "
            f"identical output: {s['identical']} ({s['pairs']} pairs)")
