"""One engine step on the model: flatten the scheduled requests, run the forward pass over the paged
KV cache, and sample a token for each request whose step reaches its last known token.

The runner owns the KV cache: per layer (key_cache, value_cache), each
(num_blocks, block_size, num_kv_heads, head_dim), preallocated once; with KV quantization each is
uint8 (num_blocks, block_size, num_kv_heads, row_bytes), read and written by the backend wrapper
of kvlab/quant/paged_kv.py. The engine-native model writes
each new token's K/V at `metadata.slot_mapping` and attends through the attention backend.
"""

import torch

from kvlab.attention.backends.base import AttentionBackend
from kvlab.attention.metadata import AttentionMetadata
from kvlab.engine.compression import QueryRecorder
from kvlab.engine.request import Request, TokenLogprobs
from kvlab.engine.scheduler import SchedulerOutput
from kvlab.models.native import EngineModel
from kvlab.phases import PHASE_FORWARD, PHASE_LOGITS, PHASE_PREPARE, PHASE_SAMPLE, phase
from kvlab.quant import paged_kv
from kvlab.quant.kv_quant import KVQuantSpec
from kvlab.sampling import greedy, sample


class ModelRunner:
    """model: an engine-native model (kvlab.models.native.EngineModel or anything with its call
    contract): `model(input_ids, positions, kv_caches, metadata, backend) -> hidden (T, hidden)`,
    `model.compute_logits(hidden) -> (N, vocab)` and, for decode-only steps, `model.decode_logits(...)`
    (the same arguments as the call) -> (T, vocab)."""

    def __init__(
        self,
        model: EngineModel,
        backend: AttentionBackend,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        kv_quant: KVQuantSpec | None = None,
    ):
        self.model = model
        self.backend = backend
        self.block_size = block_size
        self.device = device
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
        if kv_quant is not None:
            self.kv_caches = paged_kv.allocate(
                kv_quant, num_layers, num_blocks, block_size, num_kv_heads, head_dim, device
            )
        else:
            self.kv_caches = [
                (
                    torch.zeros(shape, dtype=dtype, device=device),
                    torch.zeros(shape, dtype=dtype, device=device),
                )
                for _ in range(num_layers)
            ]
        self.generators: dict[str, torch.Generator | None] = {}
        # request id -> per layer the post-RoPE query chunks of its prompt, for presses that score by
        # attention (see compression.py); taken by the engine once the prefill completes.
        self.recorded_queries: dict[str, list[list[torch.Tensor]]] = {}
        # request id -> the log-probabilities of the token the last `execute` sampled for it, for the
        # requests whose SamplingParams ask for logprobs (the engine appends them to the request).
        self.step_logprobs: dict[str, TokenLogprobs] = {}

    @property
    def kv_cache_bytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.kv_caches)

    def prepare_inputs(self, output: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """-> input_ids (T,) int64, positions (T,) int64 (true positions, for RoPE), metadata."""
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        query_start_loc = [0]
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        size = self.block_size
        for scheduled in output.scheduled:
            n = scheduled.num_new_tokens
            input_ids.extend(scheduled.token_ids)
            positions.extend(range(scheduled.start, scheduled.start + n))
            # Cache slots differ from positions once a press compacted the request (see request.py).
            table = scheduled.block_ids
            slot_mapping.extend(
                table[s // size] * size + s % size
                for s in range(scheduled.start_slot, scheduled.start_slot + n)
            )
            query_start_loc.append(query_start_loc[-1] + n)
            seq_lens.append(scheduled.seq_len)
            tables.append(table[: -(-seq_lens[-1] // size)])
        width = max(len(t) for t in tables)
        device = self.device
        metadata = AttentionMetadata(
            query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            block_tables=torch.tensor(
                [t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=device
            ),
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.int64, device=device),
            max_query_len=max(s.num_new_tokens for s in output.scheduled),
            max_seq_len=max(seq_lens),
            block_size=size,
        )
        ids = torch.tensor(input_ids, dtype=torch.long, device=device)
        return ids, torch.tensor(positions, dtype=torch.long, device=device), metadata

    @torch.inference_mode()
    def execute(self, output: SchedulerOutput) -> dict[str, int]:
        """Run one step; returns the sampled token of each request with `samples` set (and fills
        `step_logprobs` for those that ask for logprobs)."""
        self.step_logprobs = {}
        if output.is_empty:
            return {}
        for request_id in output.preempted_request_ids:  # recomputed from scratch: its chunks restart
            self.recorded_queries.pop(request_id, None)
        with phase(PHASE_PREPARE):
            input_ids, positions, metadata = self.prepare_inputs(output)
            backend = self._backend_for(output)
        rows = [i for i, s in enumerate(output.scheduled) if s.samples]
        if metadata.is_decode_only and len(rows) == len(output.scheduled):
            # Every row is one token that samples: the model may run its LM head inside the forward.
            with phase(PHASE_FORWARD):
                logits = self.model.decode_logits(input_ids, positions, self.kv_caches, metadata, backend)
        else:
            with phase(PHASE_FORWARD):
                hidden = self.model(input_ids, positions, self.kv_caches, metadata, backend)
            if not rows:
                return {}
            with phase(PHASE_LOGITS):
                logits = self.model.compute_logits(hidden[(metadata.query_start_loc[1:] - 1)[rows]])
        with phase(PHASE_SAMPLE):
            requests = [output.scheduled[i].request for i in rows]
            tokens = self.sample(logits, requests)
            self.step_logprobs = token_logprobs(logits, tokens, requests)
            return {r.request_id: t for r, t in zip(requests, tokens.tolist(), strict=True)}

    def _backend_for(self, output: SchedulerOutput) -> AttentionBackend:
        """The backend, wrapped to record queries when a prefill in this step belongs to a request whose
        press scores tokens by attention."""
        rows, start = {}, 0
        for scheduled in output.scheduled:
            if scheduled.is_prefill and scheduled.request.observes_prefill_queries:
                rows[scheduled.request.request_id] = (start, start + scheduled.num_new_tokens)
            start += scheduled.num_new_tokens
        if not rows:
            return self.backend
        return QueryRecorder(self.backend, self.kv_caches, rows, self.recorded_queries)

    def sample(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """logits (N, vocab) -> (N,) token ids; greedy rows in one argmax, others with their own seeds."""
        tokens = greedy(logits)
        for i, request in enumerate(requests):
            config = request.sampling_params.sampling_config
            if config.is_greedy:
                continue
            if request.request_id not in self.generators:
                self.generators[request.request_id] = config.make_generator(logits.device)
            tokens[i] = sample(logits[i : i + 1], config, self.generators[request.request_id])[0]
        return tokens

    def release(self, request_id: str) -> None:
        """Forget a finished request's sampling state and recorded queries."""
        self.generators.pop(request_id, None)
        self.recorded_queries.pop(request_id, None)


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, requests: list[Request]
) -> dict[str, TokenLogprobs]:
    """logits (N, vocab), tokens (N,) -> the sampled tokens' log-probabilities and each request's
    `logprobs` most likely alternatives, for the requests that ask (none computed otherwise). They are
    of the model's distribution, log_softmax(logits), not of the temperature-scaled one sampled from."""
    rows = [i for i, r in enumerate(requests) if r.sampling_params.logprobs is not None]
    if not rows:
        return {}
    logprobs = torch.log_softmax(logits[rows].float(), dim=-1)
    chosen_ids = tokens[rows]
    chosen = logprobs.gather(1, chosen_ids.unsqueeze(1)).squeeze(1).tolist()
    num_top = max(requests[i].sampling_params.logprobs for i in rows)
    top_values, top_ids = logprobs.topk(num_top, dim=-1)  # k = 0 gives empty rows
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    result = {}
    for j, (i, token_id) in enumerate(zip(rows, chosen_ids.tolist(), strict=True)):
        k = requests[i].sampling_params.logprobs
        top = tuple(zip(top_ids[j][:k], top_values[j][:k], strict=True))
        result[requests[i].request_id] = TokenLogprobs(token_id, chosen[j], top)
    return result
