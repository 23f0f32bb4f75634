"""The greedy argmax op (kvlab/kernels/argmax.cpp) picks what torch.max(dim=-1).indices picks: the
first index of each row's largest value, a NaN counting as the largest, on rows whose length is no
multiple of the vector or the block, with ties inside a block, across blocks, in the tail and across
the column ranges the threads split a long row into."""

import pytest
import torch

from kvlab.kernels import cpu as cpu_kernels
from kvlab.sampling import SamplingConfig, sample

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="needs kvlab's CPU kernels")

LENGTHS = [1, 7, 8, 255, 256, 257, 1000, 49152 + 13]


def reference(logits: torch.Tensor) -> torch.Tensor:
    return logits.max(dim=-1).indices


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length", LENGTHS)
def test_random_rows_give_torchs_index(dtype, length):
    logits = torch.randn(5, length, generator=torch.Generator().manual_seed(length)).to(dtype)
    assert torch.equal(cpu_kernels.argmax_rows(logits), reference(logits))


@pytest.mark.parametrize("positions", [(3, 9), (10, 300), (260, 999), (0, 998), (997, 999), (5, 256)])
def test_a_tie_goes_to_the_first_position(positions):
    logits = torch.zeros(1, 1000)
    logits[0, list(positions)] = 4.0
    assert cpu_kernels.argmax_rows(logits).item() == positions[0] == reference(logits).item()


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({5: float("nan"), 700: float("nan"), 3: 1e30}, 5),  # NaN wins over any number, the first one
        ({990: float("nan")}, 990),  # in the tail
        ({400: float("inf"), 401: float("inf")}, 400),
        ({}, 0),  # a row of -inf only
    ],
)
def test_nan_inf_and_empty_rows_as_torch(values, expected):
    logits = torch.full((1, 1000), float("-inf"))
    for position, value in values.items():
        logits[0, position] = value
    assert cpu_kernels.argmax_rows(logits).item() == expected == reference(logits).item()


def test_the_largest_value_in_a_later_block_beats_an_earlier_near_tie():
    logits = torch.zeros(1, 1024)
    logits[0, 10] = 1.0
    logits[0, 700] = 1.0 + 2**-20
    assert cpu_kernels.argmax_rows(logits).item() == 700


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({100: 5.0, 40000: 5.0}, 100),  # a tie across the threads' column ranges: the first
        ({100: 5.0, 40000: 6.0}, 40000),
        ({100: 9.0, 40000: float("nan")}, 40000),  # a NaN in a later range beats any number
        ({30000: float("nan"), 45000: float("nan")}, 30000),
        ({49151: 1.0}, 49151),
    ],
)
def test_long_rows_split_between_threads_agree_with_torch(threads, values, expected):
    torch.set_num_threads(threads)
    logits = torch.zeros(3, 49152)
    for position, value in values.items():
        logits[1, position] = value
    got = cpu_kernels.argmax_rows(logits)
    assert got[1].item() == expected and torch.equal(got, reference(logits))


def test_greedy_sampling_takes_it_on_cpu_and_equals_torch():
    logits = torch.randn(16, 49152, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample(logits, SamplingConfig()), reference(logits))


@pytest.mark.parametrize(
    ("logits", "message"),
    [
        (torch.zeros(8), "contiguous CPU \\(rows, vocab\\)"),
        (torch.zeros(2, 0), "vocab >= 1"),
        (torch.zeros(2, 8, dtype=torch.int32), "float32 or bfloat16"),
    ],
)
def test_bad_input_is_refused(logits, message):
    with pytest.raises(RuntimeError, match=message):
        cpu_kernels.argmax_rows(logits)
