"""Server metrics in the Prometheus text exposition format, written by hand (no prometheus_client).

Three kinds of series, as Prometheus defines them (https://prometheus.io/docs/instrumenting/exposition_formats/):
a counter only goes up, a gauge is a current value, a histogram counts observations into cumulative
`le` ("less or equal") buckets plus `_sum` and `_count`. Every metric takes a lock: the engine thread and
the HTTP event loop update them concurrently.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence


def _labels(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    escaped = (str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"') for v in values)
    return "{" + ",".join(f'{n}="{v}"' for n, v in zip(names, escaped)) + "}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Counter:
    """A monotonically increasing count, optionally split by labels (e.g. status="200")."""

    kind = "counter"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        self.name, self.help, self.labelnames = name, help, tuple(labelnames)
        self._values: dict[tuple[str, ...], float] = {} if labelnames else {(): 0.0}
        self._lock = threading.Lock()

    def inc(self, *labelvalues: str, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError(f"counter {self.name} cannot decrease (got {amount})")
        if len(labelvalues) != len(self.labelnames):
            raise ValueError(f"counter {self.name} takes labels {self.labelnames}, got {labelvalues}")
        with self._lock:
            self._values[labelvalues] = self._values.get(labelvalues, 0.0) + amount

    def value(self, *labelvalues: str) -> float:
        with self._lock:
            return self._values.get(labelvalues, 0.0)

    def samples(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        suffix = "_total" if not self.name.endswith("_total") else ""
        return [f"{self.name}{suffix}{_labels(self.labelnames, k)} {_number(v)}" for k, v in items]


class Gauge:
    """A value that goes up and down (queue depth, running batch size)."""

    kind = "gauge"

    def __init__(self, name: str, help: str) -> None:
        self.name, self.help = name, help
        self._value = 0.0
        self._lock = threading.Lock()

    def set(self, value: float) -> None:
        with self._lock:
            self._value = float(value)

    def value(self) -> float:
        with self._lock:
            return self._value

    def samples(self) -> list[str]:
        return [f"{self.name} {_number(self.value())}"]


class Histogram:
    """Observations counted into cumulative buckets: `le="0.1"` counts every observation <= 0.1."""

    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Sequence[float]) -> None:
        if list(buckets) != sorted(buckets) or len(set(buckets)) != len(buckets):
            raise ValueError(f"histogram {name} buckets must be strictly increasing, got {buckets}")
        self.name, self.help = name, help
        self.bounds = tuple(float(b) for b in buckets) + (math.inf,)
        self._counts = [0] * len(self.bounds)  # per bucket, not yet cumulative
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        index = next(i for i, bound in enumerate(self.bounds) if value <= bound)
        with self._lock:
            self._counts[index] += 1
            self._sum += value

    @property
    def count(self) -> int:
        with self._lock:
            return sum(self._counts)

    def samples(self) -> list[str]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        lines, cumulative = [], 0
        for bound, n in zip(self.bounds, counts):
            cumulative += n
            lines.append(f'{self.name}_bucket{{le="{_number(bound)}"}} {cumulative}')
        lines.append(f"{self.name}_sum {_number(total)}")
        lines.append(f"{self.name}_count {cumulative}")
        return lines


LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class ServerMetrics:
    """Every series the server exports; the engine and the HTTP layer update them, `/metrics` renders them."""

    def __init__(self) -> None:
        self.requests = Counter("komt_http_requests", "HTTP requests answered, by route and status code.",
                                ("path", "status"))
        self.finished = Counter("komt_generations", "Generations ended, by reason (stop, length, cancelled, "
                                "timeout, error).", ("reason",))
        self.prompt_tokens = Counter("komt_prompt_tokens", "Prompt tokens prefilled.")
        self.generation_tokens = Counter("komt_generation_tokens", "Tokens generated.")
        self.queue_depth = Gauge("komt_queue_depth", "Requests waiting to be scheduled.")
        self.running = Gauge("komt_running_requests", "Requests decoding in the running batch.")
        self.time_to_first_token = Histogram("komt_time_to_first_token_seconds",
                                             "From request arrival to its first generated token.", LATENCY_BUCKETS)
        self.time_per_token = Histogram("komt_time_per_output_token_seconds",
                                        "Between consecutive generated tokens of one request.", LATENCY_BUCKETS)
        self.decode_batch_size = Histogram("komt_decode_batch_size",
                                           "Requests sampling a token in each step that decodes.", BATCH_BUCKETS)
        self.scheduled_tokens = Histogram("komt_scheduled_tokens", "Tokens (prefill chunks + decode tokens) "
                                          "in each step's forward.", TOKEN_BUCKETS)
        self.preemptions = Counter("komt_preemptions", "Requests taken off the batch for lack of KV blocks "
                                   "(recomputed later).")
        self.kv_blocks_used = Gauge("komt_kv_blocks_used", "KV-cache blocks held by requests.")
        self.kv_blocks_free = Gauge("komt_kv_blocks_free", "KV-cache blocks free (some hold reusable prefixes).")
        self.prefix_cache_queries = Counter("komt_prefix_cache_queries", "Prompt tokens looked up in the prefix "
                                            "cache (each request's first admission).")
        self.prefix_cache_hits = Counter("komt_prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.prefix_cache_hit_rate = Gauge("komt_prefix_cache_hit_rate", "Prefix-cache hits over queries, in tokens.")

    def render(self) -> str:
        """The whole exposition: HELP and TYPE lines, then the samples of each metric."""
        out = []
        for metric in (self.requests, self.finished, self.prompt_tokens, self.generation_tokens, self.queue_depth,
                       self.running, self.time_to_first_token, self.time_per_token, self.decode_batch_size,
                       self.scheduled_tokens, self.preemptions, self.kv_blocks_used, self.kv_blocks_free,
                       self.prefix_cache_queries, self.prefix_cache_hits, self.prefix_cache_hit_rate):
            name = metric.name + ("_total" if metric.kind == "counter" else "")
            out.append(f"# HELP {name} {metric.help}")
            out.append(f"# TYPE {name} {metric.kind}")
            out.extend(metric.samples())
        return "\n".join(out) + "\n"
