"""KV-cache compression methods ("presses"); see `kvlab.press.base` for the contract.

`PressCache` (the transformers `Cache` that applies a press) lives in `kvlab.press.hf`; it is not
imported here so that this package never imports transformers.
"""

from kvlab.press.base import Observations, Press, ScorerPress, Selection
from kvlab.press.registry import PRESSES, get_press, list_presses

__all__ = ["PRESSES", "Observations", "Press", "ScorerPress", "Selection", "get_press", "list_presses"]
