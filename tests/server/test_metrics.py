"""The metrics' names are an interface (deploy/'s dashboard and autoscaler query them); each app owns
its registry, so apps in one process do not collide; engine-side values are read from EngineStats at
scrape time."""

import prometheus_client
from prometheus_client.parser import text_string_to_metric_families

from kvlab.engine.llm_engine import EngineStats
from kvlab.server.metrics import ServerMetrics

EXPECTED = {
    "kvlab_requests": "counter",
    "kvlab_aborted_requests": "counter",
    "kvlab_time_to_first_token_seconds": "histogram",
    "kvlab_time_per_output_token_seconds": "histogram",
    "kvlab_e2e_request_latency_seconds": "histogram",
    "kvlab_queue_depth": "gauge",
    "kvlab_running_requests": "gauge",
    "kvlab_kv_blocks_used": "gauge",
    "kvlab_kv_blocks_total": "gauge",
    "kvlab_prefix_cache_hit_rate": "gauge",
    "kvlab_generated_tokens": "counter",
    "kvlab_prompt_tokens": "counter",
    "kvlab_preemptions": "counter",
    "kvlab_press_evicted_tokens": "counter",
}


def stats(**values) -> EngineStats:
    base = dict(
        num_running=0,
        num_waiting=0,
        num_used_blocks=0,
        num_blocks=64,
        prefix_cache_hit_rate=0.0,
        num_preemptions=0,
        prompt_tokens_per_s=0.0,
        generation_tokens_per_s=0.0,
    )
    return EngineStats(**(base | values))


def families(metrics: ServerMetrics) -> dict:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def value(family, sample_name: str) -> float:
    (sample,) = [s for s in family.samples if s.name == sample_name]
    return sample.value


def test_names_and_types_are_the_documented_ones():
    found = families(ServerMetrics(stats))
    assert {name: f.type for name, f in found.items() if name in EXPECTED} == EXPECTED


def test_engine_values_are_read_at_scrape_time():
    current = {"stats": stats()}
    metrics = ServerMetrics(lambda: current["stats"])
    current["stats"] = stats(
        num_waiting=3,
        num_running=5,
        num_used_blocks=17,
        prefix_cache_hit_rate=0.25,
        num_preemptions=2,
        num_press_evicted_tokens=40,
        num_prompt_tokens=900,
        num_generated_tokens=1234,
    )
    found = families(metrics)
    assert value(found["kvlab_queue_depth"], "kvlab_queue_depth") == 3
    assert value(found["kvlab_running_requests"], "kvlab_running_requests") == 5
    assert value(found["kvlab_kv_blocks_used"], "kvlab_kv_blocks_used") == 17
    assert value(found["kvlab_kv_blocks_total"], "kvlab_kv_blocks_total") == 64
    assert value(found["kvlab_prefix_cache_hit_rate"], "kvlab_prefix_cache_hit_rate") == 0.25
    assert value(found["kvlab_preemptions"], "kvlab_preemptions_total") == 2
    assert value(found["kvlab_press_evicted_tokens"], "kvlab_press_evicted_tokens_total") == 40
    assert value(found["kvlab_prompt_tokens"], "kvlab_prompt_tokens_total") == 900
    assert value(found["kvlab_generated_tokens"], "kvlab_generated_tokens_total") == 1234


def test_apps_own_their_registries():
    first, second = ServerMetrics(stats), ServerMetrics(stats)  # no "Duplicated timeseries" error
    first.requests.labels("/v1/completions", "200").inc()
    first.aborted.inc()
    assert value(families(first)["kvlab_aborted_requests"], "kvlab_aborted_requests_total") == 1
    assert value(families(second)["kvlab_aborted_requests"], "kvlab_aborted_requests_total") == 0
    assert b"kvlab_" not in prometheus_client.generate_latest(prometheus_client.REGISTRY)
