"""`python -m komt.serve.loadtest`: load an OpenAI-compatible server and print throughput and latency figures.

    python -m komt.serve.loadtest --url http://127.0.0.1:8000 -n 32 --concurrency 1 4 8 16 --max-tokens 64
    python -m komt.serve.loadtest --url ... --scenario interference    # 4 streams decode, 4 long prompts arrive
    python -m komt.serve.loadtest --url ... --scenario prefix          # a second chat turn, prefix cache on vs off

concurrency (default): N streaming chat requests, C at a time, one row per C: aggregate output tokens/s (all
completion tokens over the run's wall time) and its ratio to the first row, time to first token (request
sent -> first text chunk), end-to-end latency, and inter-token latency (every gap between consecutive text
chunks of a request, pooled). Token counts come from the server's `usage` (a server that streams none,
like llama-cpp-python's: the count of text chunks).

interference (komt.serve.scenarios): while --streams requests decode, --arrivals prompts of
--long-prompt-tokens tokens arrive at once; reports the running streams' p99 inter-token gap while those
prompts are prefilled over their median gap (a server that prefills each prompt whole stalls every stream
for its whole length), and the long prompts' time to first token.

prefix (komt.serve.scenarios): a chat with a --history-tokens history gets a second turn; its time to first
token with the first turn's KV blocks cached (same `cache_salt`) against a cold run (a fresh salt: nothing
to reuse), and whether both answers are identical. A server without `cache_salt` (llama-cpp-python's)
reuses what it reuses either way; the cold figure is then not cold.

Standard library only (threads and http.client), so it runs wherever Python does, against komt or any
other OpenAI-compatible server (baselines/llamacpp_server.py starts llama-cpp-python's on a GGUF).
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import time
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from komt.argtypes import non_negative_int, number, positive_int

DEFAULT_PROMPT = "한국의 수도에 대해 자세히 설명해 주세요."


@dataclass
class RequestResult:
    """One streamed request as the client saw it (times from time.perf_counter)."""

    ok: bool
    start: float
    end: float = 0.0
    first_token: float | None = None
    completion_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    error: str = ""
    text: str = ""
    chunk_times: list[float] = field(default_factory=list)

    @property
    def gaps(self) -> list[float]:
        """Seconds between consecutive chunks that carry a token (its text, or its log-probability)."""
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]


def stream_chat(url: str, body: dict, api_key: str | None = None, timeout: float = 600.0,
                on_first_token: Callable[[], None] | None = None) -> RequestResult:
    """POST one streaming chat completion to `url` (the server's base URL) and time its chunks."""
    parts = urllib.parse.urlsplit(url)
    conn_type = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = conn_type(parts.hostname, parts.port, timeout=timeout)
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    result = RequestResult(ok=False, start=time.perf_counter())
    try:
        conn.request("POST", parts.path.rstrip("/") + "/v1/chat/completions", json.dumps(body), headers)
        response = conn.getresponse()
        if response.status != 200:
            result.error = f"HTTP {response.status}: {response.read(300).decode('utf-8', 'replace')}"
            return result
        for raw in response:  # one line at a time
            if not raw.startswith(b"data: "):
                continue
            payload = raw[6:].strip()
            if payload == b"[DONE]":
                result.ok = True
                break
            chunk = json.loads(payload)
            if "error" in chunk:
                result.error = chunk["error"].get("message", "error event")
                break
            now = time.perf_counter()
            choice = chunk["choices"][0] if chunk.get("choices") else {}
            content = choice.get("delta", {}).get("content")
            # a token arrives with text, or (asked for) with its log-probability while its text is held back
            if content or (choice.get("logprobs") or {}).get("content"):
                if result.first_token is None and on_first_token is not None:
                    on_first_token()
                result.first_token = result.first_token or now
                result.chunk_times.append(now)
                result.text += content or ""
            if chunk.get("usage"):
                usage = chunk["usage"]
                result.completion_tokens = usage["completion_tokens"]
                result.prompt_tokens = usage.get("prompt_tokens", 0)
                result.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    except (OSError, http.client.HTTPException, json.JSONDecodeError) as err:
        result.error = f"{type(err).__name__}: {err}"
    finally:
        result.end = time.perf_counter()
        conn.close()
    if result.ok and not result.completion_tokens:  # a server that streams no usage: count the text chunks
        result.completion_tokens = len(result.chunk_times)
    return result


def post_json(url: str, path: str, body: dict, api_key: str | None = None, timeout: float = 600.0) -> dict:
    """POST a non-streamed request; its JSON answer (a RuntimeError for anything but 200)."""
    parts = urllib.parse.urlsplit(url)
    conn_type = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = conn_type(parts.hostname, parts.port, timeout=timeout)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    try:
        conn.request("POST", parts.path.rstrip("/") + path, json.dumps(body), headers)
        response = conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"{path} answered HTTP {response.status}: {data[:300].decode('utf-8', 'replace')}")
        return json.loads(data)
    except (OSError, http.client.HTTPException, json.JSONDecodeError) as err:
        raise RuntimeError(f"{path} at {url} failed: {type(err).__name__}: {err}") from None
    finally:
        conn.close()


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of `values`; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    lo = int(rank)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def run(url: str, n: int, concurrency: int, *, max_tokens: int = 64, prompt: str = DEFAULT_PROMPT,
        temperature: float = 0.0, api_key: str | None = None, timeout: float = 600.0) -> dict:
    """Send `n` requests, `concurrency` at a time; return the summary `report` prints."""
    def body(i: int) -> dict:
        # Different prompts per request, so no two rows decode the same sequence.
        return {"messages": [{"role": "user", "content": f"{prompt} ({i + 1})"}], "stream": True,
                "max_tokens": max_tokens, "temperature": temperature, "stream_options": {"include_usage": True}}

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(lambda i: stream_chat(url, body(i), api_key, timeout), range(n)))
    wall = time.perf_counter() - start
    ok = [r for r in results if r.ok]
    tokens = sum(r.completion_tokens for r in ok)
    ttft = [r.first_token - r.start for r in ok if r.first_token is not None]
    latency = [r.end - r.start for r in ok]
    itl = [gap for r in ok for gap in r.gaps]
    return {
        "concurrency": concurrency, "requests": n, "failed": n - len(ok), "wall_s": wall,
        "completion_tokens": tokens, "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "ttft_ms": {p: 1000 * percentile(ttft, p) for p in (50, 90, 99)},
        "latency_s": {p: percentile(latency, p) for p in (50, 90, 99)},
        "itl_ms": {p: 1000 * percentile(itl, p) for p in (50, 99)},
        "errors": sorted({r.error for r in results if not r.ok})[:3],
    }


HEADER = (f"{'conc':>4} {'reqs':>5} {'fail':>4} {'wall s':>7} {'out tok':>8} {'tok/s':>8} {'vs 1st':>6} "
          f"{'TTFT p50/p90/p99 ms':>22} {'latency p50/p90/p99 s':>23} {'ITL p50/p99 ms':>15}")


def report(summary: dict, baseline: dict | None = None) -> str:
    """One table row of a `run` summary (`baseline`: the first row, for the throughput ratio)."""
    t, lat, itl = summary["ttft_ms"], summary["latency_s"], summary["itl_ms"]
    ratio = summary["tokens_per_s"] / baseline["tokens_per_s"] if baseline and baseline["tokens_per_s"] else 1.0
    return (f"{summary['concurrency']:>4} {summary['requests']:>5} {summary['failed']:>4} {summary['wall_s']:>7.2f} "
            f"{summary['completion_tokens']:>8} {summary['tokens_per_s']:>8.1f} {ratio:>5.2f}x "
            f"{t[50]:>8.0f}/{t[90]:>6.0f}/{t[99]:>6.0f} {lat[50]:>9.2f}/{lat[90]:>6.2f}/{lat[99]:>6.2f} "
            f"{itl[50]:>8.1f}/{itl[99]:>6.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m komt.serve.loadtest", description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    parser.add_argument("--scenario", choices=("concurrency", "interference", "prefix", "all"), default="concurrency")
    parser.add_argument("-n", type=positive_int, default=32, help="requests per concurrency level")
    parser.add_argument("--concurrency", type=positive_int, nargs="+", default=[1, 4, 8, 16],
                        help="clients at a time (several: one row each)")
    parser.add_argument("--max-tokens", type=positive_int, default=64)
    parser.add_argument("--temperature", type=number(0), default=0.0)
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--streams", type=positive_int, default=4, help="interference: streams decoding")
    parser.add_argument("--arrivals", type=positive_int, default=4, help="interference: long prompts arriving")
    parser.add_argument("--stream-tokens", type=positive_int, default=512,
                        help="interference: max_tokens of the decoding streams (they must outlast the prefills)")
    parser.add_argument("--long-prompt-tokens", type=positive_int, default=2000, help="interference: tokens per long prompt")
    parser.add_argument("--history-tokens", type=positive_int, default=1500, help="prefix: tokens of chat history")
    parser.add_argument("--repeat", type=positive_int, default=3, help="prefix: warm/cold pairs (medians reported)")
    parser.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    parser.add_argument("--warmup", type=non_negative_int, default=2, help="requests sent first and not measured")
    parser.add_argument("--json", action="store_true", help="print one JSON summary per line instead of a table")
    args = parser.parse_args(argv)
    if args.warmup:
        warm = run(args.url, args.warmup, 1, max_tokens=args.max_tokens, prompt=args.prompt, api_key=args.api_key)
        if warm["failed"]:
            print(f"error: warm-up requests to {args.url} failed: {'; '.join(warm['errors'])}", file=sys.stderr)
            return 1
    try:
        return _scenarios(args)
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


def _scenarios(args: argparse.Namespace) -> int:
    from komt.serve import scenarios

    status = 0
    if args.scenario in ("concurrency", "all"):
        if not args.json:
            print(HEADER)
        first = None
        for concurrency in args.concurrency:
            summary = run(args.url, args.n, concurrency, max_tokens=args.max_tokens, prompt=args.prompt,
                          temperature=args.temperature, api_key=args.api_key)
            first = first or summary
            print(json.dumps(summary, ensure_ascii=False) if args.json else report(summary, first), flush=True)
            if summary["failed"]:
                print(f"  {summary['failed']} failed: {'; '.join(summary['errors'])}", file=sys.stderr)
                status = 1
    if args.scenario in ("interference", "all"):
        result = scenarios.interference(args.url, streams=args.streams, arrivals=args.arrivals,
                                        long_tokens=args.long_prompt_tokens, stream_tokens=args.stream_tokens,
                                        api_key=args.api_key)
        print(json.dumps(result, ensure_ascii=False) if args.json else scenarios.interference_report(result), flush=True)
        status = status or int(bool(result["errors"]))
    if args.scenario in ("prefix", "all"):
        result = scenarios.prefix(args.url, history_tokens=args.history_tokens, repeat=args.repeat,
                                  api_key=args.api_key)
        print(json.dumps(result, ensure_ascii=False) if args.json else scenarios.prefix_report(result), flush=True)
        status = status or int(bool(result["errors"]))
    return status


if __name__ == "__main__":
    sys.exit(main())
