"""`kvlab bench --technique paged` end to end on tiny-llama with a tiny workload: report files, raw
samples, the bars, and engine greedy outputs equal to Hugging Face's on the same requests."""

import json

import pytest
import torch

from kvlab.bench.serving.config import ServingConfig, from_dict
from kvlab.bench.serving.report import bars
from kvlab.bench.serving.runs import measure_mixed
from kvlab.bench.serving.step_profile import FUSED
from kvlab.bench.serving.workloads import load_token_ids, mixed_requests
from kvlab.cli import main
from kvlab.engine.llm_engine import LLMEngine
from kvlab.errors import ConfigError
from kvlab.models.loader import load_model

ARGS = [
    *("bench", "--technique", "paged", "--model", "tiny-llama", "--experiment-name", "e2e"),
    *("--dtypes", "float32", "bfloat16", "--set", "engine.num_blocks=64", "--set", "engine.max_num_seqs=4"),
    *("--set", "mixed.num_requests=4", "--set", "mixed.prompt_len_max=48", "--set", "mixed.hf_batch_size=2"),
    *("--set", "mixed.output_len_min=4", "--set", "mixed.output_len_max=12", "--set", "mixed.repeats=2"),
    *("--set", "prefix.num_requests=3", "--set", "prefix.prefix_len=64", "--set", "prefix.suffix_len=8"),
    *("--set", "decode.prompt_lens=[16, 24]", "--set", "decode.new_tokens=4"),
    *("--set", "decode.repeats=1", "--set", "decode.warmup=0"),
    *("--set", "compression.num_requests=2", "--set", "compression.prompt_len=24"),
    *("--set", "compression.max_cache_tokens=10", "--set", "compression.output_len=12"),
]


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    assert main([*ARGS, "--results-dir", str(root)]) == 0
    path = root / "paged" / "e2e"
    return path, root, json.loads((path / "results.json").read_text())


def test_report_files_and_bars(experiment):
    path, _, payload = experiment
    plots = {"throughput_and_prefix.png", "decode_tpot.png", "block_usage.png"}
    assert {p.name for p in path.iterdir()} == {"report.md", "results.json", "config.yaml", *plots}
    report = (path / "report.md").read_text()
    assert "kvlab bench --technique paged --model tiny-llama" in report and "## Bars" in report
    assert payload["schema_version"] == 1 and payload["config"]["mixed"]["num_requests"] == 4
    assert [bar["bar"] for bar in payload["bars"]] == [
        "mixed_throughput_ratio",
        "prefix_ttft_ratio",
        "bf16_decode_over_floor",
        "bf16_over_f32_engine_16",
        "bf16_over_f32_engine_24",
    ]
    for bar in payload["bars"]:
        assert bar["measured"] > 0 and ("yes" if bar["met"] else "NO (missed)") in report


def test_raw_samples_and_block_accounting(experiment):
    payload = experiment[2]
    engine, hf = payload["mixed"]["engine"], payload["mixed"]["hf_static"]
    assert len(engine["ttft_s"]) == len(engine["tpot_s"]) == 4
    assert len(engine["wall_s_rounds"]) == len(hf["wall_s_rounds"]) == 2
    assert engine["peak_memory_bytes"] > 0 and hf["peak_memory_bytes"] > 0
    assert (
        all(0 < u <= engine["num_blocks"] for u in engine["used_blocks"][:-1])
        and engine["used_blocks"][-1] == 0
    )
    assert hf["generated_tokens"] >= payload["mixed"]["useful_output_tokens"]
    assert hf["output_tokens_per_s"] > 0 and engine["output_tokens_per_s"] > 0
    prefix = payload["prefix"]
    assert prefix["with_cache"]["hit_rate"] > 0 and prefix["without_cache"]["hit_rate"] == 0
    decode = payload["decode"]["by_prompt"]["16"]["float32"]
    assert (
        set(decode["tpot_s"]) == {"engine", "kvlab.generate", "model.generate"} and decode["floor_tpot_s"] > 0
    )
    # the floor comes from probes taken beside the timed rounds, named; the engine's peak rise over the
    # loaded model is real
    assert decode["probe"] in decode["probes_bytes_per_s"] and decode["probe_rounds"] >= 1
    assert 0 < decode["bandwidth_bytes_per_s"] <= decode["fastest_probe_bytes_per_s"]
    assert (
        payload["model_resident_bytes"] > 0 and engine["peak_memory_bytes"] > payload["model_resident_bytes"]
    )


def test_compression_keeps_blocks_within_the_budget_and_matches_the_hf_press(experiment):
    path, _, payload = experiment
    result = payload["compression"]
    # block_size 16: a 24-token prompt needs 2 blocks in full; under a budget of 10 tokens one block
    # holds each request once its prefill is compacted (the prefill step itself still needs 2).
    assert max(result["full"]["used_blocks"]) > max(result["compressed"]["used_blocks"][1:])
    assert max(result["compressed"]["used_blocks"][1:]) == 2  # two requests, one block each
    assert result["press_name"].startswith("StreamingLLMPress")
    assert "| full cache |" in (path / "report.md").read_text()
    assert result["engine_matches_hf_press"]
    assert "## KV compression inside the engine" in (path / "report.md").read_text()


def test_engine_outputs_equal_hf_greedy_per_request(experiment):
    """Rebuild the run's requests from its saved config, then compare with unpadded HF greedy."""
    payload = experiment[2]
    loaded = load_model("tiny-llama")
    config = from_dict(payload["config"])
    requests = mixed_requests(load_token_ids(config, loaded.tokenizer)[0], config.mixed, config.seed)
    assert [{"prompt_len": len(r.prompt_ids), "output_len": r.output_len} for r in requests] == payload[
        "mixed"
    ]["requests"]
    expected = [hf_greedy(loaded.model, r.prompt_ids, r.output_len) for r in requests]
    assert payload["mixed"]["engine_tokens"] == expected
    agreement = payload["mixed"]["agreement"]
    assert agreement["identical_requests"] == agreement["num_requests"] == 4


def test_mixed_engine_equals_hf_on_a_context_sensitive_model():
    """measure_mixed on tiny-llama redrawn at std 0.3 (context-sensitive greedy), against unpadded HF."""
    loaded = load_model("tiny-llama")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in loaded.model.parameters():
            if parameter.dim() == 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    ids = torch.randint(10, 49000, (400,), generator=generator).tolist()
    config = ServingConfig(engine={"num_blocks": 64, "block_size": 4, "max_num_batched_tokens": 32})
    config.mixed = from_dict(
        {
            "mixed": {
                "num_requests": 3,
                "prompt_len_max": 40,
                "output_len_min": 4,
                "output_len_max": 8,
                "hf_batch_size": 3,
            }
        }
    ).mixed
    requests = mixed_requests(ids, config.mixed, seed=1)
    engine = LLMEngine.from_model(loaded, config.engine_config("float32"))
    result = measure_mixed(loaded, engine, requests, config)
    expected = [hf_greedy(loaded.model, r.prompt_ids, r.output_len) for r in requests]
    assert result["engine_tokens"] == expected
    assert result["agreement"]["identical_requests"] == 3  # left-padded static batches agree too
    assert len({tuple(t) for t in expected}) == 3  # distinct outputs: the comparison has teeth


def test_existing_experiment_is_not_overwritten(experiment, capsys):
    path, root, _ = experiment
    before = (path / "results.json").read_text()
    assert main([*ARGS, "--results-dir", str(root)]) == 2
    assert "--overwrite" in capsys.readouterr().err and (path / "results.json").read_text() == before


@pytest.mark.parametrize(
    "override, message",
    [
        ("mixed.prompt_len_mx=4", "mixed.prompt_len_mx"),
        ("engine.blok_size=4", "blok_size"),
        ("engine.dtype=bfloat16", "top level"),
        ("mixed.output_len_min=1", ">= 2"),
        ("prefix.num_requests=1", "fills the cache"),
        ("method=optimized", "'both'"),
        ("compression.press=h2o", "attention scores"),
        ("compression.press=nope", "nope"),
    ],
)
def test_bad_config_fails_before_any_model_loads(tmp_path, capsys, override, message):
    args = [
        "bench",
        "--technique",
        "paged",
        "--model",
        "no-such-model",
        "--set",
        override,
        "--results-dir",
        str(tmp_path),
    ]
    assert main(args) == 2
    assert message in capsys.readouterr().err and not any(tmp_path.iterdir())


def test_from_dict_rejects_a_section_that_is_not_a_mapping():
    with pytest.raises(ConfigError, match="mixed must be a mapping"):
        from_dict({"mixed": 3})


def test_step_profile_attributes_every_step_at_batch_1_and_at_the_engine_concurrency(experiment):
    path, _, payload = experiment
    profiles = payload["step_profile"]
    assert list(profiles) == ["1", "4"]  # engine.max_num_seqs=4
    for run in profiles.values():
        decode, prefill = run["by_kind"]["decode"], run["by_kind"]["prefill"]
        # decode.new_tokens=4: all requests prefill together (one step), then three decode steps
        assert (prefill["steps"], decode["steps"]) == (1, 3)
        for kind in (decode, prefill):
            # every microsecond of a step in exactly one category
            assert abs(sum(kind["ms_per_step"].values()) - kind["step_ms"]) < 1e-6
        total_ms = decode["step_ms"] * decode["steps"] + prefill["step_ms"] * prefill["steps"]
        assert 0 < total_ms <= run["wall_s"] * 1e3
        assert prefill["ms_per_step"]["attention (backend calls)"] > 0  # a prefill calls the backend
        model_work = decode["ms_per_step"]["GEMMs"] + decode["ms_per_step"][FUSED]
        assert model_work > 0 and decode["ms_per_step"]["sampling"] > 0
    assert "## Engine step profile" in (path / "report.md").read_text()


def synthetic_payload(batch_level: str, identical: int, engine_tok_s: float) -> dict:
    return {
        "config": {"batch_level": batch_level, "dtype": "float32"},
        "mixed": {
            "engine": {"output_tokens_per_s": engine_tok_s},
            "hf_static": {"output_tokens_per_s": 10.0},
            "agreement": {"identical_requests": identical, "num_requests": 64},
        },
        "prefix": {"without_cache": {"ttft_s": [9.0, 4.0, 4.0]}, "with_cache": {"ttft_s": [9.0, 1.0, 1.0]}},
        "decode": {"by_prompt": {}},
    }


@pytest.mark.parametrize(
    "batch_level, identical, engine_tok_s, met",
    [
        ("medium", 64, 35.0, True),
        ("medium", 63, 35.0, False),
        ("medium", 64, 29.0, False),
        ("small", 64, 35.0, None),
    ],
)
def test_the_medium_preset_bar_asks_3x_with_every_greedy_output_equal(
    batch_level, identical, engine_tok_s, met
):
    rows = {row["bar"]: row for row in bars(synthetic_payload(batch_level, identical, engine_tok_s))}
    assert rows["mixed_throughput_ratio"]["measured"] == pytest.approx(engine_tok_s / 10.0)
    if met is None:
        assert "mixed_throughput_ratio_medium" not in rows  # the bar belongs to the medium preset
    else:
        row = rows["mixed_throughput_ratio_medium"]
        assert row["target"] == 3.0 and row["met"] is met and f"({identical} / 64)" in row["description"]


def test_decode_runs_every_prompt_and_dtype_and_pairs_dtypes_by_round(experiment):
    path, _, payload = experiment
    decode = payload["decode"]
    assert decode["prompt_lens"] == [16, 24] and list(decode["by_prompt"]) == ["16", "24"]
    ratios = {(r["prompt_len"], r["path"]): r for r in decode["dtype_ratios"]}
    assert set(ratios) == {(n, p) for n in (16, 24) for p in ("engine", "kvlab.generate", "model.generate")}
    for (prompt_len, name), ratio in ratios.items():
        by_dtype = decode["by_prompt"][str(prompt_len)]
        half, full = by_dtype["bfloat16"]["tpot_s"][name], by_dtype["float32"]["tpot_s"][name]
        assert ratio["round_ratios"] == pytest.approx([h / f for h, f in zip(half, full, strict=True)])
        assert (ratio["dtype"], ratio["reference"]) == ("bfloat16", "float32")
        # each path's runs against the probes around each of them (probed_run), counted when measured again
        floors = by_dtype["bfloat16"]["round_decode_floor_tpot_s"][name]
        assert len(floors) == len(half) and by_dtype["bfloat16"]["remeasured_runs"] >= 0
    assert "TPOT over float32's, per round" in (path / "report.md").read_text()
    assert "Runs measured again: float32, prompt 16" in (path / "report.md").read_text()


def test_decode_prompt_lengths_must_be_a_list_of_positive_lengths():
    assert from_dict({"decode": {"prompt_lens": 64}}).decode.prompt_lens == [64]
    for bad in ([], [128, 0]):
        with pytest.raises(ConfigError, match="decode.prompt_lens"):
            from_dict({"decode": {"prompt_lens": bad}}).validate()


@pytest.mark.parametrize(
    "override",
    ["compression.prompt_len=500", "mixed.prompt_len_max=600"],
    ids=["compression", "mixed"],
)
def test_a_workload_longer_than_the_registry_models_context_fails_before_loading(tmp_path, capsys, override):
    # The compression workload was left out of the check: the engine cut its outputs at the context
    # while its throughput counted the tokens asked for.
    args = ["bench", "--technique", "paged", "--model", "tiny-llama", "--set", override]
    assert main([*args, "--results-dir", str(tmp_path)]) == 2
    assert "exceeds tiny-llama's context of 512" in capsys.readouterr().err and not any(tmp_path.iterdir())
