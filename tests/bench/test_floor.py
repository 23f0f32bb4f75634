"""The floor is the best of several bandwidth probes, names the probe, and a TPOT under it is flagged."""

import dataclasses

import pytest
import torch

from kvlab.bench.core.floor import (
    MAX_RUN_ATTEMPTS,
    Floor,
    decode_weight_bytes,
    kv_bytes_per_position,
    mean_decode_context,
    measure_floor,
    probed_run,
    round_over_floor,
)
from kvlab.bench.report.floor import below_floor_warning, decode_over_floor, floor_lines, over_floor
from kvlab.models.loader import load_model


def test_the_best_probe_sets_the_floor():
    floor = Floor.from_probes(1_000_000, {"torch matvec": 9e9, "stream sum": 30e9, "kvlab skinny": 31e9})
    assert floor.probe == "kvlab skinny" and floor.bandwidth_bytes_per_s == 31e9
    assert floor.tpot_s == pytest.approx(1_000_000 / 31e9)
    assert floor.to_dict()["probes_bytes_per_s"]["torch matvec"] == 9e9


def test_over_probe_rounds_the_floor_takes_the_median_of_each_rounds_best():
    # a quiet spell lifts one round's stream sum to 64 GB/s; the timed runs saw the other rounds' ~36
    rounds = [
        {"stream sum": 36e9, "kvlab skinny": 35e9},
        {"stream sum": 64e9, "kvlab skinny": 37e9},
        {"stream sum": 34e9, "kvlab skinny": 36e9},
    ]
    floor = Floor.from_rounds(1_000_000, rounds)
    assert floor.bandwidth_bytes_per_s == 36e9 and floor.rounds == 3
    assert floor.probe == "stream sum"  # the best in two rounds of three
    assert floor.probes == {"stream sum": 36e9, "kvlab skinny": 36e9}  # each probe's median
    assert floor.fastest_bytes_per_s == 64e9
    assert floor.to_dict()["probe_rounds"] == 3 and floor.to_dict()["fastest_probe_bytes_per_s"] == 64e9
    with pytest.raises(ValueError, match="at least one round"):
        Floor.from_rounds(1_000_000, [])


def test_each_round_is_set_against_its_own_rounds_floor():
    # the second round ran in a fast spell: its time and its floor both fell; medians of each alone
    # (12 / 10) would mix the spells
    times, floors = [12.0, 6.0, 13.0], [10.0, 5.0, 10.0]
    assert round_over_floor(times, floors) == pytest.approx(1.2)
    assert Floor.from_probes(1_000, {"stream sum": 10.0}).at_bandwidth(20.0).tpot_s == pytest.approx(50.0)
    with pytest.raises(ValueError):
        round_over_floor([1.0], [1.0, 2.0])


def test_the_serving_decode_sets_each_round_against_its_own_floor():
    run = {"tpot_s": {"engine": [12.0, 6.0, 13.0]}, "round_decode_floor_tpot_s": [10.0, 5.0, 10.0]}
    assert decode_over_floor(run | {"decode_floor_tpot_s": 10.0}, "engine") == pytest.approx(1.2)
    # results written with one floor: the median TPOT over it
    assert decode_over_floor({"tpot_s": {"engine": [12.0, 6.0, 13.0]}, "floor_tpot_s": 10.0}, "engine") == 1.2


def test_the_floor_counts_the_kv_every_attended_position_costs():
    floor = Floor.from_probes(1_000_000, {"stream sum": 10e9}, kv_bytes_per_position=1_000)
    assert floor.tpot_s == pytest.approx(1e6 / 10e9)  # the weights alone: no position attended
    assert floor.tpot_at(200) == pytest.approx((1e6 + 200 * 1_000) / 10e9)
    assert floor.tpot_at(200, batch=4) == pytest.approx((1e6 + 4 * 200 * 1_000) / 10e9)
    assert floor.to_dict()["kv_bytes_per_position"] == 1_000


def test_mean_decode_context_averages_the_positions_the_timed_steps_attend():
    # prompt 10, 4 new tokens: the three decode steps feed tokens 1..3 and attend 11, 12 and 13 positions
    assert mean_decode_context(10, 4) == pytest.approx((11 + 12 + 13) / 3)


@pytest.mark.parametrize(("name", "dtype"), [("tiny-llama", "float32"), ("tiny-gpt-neox", "bfloat16")])
def test_kv_bytes_per_position_equal_one_cached_token_of_the_engine(name, dtype):
    from kvlab.models.native import build_engine_model

    model = load_model(name, dtype=dtype).model
    assert kv_bytes_per_position(model) == build_engine_model(model).kv_bytes_per_token()


def test_measured_floor_on_a_model_runs_every_probe():
    model = load_model("tiny-llama", dtype="float32").model
    floor = measure_floor(model)
    assert {"stream sum", "stream dot", "torch matvec"} <= set(floor.probes)
    assert floor.bandwidth_bytes_per_s == max(floor.probes.values()) > 0
    assert floor.weight_bytes_per_token == decode_weight_bytes(model)
    assert floor.kv_bytes_per_position == kv_bytes_per_position(model) > 0
    from kvlab.kernels import cpu as cpu_kernels
    from kvlab.models import huge_pages

    assert ("kvlab skinny" in floor.probes) == cpu_kernels.available()
    # where the model's weights sit in huge pages, the stream is also read from them
    assert ("stream dot (2 MiB pages)" in floor.probes) == huge_pages.enabled()


def test_a_tpot_below_the_floor_is_a_measurement_error():
    assert over_floor(1.2) == "1.20x" and "below floor" in over_floor(0.83)
    assert below_floor_warning([("float32 prompt 128 optimized", 1.1)]) == []
    warning = "\n".join(below_floor_warning([("a", 1.1), ("float32 prompt 128 optimized", 0.83)]))
    assert "MEASUREMENT ERROR" in warning and "float32 prompt 128 optimized (0.83x)" in warning
    assert "a (1.10x)" not in warning


def test_floor_section_names_the_probe_that_set_it():
    floor = Floor.from_probes(2**20, {"torch matvec": 9e9, "stream dot": 30e9}).to_dict()
    text = "\n".join(floor_lines({"bfloat16": floor}))
    assert "| stream dot (30.0 GB/s) |" in text and "9.0 |" in text
    assert torch.isclose(torch.tensor(floor["floor_tpot_s"]), torch.tensor(2**20 / 30e9))
    assert "measured again" not in text  # this floor's bench did not probe after its runs
    remeasured = dataclasses.replace(Floor.from_probes(2**20, {"stream dot": 30e9}), remeasured_runs=2)
    assert "Runs measured again: bfloat16 2." in "\n".join(floor_lines({"bfloat16": remeasured.to_dict()}))


def probe_sequence(*bandwidths):
    """A probe that reads the given best bandwidths one call after another."""
    readings = iter(bandwidths)
    return lambda model: {"stream sum": next(readings), "torch matvec": 1e9}


def test_a_run_between_agreeing_probes_is_measured_once():
    runs = []
    probed = probed_run(None, lambda: runs.append(len(runs)) or len(runs), probe_sequence(60e9, 55e9))
    assert (probed.result, probed.attempts, runs) == (1, 1, [0])
    assert probed.probes == {"stream sum": 60e9, "torch matvec": 1e9}  # each probe's better reading


def test_a_run_during_which_the_memory_changed_speed_is_measured_again():
    """Fast before, slow after: neither floor describes the run. The retry's "before" is the failed
    attempt's "after"; the criterion reads the probes, never the run's time."""
    runs = []
    probed = probed_run(None, lambda: runs.append(len(runs)) or len(runs), probe_sequence(60e9, 34e9, 35e9))
    assert (probed.result, probed.attempts) == (2, 2)
    assert probed.probes["stream sum"] == 35e9


def test_a_run_that_never_meets_agreeing_probes_keeps_its_last_attempt():
    flips = [60e9, 34e9] * MAX_RUN_ATTEMPTS
    probed = probed_run(None, lambda: "timed", probe_sequence(*flips))
    assert (probed.result, probed.attempts) == ("timed", MAX_RUN_ATTEMPTS)
