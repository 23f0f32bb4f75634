"""A press as a bench technique: the saving shows in exact KV bytes, quality is measured, sweeps work."""

import json

import pytest

from kvlab.cli import main

ARGS = [
    "--model",
    "tiny-llama",
    "--dtypes",
    "float32",
    "--set",
    "prompt_lengths=[96]",
    "--set",
    "new_tokens=4",
    "--set",
    "repeats=1",
    "--set",
    "warmup=0",
    "--set",
    "ppl.max_length=160",
    "--set",
    "ppl.stride=80",
    "--set",
    "ppl.max_tokens=320",
]


@pytest.mark.parametrize("press", ["streaming_llm", "snapkv"])
def test_press_technique_shrinks_the_cache_and_reports_quality(press, tmp_path):
    args = ["bench", "--technique", press, "--experiment-name", "t", "--results-dir", str(tmp_path), *ARGS]
    assert main([*args, "--set", "press.compression_ratio=0.5"]) == 0
    payload = json.loads((tmp_path / press / "t" / "results.json").read_text())
    runs = {r["method"]: r for r in payload["runs"]}
    assert runs["optimized"]["kv_cache_bytes"] < 0.6 * runs["baseline"]["kv_cache_bytes"]
    # The full cache's floor counts the K/V its steps read; the press keeps fewer, so its floor is the
    # weights' alone (still a floor for it).
    # (each run against the bandwidth probed right before it)
    floor = payload["floors"]["float32"]
    weights, kv = floor["weight_bytes_per_token"], floor["kv_bytes_per_position"]
    for method, read in (("optimized", weights), ("baseline", weights + kv * (96 + 4 / 2))):
        run = runs[method]
        expected = [read / bandwidth for bandwidth in run["round_bandwidth_bytes_per_s"]]
        assert run["round_floor_tpot_s"] == pytest.approx(expected)
    quality = payload["quality"]
    assert quality["press_kv_bytes"] < quality["full_kv_bytes"] and quality["press_ppl"] > 0
    report = (tmp_path / press / "t" / "report.md").read_text()
    assert "Quality under compression" in report
    # both presses run on the native twin, whose K/V the press compresses (no static buffer there)
    assert "with the press compressing each layer's K/V buffer" in report and "static K/V" not in report
    # `kvlab report presses` turns the experiment into one row of the per-method table.
    table = report_presses(tmp_path / press / "t")
    assert table[2].startswith(f"| {press} | 0.5 | ") and f"{quality['press_ppl']:.3f}" in table[2]
    assert "n/a" not in table[2]  # both paths' peaks, absolute and as rise over the loaded model


def report_presses(path):
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["report", "presses", str(path)]) == 0
    return out.getvalue().splitlines()


def test_sweep_writes_one_experiment_per_value_and_a_summary(tmp_path):
    args = ["bench", "--technique", "knorm", "--experiment-name", "s", "--results-dir", str(tmp_path), *ARGS]
    assert main([*args, "--sweep", "press.compression_ratio=0.25,0.5"]) == 0
    assert (tmp_path / "knorm" / "s-0.25" / "results.json").is_file()
    sweep = json.loads((tmp_path / "knorm" / "s-sweep" / "sweep.json").read_text())
    assert sweep["values"] == [0.25, 0.5] and (tmp_path / "knorm" / "s-sweep" / "sweep.png").is_file()


def test_unknown_press_option_fails_before_loading(tmp_path, capsys):
    args = [
        "bench",
        "--technique",
        "snapkv",
        "--results-dir",
        str(tmp_path),
        "--set",
        "press.options={windw: 3}",
    ]
    assert main(args) == 2
    assert "windw" in capsys.readouterr().err


def test_out_of_range_ratio_fails(tmp_path, capsys):
    assert (
        main(
            [
                "bench",
                "--technique",
                "h2o",
                "--results-dir",
                str(tmp_path),
                "--set",
                "press.compression_ratio=1.5",
            ]
        )
        == 2
    )
    assert "compression_ratio" in capsys.readouterr().err
