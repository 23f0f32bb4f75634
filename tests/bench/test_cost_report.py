"""`kvlab report cost`: $ per 1M output tokens = replicas * $/hour / (output tok/s * 3600) * 1e6 and
requests/s per replica, exactly, from the results a bench wrote and a price table the user edits;
bad input gives one line on stderr and exit status 2, and writes nothing."""

import json
from pathlib import Path

import pytest

from kvlab.bench.report.cost import (
    DEFAULT_PRICES,
    READERS,
    load_prices,
    read_runs,
    usd_per_million_tokens,
)
from kvlab.cli import main

REPO = Path(__file__).resolve().parents[2]

PRICES = """\
instances:
  small:
    usd_per_hour: 0.36
    cpus: 2
    notes: test instance
  large:
    usd_per_hour: 1.44
"""


def paged_payload() -> dict:
    """A paged bench result with round numbers: 4 requests, the engine in 2 s at 100 output tok/s,
    HF static batching in 8 s at 25 tok/s (the fields runs.py writes, nothing else)."""
    return {
        "schema_version": 1,
        "machine": {"cpu": "Test CPU", "cores": 2, "torch_threads": 2, "gpu": None},
        "config": {"technique": "paged", "experiment_name": "fixture", "dtype": "float32"},
        "mixed": {
            "requests": [{"prompt_len": 8, "output_len": 50}] * 4,
            "useful_output_tokens": 200,
            "engine": {"wall_s": 2.0, "output_tokens_per_s": 100.0},
            "hf_static": {"wall_s": 8.0, "output_tokens_per_s": 25.0},
        },
    }


def serving_payload() -> dict:
    """The serving bench's shape: one run per replica count."""
    return {
        "schema_version": 1,
        "machine": {"cpu": "Test CPU", "cores": 4},
        "config": {"technique": "serving", "experiment_name": "fixture"},
        "runs": [
            {"label": "1 replica", "replicas": 1, "output_tokens_per_s": 50.0, "requests_per_s": 2.0},
            {"label": "2 replicas", "replicas": 2, "output_tokens_per_s": 90.0, "requests_per_s": 3.6},
        ],
    }


def write_results(directory: Path, payload: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "results.json").write_text(json.dumps(payload))
    return directory


@pytest.fixture
def prices(tmp_path) -> Path:
    path = tmp_path / "prices.yaml"
    path.write_text(PRICES)
    return path


def table_rows(text: str) -> dict[tuple[str, str], list[str]]:
    """(run, instance) -> the row's cells, from the Markdown table."""
    rows = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[0] not in ("run", "---"):
            rows[(cells[0], cells[2])] = cells
    return rows


def test_the_formula():
    # 0.36 $/h at 100 tok/s = 360,000 tokens per hour: 1 $ per 1M tokens.
    assert usd_per_million_tokens(0.36, 100.0) == pytest.approx(1.0)
    assert usd_per_million_tokens(1.44, 25.0) == pytest.approx(16.0)


def test_paged_results_give_exact_costs(tmp_path, prices, capsys):
    results = write_results(tmp_path / "paged" / "fixture", paged_payload())
    assert main(["report", "cost", str(results), "--prices", str(prices)]) == 0
    out = capsys.readouterr().out
    rows = table_rows(out)
    # columns: run | replicas | instance | $/hour | output tok/s | requests/s per replica | $ per 1M
    assert rows[("engine, float32", "small")][1:] == ["1", "small", "0.3600", "100.0", "2.000", "1.000"]
    assert rows[("engine, float32", "large")][3:] == ["1.4400", "100.0", "2.000", "4.000"]
    assert rows[("HF static batching, float32", "small")][3:] == ["0.3600", "25.0", "0.500", "4.000"]
    assert rows[("HF static batching, float32", "large")][3:] == ["1.4400", "25.0", "0.500", "16.000"]
    assert len(rows) == 4
    assert "Test CPU, 2 cores, 2 torch threads" in out
    assert (results / "cost.md").read_text() == out


def test_serving_results_price_every_replica(tmp_path, prices, capsys):
    results = write_results(tmp_path / "serving" / "fixture", serving_payload())
    assert main(["report", "cost", str(results / "results.json"), "--prices", str(prices), "--no-write"]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert rows[("1 replica", "small")][3:] == ["0.3600", "50.0", "2.000", "2.000"]
    # 2 replicas = 2 instances: 0.72 $/h over 90 tok/s = 2.222 $ per 1M; 3.6 req/s over 2 replicas.
    assert rows[("2 replicas", "small")][1:] == ["2", "small", "0.7200", "90.0", "1.800", "2.222"]
    assert rows[("2 replicas", "large")][3:] == ["2.8800", "90.0", "1.800", "8.889"]
    assert not (results / "cost.md").exists()


def test_instance_selects_and_orders(tmp_path, prices, capsys):
    results = write_results(tmp_path / "r", paged_payload())
    assert main(["report", "cost", str(results), "--prices", str(prices), "--instance", "large"]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert {instance for _, instance in rows} == {"large"}


def test_reads_a_real_paged_result():
    """The reader against a file the paged bench wrote (committed under results/)."""
    path = REPO / "results" / "paged" / "sapphire-rapids" / "results.json"
    payload, runs = read_runs(path)
    engine, hf = runs
    assert engine.output_tokens_per_s == payload["mixed"]["engine"]["output_tokens_per_s"]
    assert hf.output_tokens_per_s == payload["mixed"]["hf_static"]["output_tokens_per_s"]
    assert engine.requests_per_s == pytest.approx(
        len(payload["mixed"]["requests"]) / payload["mixed"]["engine"]["wall_s"]
    )
    assert engine.replicas == hf.replicas == 1


def test_the_shipped_price_table_loads():
    instances = load_prices(REPO / DEFAULT_PRICES)
    assert instances and all(instance.usd_per_hour > 0 for instance in instances.values())
    assert "EXAMPLES TO EDIT, NOT QUOTES" in (REPO / DEFAULT_PRICES).read_text()


def test_every_reader_is_keyed_by_a_technique():
    assert set(READERS) == {"paged", "serving"}


def bad_prices(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad-prices.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "prices_text, message",
    [
        ("instances:\n  x: {usd_per_hour: -0.5}\n", "usd_per_hour must be a number > 0, got -0.5"),
        ("instances:\n  x: {usd_per_hour: 0}\n", "usd_per_hour must be a number > 0, got 0"),
        ("instances:\n  x: {usd_per_hour: cheap}\n", "usd_per_hour must be a number > 0"),
        ("instances:\n  x: {usd_per_hour: 1, cpus: 0}\n", "cpus must be an integer >= 1"),
        ("instances:\n  x: {usd_per_hour: 1, region: eu}\n", "unknown key 'region'"),
        ("instances:\n  x: {cpus: 2}\n", "has no usd_per_hour"),
        ("instances:\n  x: 0.3\n", "must be a mapping"),
        ("instances: {}\n", "'instances' must map"),
        ("prices:\n  x: {usd_per_hour: 1}\n", "expected one top-level key 'instances'"),
        ("instances:\n  x: {usd_per_hour: 1\n", "malformed YAML"),
    ],
)
def test_bad_price_tables_fail_with_one_line(tmp_path, capsys, prices_text, message):
    results = write_results(tmp_path / "r", paged_payload())
    path = bad_prices(tmp_path, prices_text)
    assert main(["report", "cost", str(results), "--prices", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvlab: error: ") and err.count("\n") == 1, err
    assert message in err
    assert not (results / "cost.md").exists()


def test_bad_results_fail_with_one_line(tmp_path, prices, capsys):
    static = paged_payload() | {"config": {"technique": "static-cache", "experiment_name": "x"}}
    no_mixed = {key: value for key, value in paged_payload().items() if key != "mixed"}
    serving_missing = serving_payload()
    del serving_missing["runs"][1]["replicas"]
    serving_zero = serving_payload()
    serving_zero["runs"][0]["output_tokens_per_s"] = 0.0
    cases = [
        (tmp_path / "missing", "do not exist"),
        (
            write_results(tmp_path / "static", static),
            "no throughput to price in results of technique 'static-cache'",
        ),
        (write_results(tmp_path / "no-mixed", no_mixed), "no mixed-workload run"),
        (write_results(tmp_path / "s1", serving_missing), "serving run 1 lacks replicas"),
        (write_results(tmp_path / "s2", serving_zero), "output_tokens_per_s must be a number > 0"),
    ]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "results.json").write_text("{not json")
    cases.append((broken, "cannot read results"))
    for path, message in cases:
        assert main(["report", "cost", str(path), "--prices", str(prices)]) == 2, path
        err = capsys.readouterr().err
        assert err.startswith("kvlab: error: ") and err.count("\n") == 1, err
        assert message in err, (path, err)
        assert not (path / "cost.md").exists()


def test_unknown_instance_and_missing_price_table(tmp_path, prices, capsys):
    results = write_results(tmp_path / "r", paged_payload())
    assert main(["report", "cost", str(results), "--prices", str(prices), "--instance", "medium"]) == 2
    assert "unknown instance 'medium'; the price table has small, large" in capsys.readouterr().err
    assert main(["report", "cost", str(results), "--prices", str(tmp_path / "none.yaml")]) == 2
    assert f"price table {tmp_path / 'none.yaml'} does not exist" in capsys.readouterr().err
    assert not (results / "cost.md").exists()
