import pytest

from kvlab.engine.config import EngineConfig
from kvlab.engine.request import RequestStatus, SamplingParams
from kvlab.errors import ConfigError


def test_defaults_are_valid():
    config = EngineConfig()
    assert config.block_size == 16 and config.pd_policy == "hybrid"
    assert config.resolve_num_blocks(bytes_per_block=1024) == EngineConfig.DEFAULT_NUM_BLOCKS


def test_unknown_key_names_the_key_and_the_valid_keys():
    with pytest.raises(ConfigError, match="'blok_size'.*block_size.*pd_policy"):
        EngineConfig.from_dict({"blok_size": 8})


@pytest.mark.parametrize(
    "values, message",
    [
        ({"block_size": 0}, "block_size"),
        ({"pd_policy": "mixed"}, "strict, time_share, hybrid"),
        ({"num_blocks": 4, "kv_cache_memory_bytes": 10}, "not both"),
        ({"dtype": "int3"}, "dtype"),
        ({"max_model_len": 4096, "enable_chunked_prefill": False}, "chunked"),
        ({"enable_prefix_caching": "yes"}, "true or false"),
    ],
)
def test_bad_values_raise_config_error(values, message):
    with pytest.raises(ConfigError, match=message):
        EngineConfig.from_dict(values)


def test_memory_budget_sets_the_number_of_blocks():
    assert EngineConfig(kv_cache_memory_bytes=10_000).resolve_num_blocks(bytes_per_block=1000) == 10
    with pytest.raises(ConfigError, match="smaller than one block"):
        EngineConfig(kv_cache_memory_bytes=10).resolve_num_blocks(bytes_per_block=1000)


def test_from_yaml_round_trips(tmp_path):
    path = tmp_path / "engine.yaml"
    path.write_text("block_size: 8\nnum_blocks: 32\npd_policy: strict\n")
    config = EngineConfig.from_yaml(path)
    assert (config.block_size, config.num_blocks, config.pd_policy) == (8, 32, "strict")
    assert EngineConfig.from_dict(config.to_dict()) == config
    path.write_text("typo: 1\n")
    with pytest.raises(ConfigError, match="typo"):
        EngineConfig.from_yaml(path)


def test_sampling_params_validate_and_normalise():
    params = SamplingParams(stop=["a", "b"], stop_token_ids=[3])
    assert params.stop == ("a", "b") and params.stop_token_ids == (3,)
    assert SamplingParams(stop="x").stop == ("x",)
    assert SamplingParams().sampling_config.is_greedy
    with pytest.raises(ConfigError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ConfigError, match="max_tokens"):
        SamplingParams(max_tokens=0)


def test_status_finish_reasons():
    assert RequestStatus.FINISHED_LENGTH.finish_reason == "length"
    assert RequestStatus.RUNNING.finish_reason is None and not RequestStatus.PREEMPTED.is_finished
