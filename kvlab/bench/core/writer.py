"""The one results writer: results/<technique>/<experiment>/{results.json, config.yaml, report.md, *.png}.

An existing experiment is never overwritten silently (`claim_experiment_dir` fails before any work),
an interrupted run never leaves half an experiment (files are staged, then swapped in), and no
absolute path of the writing machine goes into a result: the data directory becomes
`$KVLAB_DATA_DIR`, the home directory `~`, the working directory `.` and the temp dir `$TMPDIR`
(`portable`), so results compare across machines and say nothing about who wrote them.
"""

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from kvlab.errors import ConfigError

SCHEMA_VERSION = 1
RESULTS_ROOT = Path("results")
DATA_DIR_ENV = "KVLAB_DATA_DIR"


def machine_prefixes(data_dir: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """(absolute prefix, portable name) pairs of this machine, longest prefix first."""
    pairs = []
    for directory in (data_dir, os.environ.get(DATA_DIR_ENV)):
        if directory:
            pairs.append((str(Path(directory).expanduser().resolve()), f"${DATA_DIR_ENV}"))
            pairs.append((str(Path(directory).expanduser().absolute()), f"${DATA_DIR_ENV}"))
    pairs += [
        (str(Path.cwd()), "."),
        (str(Path.home()), "~"),
        (str(Path(tempfile.gettempdir()).resolve()), "$TMPDIR"),
    ]
    seen, unique = set(), []
    for prefix, name in sorted(pairs, key=lambda pair: -len(pair[0])):
        if prefix not in seen and prefix != "/":
            seen.add(prefix)
            unique.append((prefix, name))
    return unique


# Where a path may start: not inside a word, a name or another path ("GB/s", "org/model", "~/x").
_PATH_START = r"(?<![\w.$~/\\-])"
# An absolute path left after the known prefixes (e.g. --results-dir /srv/runs, file:/data/t.txt); the
# kernel's own files (/proc, /sys, /dev), which reports name as methods, are not the writer's.
_OTHER_ABSOLUTE = re.compile(_PATH_START + r"/(?!(?:proc|sys|dev)/)(?:[\w.+@-]+/)+[\w.+@-]*")


def portable(value: Any, data_dir: str | os.PathLike | None = None) -> Any:
    """`value` (str, or dicts/lists of them) with this machine's absolute paths made portable: the known
    directories by name, any other absolute path cut to `<path>/` and its last part."""
    prefixes = machine_prefixes(data_dir)
    pattern = re.compile("|".join(f"{_PATH_START}{re.escape(prefix)}(?![\\w.-])" for prefix, _ in prefixes))
    names = dict(prefixes)

    def other(match: re.Match) -> str:
        return "<path>/" + match.group(0).rstrip("/").rsplit("/", 1)[-1]

    def convert(item: Any) -> Any:
        if isinstance(item, str):
            return _OTHER_ABSOLUTE.sub(other, pattern.sub(lambda match: names[match.group(0)], item))
        if isinstance(item, dict):
            return {key: convert(v) for key, v in item.items()}
        if isinstance(item, (list, tuple)):
            return [convert(v) for v in item]
        return item

    return convert(value)


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
    interrupted run never leaves half an experiment. plot(dir) -> plot names; render(payload, plots) -> md.
    Paths of this machine in `payload` and `config` are made portable first."""
    data_dir = config.get("data_dir")
    payload, config = portable(payload, data_dir), portable(config, data_dir)
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
