import pytest

from kvlab.bench.core.config import parse_overrides
from kvlab.bench.generate.config import from_dict, resolve
from kvlab.errors import ConfigError

TECHNIQUES = ["static-cache"]


def resolve_with(tmp_path, yaml_text=None, overrides=(), **flags):
    path = None
    if yaml_text is not None:
        path = tmp_path / "exp.yaml"
        path.write_text(yaml_text)
    return resolve("static-cache", "small", str(path) if path else None, list(overrides), flags, TECHNIQUES)


def test_shipped_presets_resolve_for_every_batch_level():
    sizes = [
        resolve("static-cache", level, None, [], {}, TECHNIQUES).batch_size
        for level in ("small", "medium", "large")
    ]
    assert sizes == sorted(sizes) and sizes[0] == 1


def test_precedence_defaults_then_yaml_then_set_then_flags(tmp_path):
    config = resolve_with(
        tmp_path, "new_tokens: 40\nrepeats: 5\n", ["new_tokens=50", "ppl.max_tokens=100"], repeats=7
    )
    assert (config.new_tokens, config.repeats, config.ppl.max_tokens) == (50, 7, 100)
    assert config.ppl.stride == 512  # untouched default survives the nested override


def test_set_parses_lists_and_scalars():
    assert parse_overrides(["dtypes=[float32]", "ppl.enabled=false"]) == {
        "dtypes": ["float32"],
        "ppl": {"enabled": False},
    }


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("bogus: 1\n", "unknown config key 'bogus'"),
        ("ppl:\n  nope: 2\n", "unknown config key 'ppl.nope'"),
        ("new_tokens: [1, 2\n", "malformed YAML"),
        ("- a\n- b\n", "must hold a mapping"),
        ("new_tokens: 0\n", "new_tokens must be a positive integer"),
        ("prompt_lengths: [128, -4]\n", "prompt_lengths must be a positive integer"),
        ("dtypes: [float8]\n", "unknown dtype"),
        ("method: fastest\n", "method must be one of"),
        ("ppl:\n  stride: 2048\n", "ppl.stride"),
    ],
)
def test_bad_config_is_rejected_with_the_key_named(tmp_path, yaml_text, message):
    with pytest.raises(ConfigError, match=message):
        resolve_with(tmp_path, yaml_text)


def test_unknown_technique_and_batch_level():
    with pytest.raises(ConfigError, match="unknown technique"):
        resolve("warp-drive", "small", None, [], {}, TECHNIQUES)
    with pytest.raises(ConfigError, match="batch level"):
        resolve("static-cache", "huge", None, [], {}, TECHNIQUES)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        resolve("static-cache", "small", str(tmp_path / "none.yaml"), [], {}, TECHNIQUES)


def test_from_dict_roundtrip():
    config = from_dict({"technique": "static-cache", "prompt_lengths": 64})
    assert config.prompt_lengths == [64]
    assert from_dict(config.to_dict()) == config


def test_forward_path_is_auto_or_hf(tmp_path):
    assert resolve_with(tmp_path, overrides=["forward_path=hf"]).forward_path == "hf"
    with pytest.raises(ConfigError, match="forward_path must be auto or hf"):
        resolve_with(tmp_path, overrides=["forward_path=turbo"])


def _differs(data: dict, defaults: dict, prefix: str = "") -> list[str]:
    """Keys of `data` whose value equals the default (a preset should not repeat them)."""
    same = []
    for key, value in data.items():
        default = defaults.get(key)
        if isinstance(value, dict) and isinstance(default, dict):
            same += _differs(value, default, f"{prefix}{key}.")
        elif value == default:
            same.append(prefix + key)
    return same


def test_shipped_presets_hold_only_what_differs_from_the_defaults():
    import dataclasses

    from kvlab.bench.core.config import BATCH_LEVELS, CONFIG_ROOT, merge, read_yaml
    from kvlab.bench.generate.config import BenchConfig
    from kvlab.bench.generate.registry import TECHNIQUES
    from kvlab.bench.kernels.config import KernelsConfig
    from kvlab.bench.loadgen.config import PRESETS as load_presets
    from kvlab.bench.loadgen.config import LoadBenchConfig
    from kvlab.bench.quant.config import QuantBenchConfig
    from kvlab.bench.serving.config import ServingConfig
    from kvlab.engine.config import EngineConfig

    checked = 0
    for directory in sorted(p for p in CONFIG_ROOT.iterdir() if p.is_dir()):
        if directory.name in ("serve", "cost"):
            continue  # kvlab serve's example serve.yaml and the cost report's prices: not a bench's presets
        for level in BATCH_LEVELS:
            data = read_yaml(directory / f"{level}.yaml")
            if directory.name == "paged":
                defaults = dataclasses.asdict(ServingConfig()) | {
                    "engine": dataclasses.asdict(EngineConfig())
                }
            elif directory.name == "serving":
                defaults = merge(dataclasses.asdict(LoadBenchConfig()), load_presets) | {
                    "engine": dataclasses.asdict(EngineConfig()) | load_presets["engine"]
                }
            elif directory.name == "kernels":
                defaults = dataclasses.asdict(KernelsConfig())
            elif directory.name == "quantization":
                defaults = dataclasses.asdict(QuantBenchConfig())
            else:
                technique = TECHNIQUES[directory.name]
                defaults = merge(dataclasses.asdict(BenchConfig()), technique.presets(level))
            assert _differs(data, defaults) == [], f"{directory.name}/{level}.yaml repeats defaults"
            checked += 1
    assert checked >= 30


def test_press_presets_live_in_code_and_resolve_per_level():
    from kvlab.bench.generate.registry import known_techniques

    known = known_techniques()
    small = resolve("snapkv", "small", None, [], {}, known)
    assert (small.prompt_lengths, small.press, small.ppl.max_length) == (
        [256, 512],
        {"compression_ratio": 0.5},
        512,
    )
    large = resolve("streaming_llm", "large", None, [], {}, known)  # decode-time: the long-context preset
    assert large.press == {"max_cache_tokens": 512} and large.ppl.enabled is False
    assert resolve("snapkv", "large", None, [], {}, known).batch_size == 8
    # a preset's nested section is not shared between resolved configs
    small.press["compression_ratio"] = 0.9
    assert resolve("knorm", "small", None, [], {}, known).press == {"compression_ratio": 0.5}
