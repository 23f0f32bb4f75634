"""The generation bench's rounds: every dtype runs in each round, and the dtypes' TPOT ratio pairs the
runs of one round (they meet the same spell of the memory's speed)."""

import statistics

import pytest
import torch

from kvlab.bench.generate import runner
from kvlab.bench.generate.config import BenchConfig, PplConfig

DTYPES = ["float32", "bfloat16"]


@pytest.fixture(scope="module")
def measured():
    """One small run of the tiny model at two dtypes, with the order of its measured calls."""
    config = BenchConfig(
        model="tiny-llama",
        dtypes=DTYPES,
        prompt_lengths=[8, 12],
        new_tokens=4,
        warmup=1,
        repeats=3,
        ppl=PplConfig(enabled=False),
    )
    calls = []
    measure, probe_round = runner.measure, runner.probe_round

    def recording_measure(method, loaded, input_ids, config):
        calls.append((str(loaded.model.dtype).removeprefix("torch."), input_ids.shape[1], method))
        return measure(method, loaded, input_ids, config)

    runner.measure = recording_measure
    runner.probe_round = lambda model: {"stream sum": 2e10}  # the probes' cost is not under test
    try:
        result = runner.run(config, torch.arange(100, 200))
    finally:
        runner.measure, runner.probe_round = measure, probe_round
    return config, result, calls


def test_each_round_runs_every_method_at_every_dtype_back_to_back(measured):
    config, _, calls = measured
    round_calls = [(dtype, method) for method in ("baseline", "optimized") for dtype in DTYPES]
    rounds = config.warmup + config.repeats
    expected = [
        (dtype, prompt_len, method)
        for prompt_len in config.prompt_lengths
        for _ in range(rounds)
        for dtype, method in round_calls
    ]
    assert calls == expected


def test_dtype_ratio_is_the_median_of_same_round_ratios(measured):
    config, result, _ = measured
    runs = {(r.dtype, r.prompt_len, r.method): r for r in result.runs}
    assert len(result.dtype_ratios) == len(config.prompt_lengths) * 2
    for ratio in result.dtype_ratios:
        assert (ratio.dtype, ratio.reference) == ("bfloat16", "float32")
        half = runs["bfloat16", ratio.prompt_len, ratio.method].tpot_s.samples
        full = runs["float32", ratio.prompt_len, ratio.method].tpot_s.samples
        assert len(ratio.round_ratios) == config.repeats
        assert ratio.round_ratios == pytest.approx([h / f for h, f in zip(half, full, strict=True)])
        assert ratio.tpot_ratio == pytest.approx(statistics.median(ratio.round_ratios))


def test_rises_are_taken_over_the_memory_with_every_model_loaded(measured):
    _, result, _ = measured
    assert set(result.model_resident_bytes) == set(DTYPES)
    assert len(set(result.model_resident_bytes.values())) == 1
    for r in result.runs:
        assert r.peak_memory_rise_bytes.samples == [
            max(0.0, peak - result.model_resident_bytes[r.dtype]) for peak in r.peak_memory_bytes.samples
        ]


def test_runs_whose_probes_disagree_are_measured_again_and_counted(monkeypatch):
    """Each timed run sits between two probe rounds; a speed change across it (the probes 2x apart)
    measures it again, and the floor records how many runs were."""
    config = BenchConfig(
        model="tiny-llama",
        dtypes=["float32"],
        prompt_lengths=[8],
        new_tokens=3,
        warmup=0,
        repeats=2,
        method="optimized",
        ppl=PplConfig(enabled=False),
    )
    readings = iter([2e10, 4e10, 4e10, 4e10, 4e10])  # run 1: before 2e10, after 4e10 -> again
    monkeypatch.setattr(runner, "probe_round", lambda model: {"stream sum": next(readings)})
    calls = []
    measure = runner.measure
    monkeypatch.setattr(runner, "measure", lambda *args: calls.append(1) or measure(*args))
    result = runner.run(config, torch.arange(100, 200))
    assert len(calls) == 3 and result.floors["float32"].remeasured_runs == 1
