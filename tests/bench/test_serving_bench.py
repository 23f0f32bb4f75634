"""`kvlab bench --technique serving`: streaming clients over HTTP against `kvlab serve` (a subprocess)
on a context-sensitive tiny-llama saved to a directory (conftest's tiny_llama_dir). The report's numbers are consistent with its
own request records, every completed greedy output equals the unloaded run's and the offline engine's,
no KV block is in use afterwards, and /metrics agrees with the clients."""

import json

import pytest

from kvlab.bench.loadgen.client import RequestRecord
from kvlab.bench.loadgen.config import LoadWorkload, from_dict, resolve
from kvlab.bench.loadgen.scrape import Scrape
from kvlab.bench.loadgen.stats import agreement, summarize
from kvlab.bench.loadgen.workload import load_requests, load_token_ids
from kvlab.cli import main
from kvlab.errors import ConfigError, PromptTooLongError

LOAD = [
    *("--set", "load.num_clients=4", "--set", "load.num_requests=8", "--set", "load.abort_fraction=0.25"),
    *("--set", "load.prompt_len_min=8", "--set", "load.prompt_len_max=40"),
    *("--set", "load.output_len_min=6", "--set", "load.output_len_max=16"),
    *("--set", "engine.num_blocks=64", "--set", "engine.max_num_seqs=4"),
]


@pytest.fixture(scope="module")
def experiment(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    args = ["bench", "--technique", "serving", "--model", str(tiny_llama_dir), "--experiment-name", "t"]
    assert main([*args, "--results-dir", str(root), *LOAD]) == 0
    path = root / "serving" / "t"
    return path, json.loads((path / "results.json").read_text())


def test_report_files_and_the_bar(experiment):
    path, payload = experiment
    assert {p.name for p in path.iterdir()} == {"report.md", "results.json", "config.yaml"}
    report = (path / "report.md").read_text()
    assert "kvlab bench --technique serving" in report and "## The bar" in report
    assert payload["machine"]["cores"] > 0 and "Machine:" in report
    [run] = payload["runs"]
    assert (run["label"], run["replicas"]) == ("kvlab serve", 1)
    assert {c["check"] for c in run["checks"]} >= {
        "server errors (status != 200, broken streams)",
        "KV blocks in use after the run",
        "greedy outputs identical to the unloaded run",
        "/metrics counters match the clients' counts",
    }
    assert payload["bar_met"] and "NO (missed)" not in report


def test_numbers_are_consistent_with_the_records(experiment):
    run = experiment[1]["runs"][0]
    records = run["records"]
    assert run["num_requests"] == len(records) == 8
    assert run["completed"] + run["aborted"] + run["errors"] == 8 and run["errors"] == 0
    assert run["aborted"] == 2  # 25% of 8, exactly
    completed = [r for r in records if r["outcome"] == "completed"]
    assert run["output_tokens"] == sum(r["num_tokens"] for r in completed)
    assert run["output_tokens_per_s"] == pytest.approx(run["output_tokens"] / run["wall_s"])
    assert run["requests_per_s"] == pytest.approx(len(completed) / run["wall_s"])
    assert run["wall_s"] >= max(r["end_s"] for r in records) - min(r["start_s"] for r in records)
    requests = experiment[1]["requests"]
    for record in records:
        asked = requests[record["index"]]
        if record["outcome"] == "completed":  # ignore_eos: exactly max_tokens
            assert record["num_tokens"] == asked["max_tokens"] and record["finish_reason"] == "length"
        else:  # left after abort_after chunks, before the end
            assert asked["abort_after"] is not None and record["num_tokens"] == asked["abort_after"]
    for key in ("ttft_s", "tpot_s", "e2e_s"):
        p = run[key]
        assert 0 < p["p50"] <= p["p90"] <= p["p99"]
    assert run["ttft_s"]["p99"] <= run["e2e_s"]["p99"]


def test_outputs_equal_the_unloaded_run_and_the_offline_engine(experiment, tiny_llama_dir):
    from kvlab.engine.request import SamplingParams
    from kvlab.llm import LLM

    payload = experiment[1]
    run, reference = payload["runs"][0], payload["reference"]
    assert run["agreement"]["equal"] and run["agreement"]["identical"] == run["completed"] == 6
    assert run["agreement"]["aborted_compared"] == 2 and not run["agreement"]["aborted_not_a_prefix"]
    assert len(set(reference["texts"])) > 1  # the model's output depends on its prompt
    # The unloaded run over HTTP is itself the engine's greedy output for the same token ids.
    config = from_dict(payload["config"])
    llm = LLM(str(tiny_llama_dir), num_blocks=64)
    requests = load_requests(load_token_ids(config, llm.engine.tokenizer)[0], config.load, config.seed)
    assert [len(r.prompt_ids) for r in requests] == [r["prompt_len"] for r in payload["requests"]]
    params = [SamplingParams(max_tokens=r.max_tokens, ignore_eos=True) for r in requests]
    offline = llm.generate([r.prompt_ids for r in requests], params)
    assert [o.text for o in offline] == reference["texts"]


def test_no_block_in_use_after_and_metrics_match_the_clients(experiment):
    run = experiment[1]["runs"][0]
    assert run["idle_after"]["kv_blocks_used"] == 0 and run["idle_after"]["running_requests"] == 0
    assert run["idle_after"]["kv_blocks_total"] == 64
    counted = run["counters"]
    assert counted["match"], counted
    assert counted["server"]["answered_200"] == counted["client"]["answered_200"] == 8
    before, after = run["metrics"]["before"]["server"], run["metrics"]["after"]["server"]
    names = {sample["name"] for sample in after}
    assert {"kvlab_requests_total", "kvlab_kv_blocks_used", "kvlab_generated_tokens_total"} <= names
    assert len(before) > 0


# Units, no server.


def record(index, outcome, times, text="", tokens=None, start=0.0, end=1.0):
    r = RequestRecord(index, 8, 4, None, start_s=start, token_times_s=times, end_s=end, status=200)
    r.outcome, r.text, r.completion_tokens = outcome, text, tokens
    return r


def test_summary_of_known_records():
    records = [
        record(0, "completed", [0.1, 0.2, 0.3], "abc", tokens=3, end=0.4),
        record(1, "aborted", [0.2], "a"),
        record(2, "error", []),
    ]
    summary = summarize(records, wall_s=2.0)
    assert (summary["completed"], summary["aborted"], summary["errors"]) == (1, 1, 1)
    assert summary["output_tokens"] == 3 and summary["output_tokens_per_s"] == 1.5
    assert summary["ttft_s"]["p50"] == pytest.approx(0.15)  # completed and aborted, not the error
    assert summary["tpot_s"]["p50"] == pytest.approx(0.1) and summary["e2e_s"]["p50"] == pytest.approx(0.4)


def test_agreement_finds_a_different_output_and_an_abort_off_the_reference():
    reference = [record(0, "completed", [0.1], "hello world", 2), record(1, "completed", [0.1], "abc", 2)]
    same = [record(0, "completed", [0.1], "hello world", 2), record(1, "aborted", [0.1], "ab")]
    assert agreement(same, reference)["equal"]
    other = [record(0, "completed", [0.1], "hello there", 2), record(1, "aborted", [0.1], "ax")]
    result = agreement(other, reference)
    assert not result["equal"] and result["differing_requests"] == [0]
    assert result["aborted_not_a_prefix"] == [1]


def test_agreement_with_nothing_compared_is_not_equality():
    # Every request failed: 0 of 0 compared read as "identical", and the report marked the check met.
    reference = [record(0, "completed", [0.1], "hello world", 2)]
    assert not agreement([record(0, "error", [], "")], reference)["equal"]


def test_a_request_longer_than_the_registry_models_context_fails_before_any_server_starts():
    with pytest.raises(PromptTooLongError, match="exceeds tiny-llama's context of 512"):
        resolve("small", None, ["model=tiny-llama", "load.prompt_len_min=500", "load.prompt_len_max=520"], {})


def test_seeded_aborts_are_exact_and_inside_each_request():
    workload = LoadWorkload(num_requests=20, abort_fraction=0.1, output_len_min=2, output_len_max=9)
    requests = load_requests(list(range(5000)), workload, seed=3)
    aborted = [r for r in requests if r.abort_after is not None]
    assert len(aborted) == 2 and all(1 <= r.abort_after < r.max_tokens for r in aborted)
    assert requests == load_requests(list(range(5000)), workload, seed=3)
    assert requests != load_requests(list(range(5000)), workload, seed=4)


def test_scrape_sums_samples_by_label():
    text = (
        "# TYPE kvlab_requests counter\n"
        'kvlab_requests_total{endpoint="/v1/completions",status="200"} 5.0\n'
        'kvlab_requests_total{endpoint="/v1/completions",status="429"} 2.0\n'
        'kvlab_requests_total{endpoint="/metrics",status="200"} 7.0\n'
    )
    scrape = Scrape.parse(text)
    assert scrape.value("kvlab_requests_total", status="200") == 12
    assert scrape.value("kvlab_requests_total", endpoint="/v1/completions") == 7
    assert scrape.value("kvlab_kv_blocks_used") is None


@pytest.mark.parametrize(
    "override, message",
    [
        ("load.abort_fraction=1.0", "abort_fraction"),
        ("load.output_len_min=1", "output_len_min"),
        ("load.num_clients=0", "num_clients"),
        ("load.clients=4", "unknown config key 'load.clients'"),
        ("ray_replicas=[1,1]", "distinct"),
        ("server.port=9000", "server.port"),
        ("server.max_queue=0", "max_queue"),
        ("dtypes=[float32,bfloat16]", "one dtype"),
        ("engine.dtype=float16", "engine.dtype"),
    ],
)
def test_bad_config_fails_before_a_server_starts(override, message):
    with pytest.raises(ConfigError, match=message):
        resolve("small", None, [override], {})
