"""`kvlab bench --technique kernels` on tiny-llama: every kernel's products equal a float64 reference,
the report holds one row per rows count and the bars, and a bad config fails before any work."""

import json

import pytest

from kvlab.bench.kernels.config import from_dict, resolve
from kvlab.cli import main
from kvlab.errors import ConfigError
from kvlab.kernels import cpu as cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="needs kvlab's CPU kernels")

ARGS = [
    *("bench", "--technique", "kernels", "--model", "tiny-llama", "--experiment-name", "e2e"),
    *("--set", "rows=[1,3,16]", "--set", "repeats=1"),
    *(
        "--set",
        "attention.num_requests=3",
        "--set",
        "attention.context_len=40",
        "--set",
        "attention.repeats=2",
    ),
]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    assert main([*ARGS, "--results-dir", str(root)]) == 0
    path = root / "kernels" / "e2e"
    return path, json.loads((path / "results.json").read_text())


def test_report_has_a_row_per_rows_count_and_the_bars(experiment):
    path, payload = experiment
    assert {p.name for p in path.iterdir()} == {"report.md", "results.json", "config.yaml"}
    report = (path / "report.md").read_text()
    assert "kvlab bench --technique kernels --model tiny-llama" in report
    for dtype in ("float32", "bfloat16"):
        gemm = payload["gemm"][dtype]
        assert list(gemm["by_rows"]) == ["1", "3", "16"]
        assert gemm["num_matrices"] == 2 * 4 + 1  # two layers of qkv, o, gate_up, down (fused); the LM head
        assert f"## Skinny GEMM, {dtype}" in report
        # the bandwidth is probed before each timed round of the one-row passes (repeats: 1)
        assert len(gemm["probe_rounds"]) == 1 and max(gemm["probe_rounds"][0].values()) > 0
        for entry in gemm["by_rows"].values():
            assert {"torch", "kvlab.models"} <= set(entry["seconds"])
            assert all(len(samples) == 1 and samples[0] > 0 for samples in entry["seconds"].values())
    descriptions = [bar["description"] for bar in payload["bars"]]
    assert "float32: 16 rows / 1 row (what the model runs)" in descriptions
    assert "bfloat16: 1 row / read-bandwidth floor" in descriptions
    assert all(isinstance(bar["met"], bool) and bar["measured"] > 0 for bar in payload["bars"])


def test_every_kernel_computes_the_product(experiment):
    _, payload = experiment
    for dtype, tolerance in (("float32", 1e-5), ("bfloat16", 2e-2)):
        for entry in payload["gemm"][dtype]["by_rows"].values():
            assert max(entry["relative_error"].values()) < tolerance, entry["relative_error"]
        attention = payload["attention"][dtype]
        for backend in ("cpu_paged", "sdpa"):
            assert attention[backend]["max_abs_error"] < tolerance * 10
            assert len(attention[backend]["seconds"]) == 2


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["rows=[2,4]"], "rows must include 1"),
        (["rows=[1,0]"], "positive ints"),
        (["repeats=0"], "repeats must be"),
        (["attention.context_len=0"], "attention.context_len"),
        (["attention.heads=3"], "unknown config key 'attention.heads'"),
        (["warmup=2"], "unknown config key 'warmup'"),
    ],
)
def test_bad_configs_fail_before_any_work(overrides, message):
    with pytest.raises(ConfigError, match=message):
        resolve("small", None, overrides, {})


def test_gpu_device_is_refused():
    with pytest.raises(ConfigError, match="device must be cpu"):
        from_dict({"device": "cuda"}).validate()
