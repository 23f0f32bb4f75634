"""The kvpress comparison's own arithmetic: recovering kept positions from gathered key rows, and the
agreement measure. (The comparison itself needs the separate kvpress venv: `make kvpress-compare`.)"""

import importlib.util
from pathlib import Path

import pytest
import torch

from kvlab.bench.eval.kvpress_compare import CompareConfig, agreement
from kvlab.errors import ConfigError

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "kvpress" / "capture_kept.py"


def load_capture_script():
    spec = importlib.util.spec_from_file_location("capture_kept", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kept_positions_recovers_the_gathered_rows():
    capture = load_capture_script()
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 3, 40, 8, generator=g)
    chosen = torch.stack([torch.randperm(40, generator=g)[:13] for _ in range(3)])[None]
    kept = keys.gather(2, chosen[..., None].expand(-1, -1, -1, 8))  # what kvpress' compress returns
    assert capture.kept_positions(keys, kept) == [sorted(row.tolist()) for row in chosen[0]]
    kept[0, 1, 4] += 1e-3  # a row that is not in the cache
    with pytest.raises(RuntimeError, match="head 1"):
        capture.kept_positions(keys, kept)


def test_agreement_counts_entries_kept_or_dropped_by_both():
    reference = [[[0, 1, 2], [3, 4, 5]], [[0, 1, 2, 3], [0, 1, 2, 3]]]
    candidate = [[[0, 1, 3], [3, 4, 5]], [[0, 1, 2, 3], [1, 2, 3, 4]]]
    scores = agreement(reference, candidate, n=6)
    # layer 0: {2} vs {3} differ at 2 of 12 entries; layer 1: {0} vs {4} at 2 of 12.
    assert scores["per_layer"] == pytest.approx([10 / 12, 10 / 12])
    assert scores["entry_agreement"] == pytest.approx(10 / 12)
    assert scores["kept_overlap"] == pytest.approx((2 + 3 + 4 + 3) / 14)
    assert scores["layers_with_kvpress_budget"] == 2
    assert agreement(reference, reference, n=6)["entry_agreement"] == 1.0


def test_compare_config_names_a_missing_kvpress_interpreter(tmp_path):
    missing = tmp_path / "no-venv" / "bin" / "python"
    with pytest.raises(ConfigError, match="no kvpress interpreter"):
        CompareConfig(kvpress_python=str(missing)).validate()
    with pytest.raises(ConfigError, match="num_tokens"):
        CompareConfig(num_tokens=65).validate()
