"""`kvlab bench --technique kernels` on tiny-llama: every kernel's products equal a float64 reference,
the report holds one row per rows count and the bars (38295d3's attention op timed beside today's),
and a bad config fails before any work."""

import json
import statistics

import pytest
import torch

from kvlab.bench.core.floor import ProbedRun
from kvlab.bench.kernels import runs
from kvlab.bench.kernels.config import from_dict, resolve
from kvlab.bench.kernels.past_kernel import SOURCE, PastKernelUnavailable, git_show
from kvlab.bench.kernels.report import (
    FUSED_STEP,
    MODEL_PATH,
    arithmetic_peak,
    decode_path,
    rows_floor_seconds,
)
from kvlab.cli import main
from kvlab.errors import ConfigError
from kvlab.kernels import calibrate
from kvlab.kernels import cpu as cpu_kernels
from kvlab.models.loader import resolve_dtype

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="needs kvlab's CPU kernels")


def in_history(revision: str) -> bool:
    """Whether this checkout's git history holds `revision` (a shallow clone or an sdist may not)."""
    try:
        git_show(revision, SOURCE)
    except PastKernelUnavailable:
        return False
    return True


needs_38295d3 = pytest.mark.skipif(
    not in_history("38295d3"), reason="38295d3 is not in this checkout's history"
)

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
        "--set",
        "attention.caches=2",
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
            # the model's matmuls one by one, torch's, and the engine's decode step over the same weights
            assert {"torch", "kvlab.models", FUSED_STEP} <= set(entry["seconds"])
            variant, _, option = entry["fused_step_variant"].partition("/")
            assert variant in cpu_kernels.supported_variants() and option in ("", "nt", "tiles")
            assert all(len(samples) == 1 and samples[0] > 0 for samples in entry["seconds"].values())
        # probed around each one-row round, rounds measured again counted
        assert gemm["remeasured_rounds"] in (0, 1)
        assert "probed before and after each of the 1 timed one-row rounds" in report
        # every variant's multiply-add peak, stated in the report
        assert set(gemm["multiply_add_peak_flops"]) == set(
            calibrate.distinct_variants(resolve_dtype(dtype), cpu_kernels.variants())
        )
        assert all(flops > 0 for flops in gemm["multiply_add_peak_flops"].values())
        assert "Multiply-add peak (each variant's instruction on registers" in report
    descriptions = [bar["description"] for bar in payload["bars"]]
    assert "float32: 16 rows / 1 row (the fused decode step)" in descriptions
    assert "bfloat16: 1 row / read-bandwidth floor (the fused decode step)" in descriptions
    assert "bfloat16: 1 row / read-bandwidth floor (the model's matmuls called one by one)" in descriptions
    assert all(isinstance(bar["met"], bool) and bar["measured"] > 0 for bar in payload["bars"])


@needs_38295d3
def test_every_kernel_computes_the_product(experiment):
    _, payload = experiment
    for dtype, tolerance in (("float32", 1e-5), ("bfloat16", 2e-2)):
        for entry in payload["gemm"][dtype]["by_rows"].values():
            assert max(entry["relative_error"].values()) < tolerance, entry["relative_error"]
        attention = payload["attention"][dtype]
        assert set(attention["max_abs_error"]) == {"cpu_paged", "sdpa", "38295d3"}
        assert max(attention["max_abs_error"].values()) < tolerance * 10
        # the same cache every call, and two caches in turn; every kernel timed in each
        assert list(attention["seconds_by_caches"]) == ["1", "2"]
        for seconds in attention["seconds_by_caches"].values():
            assert set(seconds) == {"cpu_paged", "sdpa", "38295d3"}
            assert all(len(samples) == 2 and min(samples) > 0 for samples in seconds.values())


@needs_38295d3
def test_attention_bars_compare_with_the_past_revision_in_each_cache_state(experiment):
    path, payload = experiment
    attention_bars = [bar for bar in payload["bars"] if "paged attention" in bar["description"]]
    assert [bar["description"] for bar in attention_bars] == [
        f"{dtype}: paged attention 3 x 40 ({state}), 38295d3 / kvlab"
        for dtype in ("float32", "bfloat16")
        for state in ("one cache, every call", "2 caches in turn")
    ]
    seconds = payload["attention"]["float32"]["seconds_by_caches"]["2"]
    expected = statistics.median(seconds["38295d3"]) / statistics.median(seconds["cpu_paged"])
    assert attention_bars[1]["measured"] == pytest.approx(expected)
    assert "| 38295d3 ms | 38295d3 / kvlab |" in (path / "report.md").read_text()


def test_a_revision_that_cannot_be_built_is_reported_not_timed(tmp_path):
    config = ["--set", "attention.past_revision=deadbee", "--set", "dtypes=[float32]", "--set", "rows=[1]"]
    assert main([*ARGS, *config, "--results-dir", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "kernels" / "e2e" / "results.json").read_text())
    attention = payload["attention"]["float32"]
    assert "deadbee" in attention["past_revision_missing"]
    assert set(attention["max_abs_error"]) == {"cpu_paged", "sdpa"}
    assert not [bar for bar in payload["bars"] if "paged attention" in bar["description"]]
    assert "deadbee not timed:" in (tmp_path / "kernels" / "e2e" / "report.md").read_text()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["rows=[2,4]"], "rows must include 1"),
        (["rows=[1,0]"], "positive ints"),
        (["repeats=0"], "repeats must be"),
        (["attention.context_len=0"], "attention.context_len"),
        (["attention.heads=3"], "unknown config key 'attention.heads'"),
        (["attention.caches=0"], "attention.caches"),
        (["attention.past_revision=HEAD~3"], "hexadecimal commit id"),
        (["warmup=2"], "unknown config key 'warmup'"),
    ],
)
def test_bad_configs_fail_before_any_work(overrides, message):
    with pytest.raises(ConfigError, match=message):
        resolve("small", None, overrides, {})


def test_gpu_device_is_refused():
    with pytest.raises(ConfigError, match="device must be cpu"):
        from_dict({"device": "cuda"}).validate()


def test_a_rows_count_floor_is_the_slower_of_reading_the_weights_and_their_arithmetic():
    """1 GB of weights at 50 GB/s: 20 ms; 1e9 parameters at 400 GFLOP/s: 5 ms of arithmetic per row,
    so from 4 rows on the arithmetic sets the floor; a kernel faster than torch's matmul raises the peak."""
    gemm = {
        "weight_bytes": 10**9,
        "params": 10**9,
        "matmul_peak_flops": 400e9,
        "probe_rounds": [{"stream sum": 40e9, "stream sum (2 MiB pages)": 50e9}],
        "by_rows": {"1": {"seconds": {"kvlab.models": [0.025]}}, "16": {"seconds": {"kvlab.models": [0.1]}}},
    }
    assert rows_floor_seconds(gemm, 1) == pytest.approx(0.020)
    assert rows_floor_seconds(gemm, 4) == pytest.approx(0.020)
    assert rows_floor_seconds(gemm, 16) == pytest.approx(0.080)
    assert arithmetic_peak(gemm) == (400e9, "torch's 2048^3 matmul")
    gemm["by_rows"]["32"] = {"seconds": {"kvlab.models": [0.16, 0.12, 0.125]}}  # median 0.125 s: 512 GFLOP/s
    assert arithmetic_peak(gemm) == (pytest.approx(512e9), "kvlab.models at 32 rows")
    assert rows_floor_seconds(gemm, 32) == pytest.approx(0.125)
    # the arithmetic units' own peak (a variant's multiply-add on registers) is above any matmul's
    gemm["multiply_add_peak_flops"] = {"avx2": 300e9, "avx512": 640e9}
    assert arithmetic_peak(gemm) == (640e9, "kvlab avx512's multiply-add on registers")
    assert rows_floor_seconds(gemm, 32) == pytest.approx(0.1)


def test_the_decode_path_is_the_fused_step_where_it_ran_at_every_rows_count():
    timed = {"seconds": {MODEL_PATH: [0.02], FUSED_STEP: [0.018]}}
    assert decode_path({"by_rows": {"1": timed, "16": timed}}) == FUSED_STEP
    # a rows count the step did not run at (or results written before the bench timed it)
    assert decode_path({"by_rows": {"1": timed, "16": {"seconds": {MODEL_PATH: [0.05]}}}}) == MODEL_PATH


def test_the_decode_steps_model_at_another_dtype_holds_its_weights_in_huge_pages(tiny_llama):
    """As a model loaded at that dtype does: the step is timed over weights laid out as in use."""
    from kvlab.bench.kernels.runs import model_at
    from kvlab.models import huge_pages

    assert model_at(tiny_llama.model, tiny_llama.model.dtype) is tiny_llama.model
    copied = model_at(tiny_llama.model, torch.bfloat16)
    assert copied.dtype == torch.bfloat16 and copied is not tiny_llama.model
    if huge_pages.enabled():
        assert all(huge_pages.is_placed(p) for p in copied.parameters())


def test_one_row_rounds_are_probed_around_and_measured_again_when_the_probes_disagree(monkeypatch):
    """time_passes hands each timed round to probed_run (probes before and after, a retry while they
    disagree) and keeps the kept attempt's times, the merged probes of each round and the retry count."""
    calls = []

    def fake_probed_run(model, run):
        calls.append(model)
        attempts = 2 if len(calls) == 1 else 1  # the first round's probes disagreed once
        for _ in range(attempts):
            result = run()
        return ProbedRun(result, {"stream sum": 50e9 + len(calls)}, attempts)

    monkeypatch.setattr(runs, "probed_run", fake_probed_run)
    ran = []
    kernels = {"k": lambda x, w: ran.append(w.shape)}
    weights = [torch.zeros(4, 3), torch.zeros(2, 5)]
    inputs = {3: torch.zeros(1, 3), 5: torch.zeros(1, 5)}
    samples, rounds, remeasured = runs.time_passes(kernels, weights, inputs, 3, probed_model="model")
    assert calls == ["model"] * 3 and remeasured == 1
    assert rounds == [{"stream sum": 50e9 + i} for i in (1, 2, 3)]
    # the warm-up round, 3 rounds, 1 round again; each pass right after an untimed call of its kernel
    assert len(samples["k"]) == 3 and ran == [(4, 3), (4, 3), (2, 5)] * (1 + 4)
    samples, rounds, remeasured = runs.time_passes(kernels, weights, inputs, 2)
    assert len(samples["k"]) == 2 and rounds == [] and remeasured == 0 and len(calls) == 3
