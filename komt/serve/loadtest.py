"""`python -m komt.serve.loadtest`: send N streaming chat requests, C at a time, and report throughput and latency.

    python -m komt.serve.loadtest --url http://127.0.0.1:8000 -n 32 --concurrency 1 8 --max-tokens 64

For each concurrency it prints one row: aggregate output tokens/s (all completion tokens over the wall
time of the run), time to first token (request sent -> first text chunk), end-to-end latency, and
inter-token latency (a request's time after its first chunk over its remaining tokens). Token counts come
from the server's `usage` in the last chunk, not from counting chunks. Standard library only (threads and
http.client), so it runs wherever Python does.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

DEFAULT_PROMPT = "한국의 수도에 대해 자세히 설명해 주세요."


@dataclass
class RequestResult:
    """One streamed request as the client saw it (times from time.perf_counter)."""

    ok: bool
    start: float
    end: float = 0.0
    first_token: float | None = None
    completion_tokens: int = 0
    error: str = ""
    chunk_times: list[float] = field(default_factory=list)


def stream_chat(url: str, body: dict, api_key: str | None = None, timeout: float = 600.0) -> RequestResult:
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
            if chunk.get("choices") and chunk["choices"][0].get("delta", {}).get("content"):
                result.first_token = result.first_token or now
                result.chunk_times.append(now)
            if chunk.get("usage"):
                result.completion_tokens = chunk["usage"]["completion_tokens"]
    except (OSError, http.client.HTTPException, json.JSONDecodeError) as err:
        result.error = f"{type(err).__name__}: {err}"
    finally:
        result.end = time.perf_counter()
        conn.close()
    return result


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
                "max_tokens": max_tokens, "temperature": temperature}

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(lambda i: stream_chat(url, body(i), api_key, timeout), range(n)))
    wall = time.perf_counter() - start
    ok = [r for r in results if r.ok]
    tokens = sum(r.completion_tokens for r in ok)
    ttft = [r.first_token - r.start for r in ok if r.first_token is not None]
    latency = [r.end - r.start for r in ok]
    itl = [(r.end - r.first_token) / (r.completion_tokens - 1) for r in ok
           if r.first_token is not None and r.completion_tokens > 1]
    return {
        "concurrency": concurrency, "requests": n, "failed": n - len(ok), "wall_s": wall,
        "completion_tokens": tokens, "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "ttft_ms": {p: 1000 * percentile(ttft, p) for p in (50, 90, 99)},
        "latency_s": {p: percentile(latency, p) for p in (50, 90, 99)},
        "itl_ms": {p: 1000 * percentile(itl, p) for p in (50, 99)},
        "errors": sorted({r.error for r in results if not r.ok})[:3],
    }


HEADER = (f"{'conc':>4} {'reqs':>5} {'fail':>4} {'wall s':>7} {'out tok':>8} {'tok/s':>8} "
          f"{'TTFT p50/p90/p99 ms':>22} {'latency p50/p90/p99 s':>23} {'ITL p50/p99 ms':>15}")


def report(summary: dict) -> str:
    """One table row of a `run` summary."""
    t, lat, itl = summary["ttft_ms"], summary["latency_s"], summary["itl_ms"]
    return (f"{summary['concurrency']:>4} {summary['requests']:>5} {summary['failed']:>4} {summary['wall_s']:>7.2f} "
            f"{summary['completion_tokens']:>8} {summary['tokens_per_s']:>8.1f} "
            f"{t[50]:>8.0f}/{t[90]:>6.0f}/{t[99]:>6.0f} {lat[50]:>9.2f}/{lat[90]:>6.2f}/{lat[99]:>6.2f} "
            f"{itl[50]:>8.1f}/{itl[99]:>6.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m komt.serve.loadtest", description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    parser.add_argument("-n", type=int, default=32, help="requests per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8], help="clients at a time (several: one row each)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    parser.add_argument("--warmup", type=int, default=2, help="requests sent first and not measured")
    parser.add_argument("--json", action="store_true", help="print one JSON summary per line instead of a table")
    args = parser.parse_args(argv)
    if args.n < 1 or min(args.concurrency) < 1 or args.max_tokens < 1:
        parser.error("-n, --concurrency and --max-tokens must be >= 1")
    if args.warmup:
        warm = run(args.url, args.warmup, 1, max_tokens=args.max_tokens, prompt=args.prompt, api_key=args.api_key)
        if warm["failed"]:
            print(f"error: warm-up requests to {args.url} failed: {'; '.join(warm['errors'])}", file=sys.stderr)
            return 1
    if not args.json:
        print(HEADER)
    for concurrency in args.concurrency:
        summary = run(args.url, args.n, concurrency, max_tokens=args.max_tokens, prompt=args.prompt,
                      temperature=args.temperature, api_key=args.api_key)
        print(json.dumps(summary, ensure_ascii=False) if args.json else report(summary), flush=True)
        if summary["failed"]:
            print(f"  {summary['failed']} failed: {'; '.join(summary['errors'])}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
