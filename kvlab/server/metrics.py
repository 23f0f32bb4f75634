"""Prometheus metrics of one server, on a registry the app owns (several apps can live in one process).

The names are an interface: the Grafana dashboard and the HorizontalPodAutoscaler in deploy/ query
them. Counted by the server: kvlab_requests_total{endpoint, status} (every answer, refusals included),
kvlab_aborted_requests_total (requests that ended before their output did: a client that left, a drain
that timed out) and the latency histograms (TTFT and TPOT per choice, end-to-end per request that
completed). Mirrored from the engine's `EngineStats` at scrape time, never estimated: queue depth
(waiting engine requests), running requests, KV blocks used / total, prefix-cache hit rate, and the
prompt / generated token, preemption and press-eviction counters.
"""

import time
from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvlab.engine.llm_engine import EngineStats, RequestOutput

# Upper bounds in seconds: CPU decode steps of a few ms up to long prompts queued behind others.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

# name -> (help, EngineStats attribute), exposed as gauges / as counters (with the _total suffix)
ENGINE_GAUGES = {
    "kvlab_queue_depth": ("Engine requests waiting to be scheduled", "num_waiting"),
    "kvlab_running_requests": ("Engine requests running (holding KV blocks)", "num_running"),
    "kvlab_kv_blocks_used": ("KV-cache blocks in use", "num_used_blocks"),
    "kvlab_kv_blocks_total": ("KV-cache blocks in the pool", "num_blocks"),
    "kvlab_prefix_cache_hit_rate": (
        "Fraction of looked-up prompt blocks found in the prefix cache",
        "prefix_cache_hit_rate",
    ),
}
ENGINE_COUNTERS = {
    "kvlab_generated_tokens": ("Tokens sampled by the engine", "num_generated_tokens"),
    "kvlab_prompt_tokens": (
        "Prompt tokens the engine computed (prefix-cache hits excluded, recompute included)",
        "num_prompt_tokens",
    ),
    "kvlab_preemptions": ("Requests preempted for lack of KV blocks", "num_preemptions"),
    "kvlab_press_evicted_tokens": ("Cached tokens dropped by KV presses", "num_press_evicted_tokens"),
}


class EngineStatsCollector(Collector):
    """Reads `stats()` (AsyncLLM.get_stats) once per scrape."""

    def __init__(self, stats: Callable[[], EngineStats]):
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        return self._families(self.stats())

    def describe(self) -> Iterator[Metric]:
        return self._families(None)  # names only: registering must not read the engine

    @staticmethod
    def _families(stats: EngineStats | None) -> Iterator[Metric]:
        for name, (help_text, attribute) in ENGINE_GAUGES.items():
            yield GaugeMetricFamily(name, help_text, value=getattr(stats, attribute) if stats else 0)
        for name, (help_text, attribute) in ENGINE_COUNTERS.items():
            yield CounterMetricFamily(name, help_text, value=getattr(stats, attribute) if stats else 0)


class ServerMetrics:
    def __init__(self, stats: Callable[[], EngineStats]):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "kvlab_requests",
            "HTTP requests answered, by endpoint and status code",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.aborted = Counter(
            "kvlab_aborted_requests",
            "Requests that ended before their output (client gone, drain timeout)",
            registry=self.registry,
        )
        self.ttft = Histogram(
            "kvlab_time_to_first_token_seconds",
            "Arrival to first output token, per choice",
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.tpot = Histogram(
            "kvlab_time_per_output_token_seconds",
            "Mean time between output tokens after the first, per choice",
            buckets=TPOT_BUCKETS,
            registry=self.registry,
        )
        self.e2e = Histogram(
            "kvlab_e2e_request_latency_seconds",
            "Arrival to last output token, per completed request",
            buckets=E2E_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(EngineStatsCollector(stats))

    def render(self) -> tuple[bytes, str]:
        """The text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def trace(self, num_choices: int) -> "RequestTrace":
        return RequestTrace(self, num_choices)


class RequestTrace:
    """One HTTP request's timings, fed its engine outputs as they arrive."""

    __slots__ = ("metrics", "started", "first_token_at", "finished")

    def __init__(self, metrics: ServerMetrics, num_choices: int):
        self.metrics = metrics
        self.started = time.perf_counter()
        self.first_token_at: list[float | None] = [None] * num_choices
        self.finished = False

    def observe(self, index: int, output: RequestOutput) -> None:
        now = time.perf_counter()
        if self.first_token_at[index] is None and output.output_token_ids:
            self.first_token_at[index] = now
            self.metrics.ttft.observe(now - self.started)
        num_tokens = len(output.output_token_ids)
        if output.finished and output.finish_reason != "abort" and num_tokens > 1:
            self.metrics.tpot.observe((now - self.first_token_at[index]) / (num_tokens - 1))

    def finish(self, completed: bool) -> None:
        """Once per request: `completed` when every choice ran to its end, else it counts as aborted."""
        if self.finished:
            return
        self.finished = True
        if completed:
            self.metrics.e2e.observe(time.perf_counter() - self.started)
        else:
            self.metrics.aborted.inc()
