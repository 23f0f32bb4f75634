"""`kvlab bench ... --sweep K=V1,V2 --ray`: each cell a Ray task on a local cluster of 2 CPUs, the same
sweep rows as without Ray, and a kvlab error inside a task reported as the CLI reports it without Ray."""

import json

import pytest

from kvlab.cli import main

ray = pytest.importorskip("ray", reason="Ray is an optional dependency (pip install 'kvlab[ray]')")

ARGS = [
    *("bench", "--technique", "knorm", "--experiment-name", "s", "--model", "tiny-llama"),
    *("--dtypes", "float32", "--set", "prompt_lengths=[48]", "--set", "new_tokens=4"),
    *("--set", "repeats=1", "--set", "warmup=0", "--set", "ppl.max_length=96"),
    *("--set", "ppl.stride=48", "--set", "ppl.max_tokens=192"),
    *("--sweep", "press.compression_ratio=0.25,0.5"),
]
TIMED = {"tpot_ms"}  # the one field of a sweep row that is a timing


@pytest.fixture(scope="module")
def ray_cluster():
    from kvlab.scale.cluster import ray_session

    with ray_session(num_cpus=2):
        yield
    assert not ray.is_initialized()


def sweep_rows(root):
    return json.loads((root / "knorm" / "s-sweep" / "sweep.json").read_text())["rows"]


def test_ray_sweep_gives_the_rows_of_the_sequential_sweep(ray_cluster, tmp_path):
    assert main([*ARGS, "--results-dir", str(tmp_path / "seq")]) == 0
    assert main([*ARGS, "--results-dir", str(tmp_path / "ray"), "--ray"]) == 0
    sequential, on_ray = sweep_rows(tmp_path / "seq"), sweep_rows(tmp_path / "ray")
    assert len(on_ray) == len(sequential) == 4  # 2 values x (baseline, optimized)
    for a, b in zip(sequential, on_ray, strict=True):
        assert {k: v for k, v in a.items() if k not in TIMED | {"press_ppl", "full_ppl"}} == {
            k: v for k, v in b.items() if k not in TIMED | {"press_ppl", "full_ppl"}
        }
        # The same windows, model and press; only the torch thread count (a reduction order) differs.
        assert b["press_ppl"] == pytest.approx(a["press_ppl"], rel=1e-5)
        assert b["full_ppl"] == pytest.approx(a["full_ppl"], rel=1e-5)
        assert b["tpot_ms"] > 0
    for value in ("0.25", "0.5"):
        cell = json.loads((tmp_path / "ray" / "knorm" / f"s-{value}" / "results.json").read_text())
        # Measured inside a Ray task of one CPU: Ray capped its threads at the reservation.
        assert cell["machine"]["torch_threads"] == 1
        assert (tmp_path / "ray" / "knorm" / f"s-{value}" / "report.md").is_file()
    assert (tmp_path / "ray" / "knorm" / "s-sweep" / "sweep.md").is_file()


def test_an_error_inside_a_task_is_the_clis_error(ray_cluster, tmp_path, capsys):
    too_long = [a if a != "prompt_lengths=[48]" else "prompt_lengths=[100000]" for a in ARGS]
    assert main([*too_long, "--results-dir", str(tmp_path), "--ray"]) == 2
    assert "exceeds" in capsys.readouterr().err


def test_ray_needs_a_sweep(tmp_path, capsys):
    args = ["bench", "--technique", "knorm", "--results-dir", str(tmp_path), "--ray"]
    assert main(args) == 2
    assert "--sweep" in capsys.readouterr().err
