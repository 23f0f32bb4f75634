"""The one results writer: results/<technique>/<experiment>/{results.json, config.yaml, report.md, *.png}.

An existing experiment is never overwritten silently (`claim_experiment_dir` fails before any work),
and an interrupted run never leaves half an experiment (files are staged, then swapped in).
"""

import json
import shutil
from pathlib import Path

import yaml

from kvlab.errors import ConfigError

SCHEMA_VERSION = 1
RESULTS_ROOT = Path("results")


def experiment_dir(technique: str, experiment: str, root: Path = RESULTS_ROOT) -> Path:
    return root / technique / experiment


def claim_experiment_dir(path: Path, overwrite: bool) -> None:
    """Fail before any work if results exist and --overwrite was not given."""
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise ConfigError(
            f"{path} already holds results; pass --overwrite or choose another --experiment-name"
        )


def write_experiment(path: Path, payload: dict, config: dict, plot, render) -> Path:
    """Write results.json, config.yaml, plots and report.md beside `path`, then swap them in, so an
    interrupted run never leaves half an experiment. plot(dir) -> plot names; render(payload, plots) -> md."""
    staging = path.with_name(path.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    (staging / "results.json").write_text(json.dumps(payload, indent=1))
    (staging / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    plots = plot(staging)
    (staging / "report.md").write_text(render(payload, plots))
    shutil.rmtree(path, ignore_errors=True)
    staging.rename(path)
    return path


def read_results(path: Path) -> dict:
    """The payload of an experiment dir or its results.json, checked for the schema version."""
    file = path / "results.json" if path.is_dir() else path
    try:
        payload = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"cannot read results from {file}: {error}") from None
    if payload.get("schema_version") != SCHEMA_VERSION:
        raise ConfigError(f"{file}: unsupported schema version {payload.get('schema_version')}")
    return payload
