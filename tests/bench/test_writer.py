"""The one results writer: no absolute path of the writing machine goes into results/."""

import json
from pathlib import Path

from kvlab.bench.core.writer import portable, write_experiment


def test_portable_names_replace_machine_paths(tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    monkeypatch.setenv("KVLAB_DATA_DIR", str(data_dir))
    home = str(Path.home())
    value = {
        "source": f"gguf (cached at {home}/.cache/kvlab/models/m)",
        "data": [f"local file {data_dir}/pg19/test/1.txt"],
        "cwd": f"{Path.cwd()}/configs/x.yaml",
        "other": f"{home}x/not-home",  # a sibling of the home directory is not the home directory
        "inside": ["file:/srv/tmp/sample.txt", f"file:/data{home}/notes.txt"],  # a known prefix mid-path
        "kept": "VmHWM via /proc/self/clear_refs; 62 GB/s; EleutherAI/pythia-70m; https://example.org/a/b",
    }
    out = portable(value)
    assert out["source"] == "gguf (cached at ~/.cache/kvlab/models/m)"
    assert out["data"] == ["local file $KVLAB_DATA_DIR/pg19/test/1.txt"]
    assert out["cwd"] == "./configs/x.yaml"
    # any other absolute path keeps only its last part (it would not name a file on another machine)
    assert out["other"] == "<path>/not-home"
    assert out["inside"] == ["file:<path>/sample.txt", "file:<path>/notes.txt"]
    assert out["kept"] == value["kept"]


def test_written_experiment_holds_no_absolute_path_of_the_machine(tmp_path, monkeypatch):
    data_dir = tmp_path / "shared-data"
    monkeypatch.setenv("KVLAB_DATA_DIR", str(data_dir))
    home = str(Path.home())
    payload = {
        "command": f"kvlab bench --data-dir {data_dir} --results-dir {tmp_path}/r",
        "model": {"source": f"x (cached at {home}/.cache/kvlab/models/smollm2-135m)"},
        "ppl": {"protocol": f"text from local file {data_dir}/wikitext-2-raw-v1/wiki.test.raw"},
    }
    config = {"data_dir": str(data_dir), "model": f"{home}/models/local"}

    def render(written, plots):
        return f"# {written['command']}\n{written['model']['source']}\n"

    path = write_experiment(tmp_path / "out" / "exp", payload, config, lambda d: [], render)
    for file in path.iterdir():
        text = file.read_text()
        assert home not in text and str(data_dir) not in text, file.name
    written = json.loads((path / "results.json").read_text())
    assert written["model"]["source"] == "x (cached at ~/.cache/kvlab/models/smollm2-135m)"
    assert "$KVLAB_DATA_DIR/wikitext-2-raw-v1" in written["ppl"]["protocol"]


def test_committed_results_hold_no_absolute_machine_path():
    import re

    root = Path(__file__).resolve().parents[2] / "results"
    pattern = re.compile(r"(?<![\w$~.\-/])/(home|root|Users|tmp|work|mnt|data)/")
    offending = [
        str(file.relative_to(root))
        for file in root.rglob("*")
        if file.suffix in (".json", ".md", ".yaml") and pattern.search(file.read_text())
    ]
    assert offending == []


def test_report_compare_shows_the_ppl_on_the_rows_of_the_dtype_it_was_measured_at(tmp_path):
    import json

    from kvlab.bench.report.compare import compare

    run = {"prompt_len": 16, "batch_size": 1, "ttft_s": {"median": 0.1}, "tpot_s": {"median": 0.01}}
    runs = [
        run | {"dtype": dtype, "method": method}
        for dtype in ("float32", "bfloat16")
        for method in ("baseline",)
    ]
    payload = {
        "schema_version": 1,
        "config": {"technique": "static-cache", "experiment_name": "x", "dtypes": ["bfloat16", "float32"]},
        "model": {"name": "tiny-llama"},
        "runs": [r | {"kv_cache_bytes": 1024} for r in runs],
        "ppl": {"ppl": 12.5, "dtype": "bfloat16"},
    }
    (tmp_path / "results.json").write_text(json.dumps(payload))
    rows = {line.split("|")[3].strip(): line for line in compare([tmp_path]).splitlines()[2:]}
    assert rows["bfloat16"].rstrip(" |").endswith("12.50") and not rows["float32"].rstrip(" |").endswith(
        "12.50"
    )
