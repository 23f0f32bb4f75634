"""`kvlab serve` options: layered defaults < serve.yaml < --set < flags; anything wrong is one line on
stderr and exit status 2, before any model loads."""

import pytest

from kvlab.cli import main
from kvlab.server import launch
from kvlab.server.config import ServerConfig, resolve_config

from .helpers import REPO

EXAMPLE = REPO / "configs" / "serve" / "serve.yaml"


@pytest.fixture
def served(monkeypatch):
    """The ServerConfig `kvlab serve` would run, captured instead of serving."""
    captured = []
    monkeypatch.setattr(launch, "serve", lambda config, log_level="info": captured.append(config))
    return captured


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(config):
        raise AssertionError("a bad option must fail before the model loads")

    monkeypatch.setattr(launch, "load_engine", refuse)


def test_the_example_config_is_valid_and_round_trips():
    config = resolve_config(EXAMPLE, [], {})
    assert config.model == "smollm2-135m" and config.host == "127.0.0.1" and config.engine.num_blocks == 512
    assert ServerConfig.from_dict(config.to_dict()) == config


def test_flags_override_set_which_overrides_yaml(served, tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text(
        "port: 9000\nmax_queue: 7\nengine: {num_blocks: 64, dtype: float32}\npress: {name: knorm, compression_ratio: 0.5}\n"
    )
    args = [
        "serve",
        "--config",
        str(path),
        "--port",
        "9100",
        "--set",
        "engine.num_blocks=32",
        "--set",
        "max_queue=9",
    ]
    assert main([*args, "--dtype", "bfloat16", "--quantization", "int8"]) == 0
    (config,) = served
    assert (config.port, config.max_queue, config.engine.num_blocks) == (9100, 9, 32)
    assert (config.engine.dtype, config.engine.quantization) == ("bfloat16", "int8")
    assert config.press.name == "knorm" and config.press.compression_ratio == 0.5
    assert config.host == "127.0.0.1"  # loopback unless told


def test_press_flag_and_options(served):
    assert (
        main(
            ["serve", "--press", "snapkv", "--set", "press.compression_ratio=0.25", "--set", "press.window=4"]
        )
        == 0
    )
    assert served[0].press.to_dict() == {"name": "snapkv", "compression_ratio": 0.25, "window": 4}
    assert served[0].press.build().compression_ratio == 0.25


MALFORMED = "port: [8000\n"


@pytest.mark.parametrize(
    ("args", "yaml_text", "message"),
    [
        (["--port", "0"], None, "port must be an integer in [1, 65535]"),
        (["--max-queue", "0"], None, "max_queue must be an integer >= 1"),
        (["--drain-timeout-s", "-1"], None, "drain_timeout_s"),
        (["--max-body-bytes", "0"], None, "max_body_bytes"),
        (["--press", "nosuch", "--set", "press.compression_ratio=0.5"], None, "unknown press 'nosuch'"),
        (["--press", "snapkv"], None, "give exactly one of max_cache_tokens or compression_ratio"),
        (["--press", "h2o", "--set", "press.compression_ratio=0.5"], None, "attention scores"),
        (["--set", "engine.num_blocks=0"], None, "num_blocks must be an integer >= 1"),
        (["--set", "engine.nope=1"], None, "unknown engine config key 'nope'"),
        (["--set", "colour=blue"], None, "unknown serve config key 'colour'"),
        (["--set", "port"], None, "--set expects key=value"),
        (["--quantization", "int3"], None, "unknown quantization method"),
        (["--api-key-env", "KVLAB_TEST_UNSET_KEY_VAR"], None, "KVLAB_TEST_UNSET_KEY_VAR, which is not set"),
        ([], MALFORMED, "malformed YAML"),
        ([], "port: 8000\ncolour: blue\n", "unknown serve config key 'colour'"),
        ([], "engine: [1, 2]\n", "engine must be a mapping"),
        ([], "press: snapkv\n", "press must be a mapping with a name"),
        ([], "- just\n- a list\n", "must hold a mapping"),
        (["--config", "/nonexistent/serve.yaml"], None, "does not exist"),
    ],
)
def test_bad_options_give_one_line_and_exit_2(args, yaml_text, message, tmp_path, capsys, no_model_loading):
    if yaml_text is not None:
        path = tmp_path / "serve.yaml"
        path.write_text(yaml_text)
        args = [*args, "--config", str(path)]
    assert main(["serve", "--model", "tiny-llama", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
