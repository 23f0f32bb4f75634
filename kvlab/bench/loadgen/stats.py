"""A load run's numbers from its request records: counts, throughput and latency percentiles, and
the agreement of its greedy outputs with the unloaded run's.

Definitions (one each): TTFT = first chunk with tokens - send; TPOT = (last token chunk - first) /
(tokens - 1) (kvlab.bench.core.metrics.tpot_between), over completed requests of two or more tokens;
e2e = end of stream - send, over completed requests. Output tokens/s = output tokens of completed
requests / wall time; requests/s = completed requests / wall time. Aborted requests are counted apart:
their tokens are work the server did for nobody.
"""

from typing import Any

from kvlab.bench.core.metrics import tpot_between
from kvlab.bench.loadgen.client import RequestRecord
from kvlab.bench.serving.report import percentiles


def summarize(records: list[RequestRecord], wall_s: float) -> dict[str, Any]:
    completed = [r for r in records if r.outcome == "completed"]
    aborted = [r for r in records if r.outcome == "aborted"]
    errors = [r for r in records if r.outcome == "error"]
    output_tokens = sum(r.num_tokens for r in completed)
    ttft = [r.token_times_s[0] - r.start_s for r in records if r.token_times_s and r.outcome != "error"]
    tpot = [
        tpot_between(r.token_times_s[0], r.token_times_s[-1], r.num_tokens)
        for r in completed
        if r.num_tokens >= 2 and r.token_times_s
    ]
    e2e = [r.end_s - r.start_s for r in completed]
    return {
        "num_requests": len(records),
        "completed": len(completed),
        "aborted": len(aborted),
        "errors": len(errors),
        "error_samples": [{"index": r.index, "status": r.status, "error": r.error} for r in errors[:5]],
        "wall_s": wall_s,
        "output_tokens": output_tokens,
        "aborted_tokens_received": sum(len(r.token_times_s) for r in aborted),
        "output_tokens_per_s": output_tokens / wall_s,
        "requests_per_s": len(completed) / wall_s,
        "ttft_s": _percentiles(ttft),
        "tpot_s": _percentiles(tpot),
        "e2e_s": _percentiles(e2e),
    }


def _percentiles(samples: list[float]) -> dict[str, float] | None:
    return percentiles(samples) if samples else None


def agreement(records: list[RequestRecord], reference: list[RequestRecord]) -> dict[str, Any]:
    """Each completed request's text against the unloaded run's (equal), each aborted request's
    received text against it (a prefix): greedy decoding must not depend on what else is batched."""
    by_index = {r.index: r for r in reference if r.outcome == "completed"}
    compared = [r for r in records if r.outcome == "completed" and r.index in by_index]
    differ = [r.index for r in compared if r.text != by_index[r.index].text]
    partial = [r for r in records if r.outcome == "aborted" and r.index in by_index]
    not_prefix = [r.index for r in partial if not by_index[r.index].text.startswith(r.text)]
    return {
        "compared": len(compared),
        "identical": len(compared) - len(differ),
        "differing_requests": differ,
        "aborted_compared": len(partial),
        "aborted_not_a_prefix": not_prefix,
        "equal": bool(compared)  # nothing compared (every request failed or was aborted) proves nothing
        and not differ
        and not not_prefix
        and len(compared) == sum(r.outcome == "completed" for r in records),
    }
