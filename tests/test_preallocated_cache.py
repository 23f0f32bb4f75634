"""kvlab.cache.PreallocatedCache against transformers' DynamicCache (issue 10, defect 9: `crop(n)`
removed n tokens where Hugging Face's `crop(max_length)` keeps max_length)."""

import pytest
import torch
from transformers.cache_utils import DynamicCache

from kvlab.cache import PreallocatedCache

LAYERS, HEADS, DIM, FILLED = 2, 2, 4, 7


def filled_pair():
    generator = torch.Generator().manual_seed(0)
    dynamic, static = DynamicCache(), PreallocatedCache(LAYERS, 16)
    for layer in range(LAYERS):
        keys = torch.randn(1, HEADS, FILLED, DIM, generator=generator)
        values = torch.randn(1, HEADS, FILLED, DIM, generator=generator)
        dynamic.update(keys, values, layer)
        static.update(keys, values, layer)
    return dynamic, static


def assert_same_after_next_token(dynamic, static):
    assert static.get_seq_length() == dynamic.get_seq_length()
    new = torch.full((1, HEADS, 1, DIM), 9.0)
    for layer in range(LAYERS):
        expected_keys, expected_values = dynamic.update(new, new + 1, layer)
        keys, values = static.update(new, new + 1, layer)
        assert torch.equal(keys, expected_keys) and torch.equal(values, expected_values)


@pytest.mark.parametrize("argument", [-1, -3, -FILLED, -FILLED - 2, 0])
def test_crop_matches_dynamic_cache(argument):
    dynamic, static = filled_pair()
    dynamic.crop(argument)
    static.crop(argument)
    assert_same_after_next_token(dynamic, static)


@pytest.mark.parametrize("max_length", [1, 3, FILLED - 1, FILLED, FILLED + 5])
def test_positive_crop_keeps_max_length_tokens(max_length):
    # transformers 5 only takes the negative form (a positive value raises there); HF's historical
    # crop(max_length) kept the first max_length tokens, which is crop(max_length - length).
    dynamic, static = filled_pair()
    if max_length < FILLED:
        dynamic.crop(max_length - FILLED)
    static.crop(max_length)
    assert static.get_seq_length() == min(max_length, FILLED)
    assert_same_after_next_token(dynamic, static)
