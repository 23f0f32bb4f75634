"""The paged bench's requests, cut from real text with seeded lengths and offsets."""

import random
from dataclasses import dataclass

from kvlab.bench.serving.config import CompressionWorkload, MixedWorkload, PrefixWorkload, ServingConfig
from kvlab.errors import ConfigError


@dataclass(frozen=True, slots=True)
class BenchRequest:
    prompt_ids: list[int]
    output_len: int


def mixed_requests(token_ids: list[int], workload: MixedWorkload, seed: int) -> list[BenchRequest]:
    """Seeded lengths; prompts are consecutive windows of the text from a seeded offset, so no two
    requests share a prefix by accident."""
    rng = random.Random(seed)
    lengths = [
        (
            rng.randint(workload.prompt_len_min, workload.prompt_len_max),
            rng.randint(workload.output_len_min, workload.output_len_max),
        )
        for _ in range(workload.num_requests)
    ]
    offset = _offset(rng, len(token_ids), sum(p for p, _ in lengths))
    requests = []
    for prompt_len, output_len in lengths:
        requests.append(BenchRequest(token_ids[offset : offset + prompt_len], output_len))
        offset += prompt_len
    return requests


def prefix_requests(token_ids: list[int], workload: PrefixWorkload, seed: int) -> list[BenchRequest]:
    """One shared system prompt (a text window), then each request's own suffix (the next windows)."""
    rng = random.Random(seed + 1)
    total = workload.prefix_len + workload.num_requests * workload.suffix_len
    offset = _offset(rng, len(token_ids), total)
    prefix = token_ids[offset : offset + workload.prefix_len]
    offset += workload.prefix_len
    requests = []
    for i in range(workload.num_requests):
        suffix = token_ids[offset + i * workload.suffix_len : offset + (i + 1) * workload.suffix_len]
        requests.append(BenchRequest(prefix + suffix, workload.output_len))
    return requests


def compression_requests(
    token_ids: list[int], workload: CompressionWorkload, seed: int
) -> list[BenchRequest]:
    """Equal-length prompts from consecutive text windows at a seeded offset."""
    rng = random.Random(seed + 2)
    length = workload.prompt_len
    offset = _offset(rng, len(token_ids), workload.num_requests * length)
    return [
        BenchRequest(token_ids[offset + i * length : offset + (i + 1) * length], workload.output_len)
        for i in range(workload.num_requests)
    ]


def _offset(rng: random.Random, available: int, needed: int) -> int:
    if needed > available:
        raise ConfigError(f"the workload needs {needed} prompt tokens; the dataset has only {available}")
    return rng.randrange(available - needed + 1)


def tokens_needed(config: ServingConfig) -> int:
    mixed, prefix = config.mixed, config.prefix
    return max(
        mixed.num_requests * mixed.prompt_len_max,
        prefix.prefix_len + prefix.num_requests * prefix.suffix_len,
        config.decode.prompt_lens[0] * config.engine_config(config.dtype).max_num_seqs,  # the step profile
        config.compression.num_requests * config.compression.prompt_len,
        max(config.decode.prompt_lens),
    )


def load_token_ids(config: ServingConfig, tokenizer, text=None) -> tuple[list[int], str]:
    """Token ids of the dataset's text (a `datasets.Text`, loaded if not given); only a leading part
    (with margin) is tokenised."""
    from kvlab.bench.core.datasets import load_text
    from kvlab.bench.eval.perplexity import tokenize

    text = text or load_text(config.dataset, split=config.split, data_dir=config.data_dir)
    needed = tokens_needed(config)
    ids, _ = tokenize(tokenizer, text.text[: 16 * needed])
    if ids.numel() < needed:
        ids, _ = tokenize(tokenizer, text.text)
    return ids.tolist(), text.description
