"""End-of-sequence ids: a model may end text with any of several tokens.

`generation_config.eos_token_id` (and `config.eos_token_id`) is an int or a list: chat models list the
end-of-turn token beside the end-of-text one (Llama 3 lists three). Every decoding loop stops on any
of them, so they travel as one normalised tuple.
"""

import numbers
from collections.abc import Iterable

from kvlab.errors import ConfigError


def eos_ids(value: int | Iterable[int] | None) -> tuple[int, ...]:
    """None, an int or an iterable of ints -> a tuple of distinct ids in their first-seen order."""
    if value is None:
        return ()
    if hasattr(value, "tolist"):  # a tensor or numpy array (or scalar) of ids
        value = value.tolist()
    items = [value] if isinstance(value, numbers.Integral) else list(value)
    ids: list[int] = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, numbers.Integral) or item < 0:
            raise ConfigError(f"an EOS token id must be an integer >= 0, got {item!r} (in {value!r})")
        if item not in ids:
            ids.append(int(item))
    return tuple(ids)


def model_eos_ids(model) -> tuple[int, ...]:
    """The EOS ids a Hugging Face model's `generate()` stops on: its generation_config's, else its
    config's (a model loaded from a directory without generation_config.json has only the latter)."""
    generation_config = getattr(model, "generation_config", None)
    value = getattr(generation_config, "eos_token_id", None)
    if value is None:
        value = getattr(getattr(model, "config", None), "eos_token_id", None)
    return eos_ids(value)
