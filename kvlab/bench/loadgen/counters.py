"""What the servers' /metrics say about a load run, set against what the clients counted.

Every replica is scraped before and after the run (through Ray's proxy, a scrape lands on any one
replica; the replica header tells which, so scraping repeats, a few scrapes at once, until each has
answered). After the run
the bench waits until no request runs and no KV block is in use, or a timeout passes: the server
learns of a client that left only at its next write, so a short wait is normal, a block still in use
after it is a leak.
"""

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kvlab.bench.loadgen.client import COMPLETIONS, RequestRecord
from kvlab.bench.loadgen.scrape import Scrape, scrape
from kvlab.errors import KvlabError

SERVER = "server"  # the key of the one scrape of a server without a replica header
IDLE_TIMEOUT_S = 30.0
COUNTERS = {  # name in the report -> (metric sample, labels)
    "answered_200": ("kvlab_requests_total", {"endpoint": COMPLETIONS, "status": "200"}),
    "completed": ("kvlab_e2e_request_latency_seconds_count", {}),
    "aborted": ("kvlab_aborted_requests_total", {}),
    "generated_tokens": ("kvlab_generated_tokens_total", {}),
}


def scrape_replicas(url: str, num_replicas: int, replica_header: str | None) -> dict[str, Scrape]:
    """One scrape per replica, keyed by the replica header (SERVER without one)."""
    if replica_header is None:
        return {SERVER: scrape(url)[0]}
    found: dict[str, Scrape] = {}
    # Scrapes go out a few at a time: Ray's router picks the replica with fewer requests in flight, so
    # one scrape after another can land on the same idle replica every time, concurrent ones cannot.
    with ThreadPoolExecutor(max_workers=2 * num_replicas) as pool:
        for _ in range(25):
            for parsed, response in pool.map(lambda _: scrape(url), range(2 * num_replicas)):
                found[response.headers.get(replica_header, SERVER)] = parsed
            if len(found) == num_replicas:
                return found
    raise KvlabError(f"/metrics at {url} reached {len(found)} of {num_replicas} replicas: {sorted(found)}")


def total(scrapes: dict[str, Scrape], name: str, **labels: str) -> float:
    return sum(s.value(name, **labels) or 0.0 for s in scrapes.values())


def wait_idle(url: str, num_replicas: int, replica_header: str | None) -> tuple[dict[str, Scrape], float]:
    """Scrapes once nothing runs and no block is in use (or at IDLE_TIMEOUT_S), and the seconds waited."""
    start = time.monotonic()
    while True:
        scrapes = scrape_replicas(url, num_replicas, replica_header)
        busy = total(scrapes, "kvlab_running_requests") + total(scrapes, "kvlab_kv_blocks_used")
        waited = time.monotonic() - start
        if busy == 0 or waited > IDLE_TIMEOUT_S:
            return scrapes, waited
        time.sleep(0.25)


def compare(
    before: dict[str, Scrape], after: dict[str, Scrape], records: list[RequestRecord]
) -> dict[str, Any]:
    """The server's counts over the run (after - before, summed over replicas) next to the clients'.

    Must be equal: answers with status 200 (every request the clients sent and got 200 for), and
    requests ended (completed + aborted). The split may differ the one way: a client that leaves
    after the server produced its last token (still in flight to the client) is an abort to the
    client, a completion to the server. Generated tokens: at least what completed requests got
    plus what aborted clients read (an aborted request may be a few tokens further on the server)."""
    server = {
        key: total(after, name, **labels) - total(before, name, **labels)
        for key, (name, labels) in COUNTERS.items()
    }
    client = {
        "answered_200": sum(r.status == 200 for r in records),
        "completed": sum(r.outcome == "completed" for r in records),
        "aborted": sum(r.outcome == "aborted" for r in records),
        "generated_tokens": sum(r.num_tokens for r in records if r.outcome in ("completed", "aborted")),
    }
    server = {key: int(value) for key, value in server.items()}
    ended = server["completed"] + server["aborted"] == client["completed"] + client["aborted"]
    checks = {
        "answered_200_equal": server["answered_200"] == client["answered_200"],
        "ended_equal": ended,
        "aborted_at_most_client": server["aborted"] <= client["aborted"],
        "generated_at_least_received": server["generated_tokens"] >= client["generated_tokens"],
    }
    return {"server": server, "client": client, "checks": checks, "match": all(checks.values())}


def idle_state(after: dict[str, Scrape]) -> dict[str, Any]:
    return {
        "kv_blocks_used": int(total(after, "kvlab_kv_blocks_used")),
        "kv_blocks_total": int(total(after, "kvlab_kv_blocks_total")),
        "running_requests": int(total(after, "kvlab_running_requests")),
        "queue_depth": int(total(after, "kvlab_queue_depth")),
    }
