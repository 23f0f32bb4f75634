"""Press names -> classes (one line per press), built with strict keyword arguments.

get_press("snapkv", window=64)            -> SnapKVPress(window=64, kernel=5)
get_press("streaming_llm", rerotate=True) -> KeyRerotationPress(StreamingLLMPress(n_sink=4))
get_press("h2o", per_head=True)           -> PerHeadBudgetPress(H2OPress(...))
"""

import dataclasses

from kvlab.errors import ConfigError
from kvlab.press.base import Press
from kvlab.press.h2o import H2OPress
from kvlab.press.knorm import KnormPress
from kvlab.press.pyramidkv import PyramidKVPress
from kvlab.press.random import RandomPress
from kvlab.press.snapkv import SnapKVPress
from kvlab.press.streaming_llm import StreamingLLMPress
from kvlab.press.tova import TOVAPress
from kvlab.press.wrappers import KeyRerotationPress, PerHeadBudgetPress

PRESSES: dict[str, type[Press]] = {
    "streaming_llm": StreamingLLMPress,
    "h2o": H2OPress,
    "snapkv": SnapKVPress,
    "pyramidkv": PyramidKVPress,
    "tova": TOVAPress,
    "knorm": KnormPress,
    "random": RandomPress,
}


def list_presses() -> list[str]:
    return list(PRESSES)


def press_options(name: str) -> dict[str, object]:
    """The options a press takes and their defaults (for `kvlab presses`)."""
    return {f.name: f.default for f in dataclasses.fields(_press_class(name))}


def _press_class(name: str) -> type[Press]:
    if not isinstance(name, str) or name not in PRESSES:
        raise ConfigError(f"unknown press {name!r}; choose one of {', '.join(PRESSES)}")
    return PRESSES[name]


def _check_option(press: str, option: dataclasses.Field, value: object) -> object:
    """`value` for `option`, of the kind its default is (an int where a float is expected becomes one):
    a string where a number belongs failed deep inside the press's own checks, as a TypeError."""
    kinds = {
        bool: ((bool,), "true or false"),
        int: ((int,), "an integer"),
        float: ((int, float), "a number"),
        str: ((str,), "a string"),
    }
    kind = type(option.default)
    if kind not in kinds:
        return value
    accepted, described = kinds[kind]
    if isinstance(value, bool) and kind is not bool or not isinstance(value, accepted):
        raise ConfigError(f"press {press!r}: {option.name} must be {described}, got {value!r}")
    return float(value) if kind is float else value


def get_press(name: str, *, rerotate: bool = False, per_head: bool = False, **options) -> Press:
    """Build a press by name; an unknown option is an error. `rerotate`/`per_head` add the wrappers."""
    cls = _press_class(name)
    if rerotate and per_head:
        # Re-rotation gives a head's kept keys contiguous positions, ranked over its slots; under
        # per-head budgets a head's slots include masked ones, which would take positions between them.
        raise ConfigError(
            "key re-rotation and per-head budgets do not combine; choose one of rerotate, per_head"
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ConfigError(
            f"press {name!r} has no option(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(fields)) or 'none'}"
        )
    options = {key: _check_option(name, fields[key], value) for key, value in options.items()}
    press: Press = cls(**options)
    if per_head:
        press = PerHeadBudgetPress(press)
    if rerotate:
        press = KeyRerotationPress(press)
    return press
