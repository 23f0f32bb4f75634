"""`kvlab bench --technique quantization` on tiny-llama: every method's row, the kernels' products, the
engine check and issue 12's bars land in the report; the specification's name 量化 is the same
technique; a bad method fails before any model loads."""

import json

import pytest

from kvlab.bench.quant.config import from_dict, resolve
from kvlab.cli import main
from kvlab.errors import ConfigError
from kvlab.kernels import cpu as cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="needs kvlab's CPU kernels")

METHODS = "methods=[float32,bfloat16,int8,int4-g128,int4-g32-asym,kv-int8,bnb-nf4]"
ARGS = [
    *("bench", "--technique", "量化", "--model", "tiny-llama", "--experiment-name", "e2e"),
    *("--set", METHODS, "--set", "repeats=1", "--set", "warmup=0", "--set", "new_tokens=6"),
    *("--set", "prompt_lengths=[24]", "--set", "ppl.max_tokens=200", "--set", "ppl.max_length=64"),
    *("--set", "ppl.stride=32", "--set", "kernel_repeats=1"),
]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    assert main([*ARGS, "--results-dir", str(root)]) == 0
    path = root / "quantization" / "e2e"
    return path, json.loads((path / "results.json").read_text())


def test_every_method_has_a_speed_row_a_ppl_and_its_bytes(experiment):
    path, payload = experiment
    report = (path / "report.md").read_text()
    runs = payload["speed"][0]["runs"]
    assert list(runs) == ["baseline", "float32", "bfloat16", "int8", "int4-g128", "int4-g32-asym", "kv-int8"]
    for name, entry in payload["methods"].items():
        assert entry["ppl"]["ppl"] > 1 and f"| {name} |" in report
    full = payload["methods_baseline_weight_bytes"]
    assert payload["methods"]["float32"]["weight_bytes_per_token"] == full
    assert payload["methods"]["int8"]["weight_bytes_per_token"] < 0.3 * full
    assert (
        payload["methods"]["int4-g128"]["weight_bytes_per_token"]
        < payload["methods"]["int8"]["weight_bytes_per_token"]
    )
    assert all(len(samples) == 1 and samples[0]["tpot_s"] > 0 for samples in runs.values())
    # A step also reads the K/V of the positions it attends: float32 K/V for the weight methods, the
    # quantized cache's codes and scales (fewer bytes) for KV int8.
    kv = {name: entry["kv_bytes_per_position"] for name, entry in payload["methods"].items()}
    assert kv["int8"] == kv["float32"] == payload["methods_baseline_kv_bytes_per_position"] > 0
    assert kv["bfloat16"] == kv["float32"] // 2 and 0 < kv["kv-int8"] < 0.5 * kv["float32"]


def test_bitsandbytes_is_skipped_on_the_cpu_with_one_line(experiment):
    path, payload = experiment
    assert set(payload["skipped"]) == {"bnb-nf4"} and "bnb-nf4" not in payload["methods"]
    assert "Skipped bnb-nf4: bitsandbytes needs CUDA" in (path / "report.md").read_text()


def test_the_engine_decodes_what_kvlab_generate_decodes_on_each_quantized_model(experiment):
    _, payload = experiment
    for name in ("int8", "int4-g128", "int4-g32-asym"):
        assert payload["methods"][name]["engine"] == {
            "checked": True,
            "identical": True,
            "matching_prefix": 6,
        }


def test_the_kernels_compute_the_product(experiment):
    _, payload = experiment
    kernels = payload["kernels"]
    assert set(kernels) == {"int8", "int4-g128", "int4-g32-asym"}
    for entry in kernels.values():
        for name, error in entry["max_relative_error"].items():
            # the integer variant quantizes its inputs to int8 (about 1% of a product); the rest are exact
            assert error < (3e-2 if "vnni" in name or "int4pack" in name else 1e-5), (name, error)
    assert "torch int8pack" in kernels["int8"]["seconds"]


def test_the_bars_of_issue_12_are_in_the_report(experiment):
    path, payload = experiment
    descriptions = {bar["description"] for bar in payload["bars"]}
    assert {
        "int8: TPOT / float32 TPOT",
        "int4-g128: weight bytes / float32's",
        "kv-int8: KV bytes / float32 KV bytes",
    } <= descriptions
    assert "## Bars (issue 12)" in (path / "report.md").read_text()


@pytest.mark.parametrize(
    "override, message",
    [
        ("methods=[int3]", "unknown quantization method"),
        ("methods=[float32,float32]", "repeat"),
        ("dtypes=[bfloat16]", "baseline is float32"),
        ("new_tokens=1", "new_tokens"),
        ("calibration.num_samples=0", "num_samples"),
    ],
)
def test_bad_configs_fail_before_any_model_loads(override, message):
    with pytest.raises(ConfigError, match=message):
        resolve("small", None, [override], {})


def test_unknown_keys_are_refused():
    with pytest.raises(ConfigError):
        from_dict({"methods": ["int8"], "calibraton": {}})
