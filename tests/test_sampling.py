import pytest
import torch

from kvlab.errors import ConfigError
from kvlab.sampling import SamplingConfig, sample


def test_greedy_is_argmax():
    logits = torch.randn(4, 100)
    assert torch.equal(sample(logits, SamplingConfig()), logits.argmax(-1))


def test_top_k_one_is_argmax_at_any_temperature():
    logits = torch.randn(4, 100)
    config = SamplingConfig(temperature=2.0, top_k=1, seed=0)
    assert torch.equal(sample(logits, config, config.make_generator(torch.device("cpu"))), logits.argmax(-1))


def test_top_p_never_samples_outside_the_nucleus():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p=0.7 keeps exactly the first two tokens.
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().expand(2000, -1)
    config = SamplingConfig(temperature=1.0, top_p=0.7, seed=0)
    drawn = sample(logits, config, config.make_generator(torch.device("cpu")))
    assert set(drawn.tolist()) == {0, 1}
    assert abs((drawn == 0).float().mean().item() - 0.5 / 0.8) < 0.05


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=-1.0),
        dict(temperature=float("nan")),
        dict(temperature=float("inf")),
        dict(temperature="0.5"),
        dict(top_k=-1),
        dict(top_k=2.5),
        dict(top_k=True),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(top_p=float("nan")),
        dict(seed=0.5),
        dict(seed="7"),
    ],
)
def test_invalid_settings_raise(kwargs):
    with pytest.raises(ConfigError):
        SamplingConfig(**kwargs)


def test_a_temperature_near_zero_samples_among_the_maxima():
    # Dividing raw logits by 1e-40 overflowed to inf and gave NaN probabilities (a failed step).
    logits = torch.randn(8, 100) * 10
    config = SamplingConfig(temperature=1e-40, seed=0)
    assert torch.equal(sample(logits, config, config.make_generator(torch.device("cpu"))), logits.argmax(-1))


def test_any_integer_seeds_a_generator():
    # torch takes 64 bits: seeds are reduced modulo 2^64, so 2^64 + 5 draws as 5 does.
    logits = torch.randn(64, 100)

    def draw(seed):
        config = SamplingConfig(temperature=1.0, seed=seed)
        return sample(logits, config, config.make_generator(torch.device("cpu")))

    assert torch.equal(draw(2**64 + 5), draw(5))
    assert torch.equal(draw(-1), draw(2**64 - 1))
