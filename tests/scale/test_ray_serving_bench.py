"""The serving bench against 1 and 2 Ray Serve replicas (local cluster of 2 CPUs): it reports
throughput for each, both replicas answered, and every run meets the same checks as `kvlab serve`."""

import json

import pytest

from kvlab.cli import main

ray = pytest.importorskip("ray", reason="Ray is an optional dependency (pip install 'kvlab[ray]')")
# Ray Serve's own pydantic models use a keyword pydantic 2 deprecates; nothing of kvlab's.
pytestmark = pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`:DeprecationWarning")

ARGS = [
    *("bench", "--technique", "serving", "--experiment-name", "r"),
    *("--set", "load.num_clients=4", "--set", "load.num_requests=8", "--set", "load.abort_fraction=0.25"),
    *("--set", "load.prompt_len_min=8", "--set", "load.prompt_len_max=32"),
    *("--set", "load.output_len_min=4", "--set", "load.output_len_max=12"),
    *("--set", "engine.num_blocks=64", "--set", "engine.max_num_seqs=4"),
    *("--set", "ray_replicas=[1,2]", "--set", "ray_cpus=2", "--set", "replica_cpus=1"),
]


def test_the_bench_reports_throughput_for_one_and_two_replicas(tiny_llama_dir, tmp_path):
    assert main([*ARGS, "--model", str(tiny_llama_dir), "--results-dir", str(tmp_path)]) == 0
    assert not ray.is_initialized()  # the bench started Ray and shut it down
    payload = json.loads((tmp_path / "serving" / "r" / "results.json").read_text())
    runs = {run["label"]: run for run in payload["runs"]}
    assert list(runs) == ["kvlab serve", "Ray Serve, 1 replica", "Ray Serve, 2 replicas"]
    assert [run["replicas"] for run in runs.values()] == [1, 1, 2]
    for run in runs.values():
        assert run["output_tokens_per_s"] > 0 and run["requests_per_s"] > 0
        assert all(check["met"] for check in run["checks"]), run["checks"]
    assert len(runs["Ray Serve, 2 replicas"]["replicas_seen"]) == 2
    assert len(runs["Ray Serve, 1 replica"]["replicas_seen"]) == 1
    assert runs["Ray Serve, 2 replicas"]["idle_after"]["kv_blocks_total"] == 128  # two pools of 64
    report = (tmp_path / "serving" / "r" / "report.md").read_text()
    assert "## Ray Serve replicas" in report and "| 2 |" in report
