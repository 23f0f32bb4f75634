"""The CLI's contract for bad input: one clear line on stderr, exit status 2, no traceback, nothing written."""

import os
import subprocess
import sys

import pytest

from kvlab.cli import main


def run_cli(*args, env=None):
    full_env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "kvlab.cli", *args], capture_output=True, text=True, env=full_env, timeout=300
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["bench", "--technique", "nope"], "unknown technique"),
        (["bench", "--batch-level", "huge"], "batch level"),
        (["bench", "--set", "frobnicate=1"], "unknown config key"),
        (["bench", "--set", "new_tokens=-3"], "new_tokens must be a positive integer"),
        (["bench", "--set", "prompt_lengths=[0]"], "prompt_lengths must be a positive integer"),
        (["ppl", "--dataset", "imagenet"], "unknown dataset"),
        (["ppl", "--model", "gpt-17"], "unknown model"),
        (["generate", "hi", "--max-tokens", "0"], "--max-tokens must be positive"),
        (
            ["generate", "hi", "--model", "tiny-llama", "--quantization", "int3"],
            "unknown quantization method",
        ),
        (
            ["generate", "hi", "--model", "tiny-llama", "--quantization", "kv-int8"],
            "not a weight quantization",
        ),
        (["bench", "--technique", "quantization", "--set", "methods=[int3]"], "unknown quantization method"),
        (["bench", "--experiment-name", ".."], "experiment name must be"),
        (["bench", "--experiment-name", ".", "--overwrite"], "experiment name must be"),
        (["bench", "--set", "experiment_name=123"], "experiment name must be"),
        (["bench", "--set", "new_tokens=4", "--set", "new_tokens.x=1"], "new_tokens was set to a value"),
        (
            ["bench", "--technique", "snapkv", "--set", "press.options.window=abc"],
            "window must be an integer",
        ),
        (["bench", "--technique", "paged", "--set", "compression.press=[snapkv]"], "unknown press"),
        (["bench", "--set", "seed=abc"], "seed must be an integer"),
        (["bench", "--set", "benchmark_memory=maybe"], "benchmark_memory must be true or false"),
        (["bench", "--set", "ppl.enabled=no thanks"], "ppl.enabled must be true or false"),
        (["bench", "--set", "model=[tiny-llama]"], "model must be a non-empty string"),
        (["bench", "--config", "."], "cannot read config file"),
        (["bench", "--sweep", "new_tokens=[1,2"], "cannot parse"),
        (["bench", "--sweep", "new_tokens=4,4.0,4"], "repeat"),
        (["ppl", "--press", "h2o", "--cache-tokens", "16"], "--press, --cache-tokens need --mode streaming"),
        (
            ["bench", "--technique", "snapkv", "--model", "tiny-llama", "--set", "prompt_lengths=[64]"]
            + ["--sweep", "press.compression_ratio=0.25,0.75"],
            "is too small",  # the second cell's budget: refused before the first cell runs
        ),
    ],
)
def test_bad_input_gives_one_line_and_exit_2(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "results").exists()


def test_generate_runs_a_quantized_model(capsys):
    assert (
        main(["generate", "hi", "--model", "tiny-llama", "--quantization", "int4-g32", "--max-tokens", "3"])
        == 0
    )


def test_malformed_yaml_file(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("dtypes: [float32\n")
    assert main(["bench", "--config", str(bad), "--results-dir", str(tmp_path / "r")]) == 2
    assert "malformed YAML" in capsys.readouterr().err


def test_prompt_longer_than_context(capsys, tmp_path, monkeypatch):
    # A registry model's context is known without loading it: the check comes before any load.
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the prompt lengths were checked")

    monkeypatch.setattr("kvlab.bench.generate.runner.load_model", no_load)
    args = ["bench", "--model", "tiny-llama", "--set", "prompt_lengths=[600]", "--results-dir", str(tmp_path)]
    assert main(args) == 2
    assert "exceeds tiny-llama's context of 512" in capsys.readouterr().err and not any(tmp_path.iterdir())


def test_a_sweep_claims_its_own_folder_before_any_work(capsys, tmp_path):
    sweep = tmp_path / "static-cache" / "default-sweep"
    sweep.mkdir(parents=True)
    (sweep / "sweep.json").write_text("{}")
    args = ["bench", "--model", "tiny-llama", "--set", "prompt_lengths=[16]", "--sweep", "new_tokens=4,8"]
    args += ["--results-dir", str(tmp_path)]
    assert main(args) == 2
    assert "already holds results" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "static-cache").iterdir()) == ["default-sweep"]


def test_missing_data_offline(capsys, tmp_path):
    assert main(["ppl", "--model", "tiny-llama", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "KVLAB_DATA_DIR" in err and "--data-dir" in err


def test_hub_model_offline_names_the_local_options():
    result = run_cli("generate", "hi", "--model", "pythia-70m")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "smollm2-135m" in result.stderr and "pythia-70m-random" in result.stderr


def test_models_lists_the_registry(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ("smollm2-135m", "pythia-70m", "pythia-70m-random"):
        assert name in out
