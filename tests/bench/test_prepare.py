"""A kernel build or calibration never falls inside a measured time: the benches prepare first."""

import torch

from kvlab.bench.core import machine
from kvlab.bench.generate import runner
from kvlab.bench.generate.config import resolve
from kvlab.bench.generate.registry import known_techniques


def test_prepare_kernels_calls_the_kernels_prepare(monkeypatch):
    from kvlab.kernels import cpu as cpu_kernels

    calls = []
    monkeypatch.setattr(cpu_kernels, "prepare", lambda: calls.append("prepare"), raising=False)
    machine.prepare_kernels()
    assert calls == ["prepare"]


def test_the_generation_bench_prepares_before_its_first_measurement(monkeypatch):
    events = []
    monkeypatch.setattr(runner, "prepare_kernels", lambda: events.append("prepare"))
    measure = runner.measure

    def recorded(*args, **kwargs):
        events.append("measure")
        return measure(*args, **kwargs)

    monkeypatch.setattr(runner, "measure", recorded)
    overrides = ["prompt_lengths=[8]", "new_tokens=2", "repeats=1", "warmup=0", "ppl.enabled=false"]
    config = resolve(
        "static-cache",
        "small",
        None,
        overrides,
        {"model": "tiny-llama", "dtypes": ["float32"]},
        known_techniques(),
    )
    result = runner.run(config, torch.arange(100))
    assert events[0] == "prepare" and events.count("prepare") == 1 and "measure" in events
    assert result.runs and result.floors["float32"].probe
