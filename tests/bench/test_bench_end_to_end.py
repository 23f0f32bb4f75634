"""`kvlab bench` end to end on a tiny model: the report files exist and hold what they promise."""

import json
import statistics

import pytest
import torch

from kvlab.bench.core.floor import decode_weight_bytes
from kvlab.bench.generate.runner import agreement, make_inputs
from kvlab.cli import main
from kvlab.models.loader import load_model

ARGS = [
    "bench",
    "--model",
    "tiny-llama",
    "--experiment-name",
    "e2e",
    "--dtypes",
    "float32",
    "--set",
    "prompt_lengths=[16, 32]",
    "--set",
    "new_tokens=6",
    "--set",
    "repeats=2",
    "--set",
    "ppl.max_tokens=256",
    "--set",
    "ppl.max_length=64",
    "--set",
    "ppl.stride=32",
]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    assert main([*ARGS, "--results-dir", str(root)]) == 0
    return root / "static-cache" / "e2e", root


def test_report_files_are_written(experiment):
    path, _ = experiment
    assert {p.name for p in path.iterdir()} >= {
        "report.md",
        "results.json",
        "config.yaml",
        "tpot_vs_prompt.png",
        "memory.png",
    }
    report = (path / "report.md").read_text()
    assert "kvlab bench --model tiny-llama" in report and "meaningless" in report


def test_results_hold_raw_samples_agreement_and_floor(experiment):
    payload = json.loads((experiment[0] / "results.json").read_text())
    assert payload["schema_version"] == 1
    runs = payload["runs"]
    assert {(r["method"], r["prompt_len"]) for r in runs} == {
        (m, n) for m in ("baseline", "optimized") for n in (16, 32)
    }
    for run in runs:
        assert len(run["tpot_s"]["samples"]) == 2 and run["tpot_s"]["min"] <= run["tpot_s"]["median"]
        assert run["kv_cache_bytes"] > 0 and run["tpot_over_floor"] > 0
    assert all(a["identical"] for a in payload["agreement"])  # fp32 greedy must agree
    floor = payload["floors"]["float32"]
    # probed before each timed run: 2 rounds of both methods at both prompt lengths
    assert floor["probe_rounds"] == 8
    assert 0 < floor["bandwidth_bytes_per_s"] <= floor["fastest_probe_bytes_per_s"]
    assert floor["probe"] in floor["probes_bytes_per_s"] and "stream sum" in floor["probes_bytes_per_s"]
    assert all(run["peak_memory_rise_bytes"]["median"] > 0 for run in runs)  # a KV cache was allocated
    assert payload["model_resident_bytes"]["float32"] > 0
    paths = {(r["method"], r["forward_path"]) for r in runs}
    assert paths == {("baseline", "hf"), ("optimized", "native")}  # tiny-llama has a native twin
    assert "engine-native twin" in (experiment[0] / "report.md").read_text()


def test_each_row_is_measured_against_the_weights_and_the_kv_its_steps_read(experiment):
    payload = json.loads((experiment[0] / "results.json").read_text())
    floor = payload["floors"]["float32"]
    for run in payload["runs"]:
        # the timed steps attend prompt + 1 .. prompt + new_tokens - 1 positions: on average prompt + new / 2
        positions = run["prompt_len"] + run["new_tokens"] / 2
        read = floor["weight_bytes_per_token"] + positions * floor["kv_bytes_per_position"]
        # each timed round against its own round's floor: the bytes over that round's best probe
        rounds = run["round_floor_tpot_s"]
        assert len(rounds) == len(run["tpot_s"]["samples"])
        assert all(read / floor["fastest_probe_bytes_per_s"] <= f * (1 + 1e-9) for f in rounds)
        assert run["floor_tpot_s"] == pytest.approx(statistics.median(rounds))
        ratios = [t / f for t, f in zip(run["tpot_s"]["samples"], rounds, strict=True)]
        assert run["tpot_over_floor"] == pytest.approx(statistics.median(ratios))


def test_existing_experiment_is_not_overwritten_silently(experiment, capsys):
    path, root = experiment
    before = (path / "results.json").read_text()
    assert main([*ARGS, "--results-dir", str(root)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (path / "results.json").read_text() == before


def test_report_compare_builds_one_table(experiment, capsys):
    assert main(["report", "compare", str(experiment[0])]) == 0
    out = capsys.readouterr().out
    assert out.count("| static-cache/e2e |") == 4


def test_kv_bytes_of_baseline_and_optimized_are_exact(experiment):
    payload = json.loads((experiment[0] / "results.json").read_text())
    # tiny-llama: 2 layers, 2 kv heads, head_dim 16, fp32; K and V; prompt + all but the last new token
    # (neither path feeds its final token back), batch 1.
    for run in payload["runs"]:
        tokens = run["prompt_len"] + run["new_tokens"] - 1
        assert run["kv_cache_bytes"] == 2 * 2 * 2 * 16 * 4 * tokens


def test_agreement_reports_the_common_prefix():
    a = agreement("bfloat16", 8, [[1, 2, 3, 4], [5, 6, 7, 8]], [[1, 2, 9, 4], [5, 6, 7, 8]])
    assert (a.identical, a.matching_prefix) == (False, 2)


def test_inputs_are_consecutive_windows():
    ids = torch.arange(100)
    assert make_inputs(ids, 2, 10).tolist() == [list(range(10)), list(range(10, 20))]


def test_decode_weight_bytes_counts_tied_embedding_once():
    tied = load_model("tiny-llama").model
    assert decode_weight_bytes(tied) == sum(p.numel() * 4 for p in tied.parameters())
    untied = load_model("tiny-gpt-neox").model
    embed = untied.get_input_embeddings().weight
    expected = sum(p.numel() * 4 for p in untied.parameters()) - embed.numel() * 4 + embed.shape[1] * 4
    assert decode_weight_bytes(untied) == expected


def test_results_hold_no_absolute_path_of_the_machine(experiment):
    import os
    from pathlib import Path

    forbidden = [str(Path.home()), str(Path.cwd())]
    if os.environ.get("KVLAB_DATA_DIR"):
        forbidden.append(str(Path(os.environ["KVLAB_DATA_DIR"]).resolve()))
    for file in experiment[0].iterdir():
        if file.suffix in (".json", ".md", ".yaml"):
            text = file.read_text()
            assert not [p for p in forbidden if p in text], file.name
