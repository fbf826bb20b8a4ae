"""The hand-written Prometheus exposition of komt.serve.metrics, checked line by line."""

import math
import threading

import pytest

from komt.serve.loadtest import percentile
from komt.serve.metrics import Counter, Gauge, Histogram, ServerMetrics


def test_histogram_buckets_are_cumulative_with_sum_and_count():
    h = Histogram("latency_seconds", "help", buckets=(0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 3.0):
        h.observe(value)
    assert h.samples() == [
        'latency_seconds_bucket{le="0.1"} 2',  # 0.05 and 0.1 (le is inclusive)
        'latency_seconds_bucket{le="1"} 3',
        'latency_seconds_bucket{le="+Inf"} 4',
        "latency_seconds_sum 3.65",
        "latency_seconds_count 4",
    ]


def test_histogram_rejects_unsorted_buckets():
    with pytest.raises(ValueError):
        Histogram("h", "help", buckets=(1.0, 0.5))


def test_counter_labels_are_escaped_and_sorted():
    c = Counter("komt_http_requests", "help", ("path", "status"))
    c.inc("/v1/models", "200")
    c.inc("/v1/models", "200", amount=2)
    c.inc('/a"b\\c', "404")
    assert c.samples() == [
        'komt_http_requests_total{path="/a\\"b\\\\c",status="404"} 1',
        'komt_http_requests_total{path="/v1/models",status="200"} 3',
    ]
    with pytest.raises(ValueError):
        c.inc("/v1/models", "200", amount=-1)
    with pytest.raises(ValueError):
        c.inc("/only-one-label")


def test_counter_is_thread_safe():
    c = Counter("n", "help")
    threads = [threading.Thread(target=lambda: [c.inc() for _ in range(10_000)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert c.value() == 40_000


def test_render_has_help_and_type_for_every_family():
    m = ServerMetrics()
    m.queue_depth.set(3)
    m.time_to_first_token.observe(0.2)
    text = m.render()
    lines = text.splitlines()
    families = [line.split()[2] for line in lines if line.startswith("# TYPE")]
    assert families == [line.split()[2] for line in lines if line.startswith("# HELP")]
    assert {"komt_http_requests_total", "komt_prompt_tokens_total", "komt_generation_tokens_total",
            "komt_queue_depth", "komt_running_requests", "komt_time_to_first_token_seconds",
            "komt_time_per_output_token_seconds", "komt_decode_batch_size", "komt_scheduled_tokens",
            "komt_preemptions_total", "komt_kv_blocks_used", "komt_kv_blocks_free", "komt_prefix_cache_queries_total",
            "komt_prefix_cache_hits_total", "komt_prefix_cache_hit_rate"} <= set(families)
    assert "komt_queue_depth 3" in lines
    assert 'komt_time_to_first_token_seconds_bucket{le="0.25"} 1' in lines
    assert 'komt_time_to_first_token_seconds_bucket{le="0.1"} 0' in lines
    assert text.endswith("\n")
    for line in lines:  # every sample line is "name{labels} number"
        if not line.startswith("#"):
            float(line.rsplit(" ", 1)[1].replace("+Inf", "inf"))


def test_gauge_goes_both_ways():
    g = Gauge("g", "help")
    g.set(5)
    g.set(2)
    assert g.samples() == ["g 2"]


def test_percentile_interpolates_like_numpy_linear():
    values = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert percentile(values, 50) == 3.0
    assert percentile(values, 90) == pytest.approx(4.6)
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 5.0
    assert math.isnan(percentile([], 50))
