"""LLMEngine: the synchronous engine loop. Requests in (text or token ids), outputs per step.

engine = LLMEngine.from_model("tiny-llama", num_blocks=64)
engine.add_request("Hello", SamplingParams(max_tokens=8))
while engine.has_unfinished_requests():
    for output in engine.step(): ...
"""

import itertools
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from kvlab.attention.backends.registry import get_backend
from kvlab.engine.compression import RequestPress, run_presses
from kvlab.engine.config import EngineConfig
from kvlab.engine.detokenizer import OutputText
from kvlab.engine.model_runner import ModelRunner
from kvlab.engine.request import Request, RequestStatus, SamplingParams, TokenLogprobs
from kvlab.engine.scheduler import Scheduler, SchedulerOutput
from kvlab.errors import ConfigError, PromptTooLongError
from kvlab.models.loader import LoadedModel, load_model, resolve_device, resolve_dtype
from kvlab.models.native import build_engine_model
from kvlab.phases import PHASE_COMMIT, PHASE_SCHEDULE, phase
from kvlab.quant.paged_kv import QuantizedPagedBackend
from kvlab.stopping import eos_ids, model_eos_ids


@dataclass(slots=True)
class RequestOutput:
    """A request's state after a step: everything generated so far, and what this step added."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    new_token_ids: list[int]
    text: str
    finish_reason: str | None = None
    new_text: str = ""  # what this step added to `text`: a stream's pieces concatenate to the final text
    # One per output token when the request's SamplingParams ask for logprobs, else None; this step's
    # are the last len(new_token_ids).
    logprobs: list[TokenLogprobs] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_used_blocks: int
    num_blocks: int
    prefix_cache_hit_rate: float
    num_preemptions: int
    prompt_tokens_per_s: float  # prefill tokens computed per second of step time (recompute included)
    generation_tokens_per_s: float
    num_press_evicted_tokens: int = 0  # cached tokens dropped by requests' presses (blocks freed)
    num_prompt_tokens: int = 0  # prefill tokens computed so far (recompute included)
    num_generated_tokens: int = 0  # tokens sampled so far (aborted requests' included)

    @property
    def block_usage(self) -> float:
        return self.num_used_blocks / self.num_blocks


def _config_for_loaded(loaded: LoadedModel, config: EngineConfig, given: set[str]) -> EngineConfig:
    """`config` for a model loaded by the caller: the dtype and device its weights have, which the KV
    cache must share. Taken from the weights where the caller gave none; a different one is an error
    (the engine would fail in its first step otherwise)."""
    weights = {"dtype": str(loaded.model.dtype).removeprefix("torch."), "device": loaded.model.device.type}
    wanted = {"dtype": config.dtype, "device": resolve_device(config.device).type}
    for name in ("dtype", "device"):
        if wanted[name] == weights[name]:
            continue
        if name in given:
            raise ConfigError(
                f"the model's weights are {weights[name]} but the engine's {name} is {wanted[name]}: "
                f"pass {name}={weights[name]!r}, or load the model at {wanted[name]}"
            )
        config = replace(config, **{name: weights[name]})
    return config


@dataclass(slots=True)
class _Counters:
    step_seconds: float = 0.0
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    num_press_evicted_tokens: int = 0
    ids: itertools.count = field(default_factory=itertools.count)


class LLMEngine:
    """Composed from its parts (tests build it around a toy model); `from_model` loads everything."""

    def __init__(
        self,
        config: EngineConfig,
        scheduler: Scheduler,
        runner: ModelRunner,
        tokenizer,
        eos_token_id: int | Sequence[int] | None,
        vocab_size: int | None = None,
    ):
        """eos_token_id: the id, or ids (a `generation_config` list), that end a request; vocab_size:
        when known, prompt token ids outside [0, vocab_size) are refused (else they fail a step)."""
        if config.max_model_len is None:
            raise ValueError("LLMEngine needs a resolved config.max_model_len")
        self.config = config
        self.scheduler = scheduler
        self.runner = runner
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_ids(eos_token_id)
        self.vocab_size = vocab_size
        self._counters = _Counters()
        # AsyncLLM tokenises new prompts on the event loop while a step detokenises in its worker
        # thread; HF fast tokenizers are not safe to use from two threads at once.
        self._tokenizer_lock = threading.Lock()
        self._texts: dict[str, OutputText] = {}  # request id -> its incremental detokenisation

    @property
    def eos_token_id(self) -> tuple[int, ...]:
        """All EOS ids (a tuple; the constructor takes it back), for callers that rebuild the engine."""
        return self.eos_token_ids

    @classmethod
    def from_model(
        cls, model: str | LoadedModel, config: EngineConfig | None = None, **overrides
    ) -> "LLMEngine":
        """`overrides` are EngineConfig fields (unknown names raise ConfigError)."""
        given = set(overrides) | ({"dtype", "device"} if config else set())
        config = EngineConfig.from_dict({**(config.to_dict() if config else {}), **overrides})
        if isinstance(model, LoadedModel):
            config = _config_for_loaded(model, config, given)
        loaded = model if isinstance(model, LoadedModel) else load_model(model, config.dtype, config.device)
        if config.quantization is not None:
            from kvlab.quant.methods import quantize_loaded

            loaded = quantize_loaded(loaded, config.quantization)
        # Output is capped at the model's context; a prompt alone must leave room for one token.
        max_model_len = min(config.max_model_len or loaded.context_length, loaded.context_length)
        config = replace(config, max_model_len=max_model_len)
        dtype, device = resolve_dtype(config.dtype), resolve_device(config.device)
        model = build_engine_model(loaded.model)
        kv_quant = config.kv_quant
        num_blocks = config.resolve_num_blocks(model.kv_bytes_per_token(dtype, kv_quant) * config.block_size)
        backend = get_backend(config.attention_backend, device)
        if kv_quant is not None:
            backend = QuantizedPagedBackend(backend, kv_quant, model.head_dim)
        runner = ModelRunner(
            model,
            backend,
            num_layers=model.num_layers,
            num_kv_heads=model.num_kv_heads,
            head_dim=model.head_dim,
            num_blocks=num_blocks,
            block_size=config.block_size,
            dtype=dtype,
            device=device,
            kv_quant=kv_quant,
        )
        return cls(
            config,
            Scheduler(config, num_blocks),
            runner,
            loaded.tokenizer,
            model_eos_ids(loaded.model),
            vocab_size=getattr(loaded.model.config, "vocab_size", None),
        )

    def make_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        press: RequestPress | None = None,
    ) -> Request:
        """Tokenise and validate without touching engine state (safe from another thread). `press`
        compresses the request's K/V once its prefill completes (see compression.py)."""
        params = params or SamplingParams()
        if isinstance(prompt, str):
            token_ids = self.tokenize(prompt)
            text = prompt
        else:
            text, token_ids = None, [int(t) for t in prompt]
            if self.vocab_size is not None and any(not 0 <= t < self.vocab_size for t in token_ids):
                raise ConfigError(
                    f"prompt token ids must be in [0, {self.vocab_size}), the model's vocabulary"
                )
        if not token_ids:
            raise ConfigError("the prompt is empty after tokenisation")
        if len(token_ids) >= self.config.max_model_len:
            raise PromptTooLongError(
                f"prompt has {len(token_ids)} tokens; the model's context is {self.config.max_model_len} "
                "and at least one token must be generated"
            )
        if request_id is None:
            request_id = f"req-{next(self._counters.ids)}"
            while request_id in self.scheduler.requests:  # a caller named a request "req-<n>" itself
                request_id = f"req-{next(self._counters.ids)}"
        budget = None
        if press is not None:
            if self.config.kv_cache_dtype != "auto":
                raise ConfigError(
                    "a press in the engine scores K/V read from the blocks, which kv_cache_dtype="
                    f"{self.config.kv_cache_dtype!r} stores quantized; use kv_cache_dtype='auto' with a press"
                )
            budget = press.budget(len(token_ids), len(self.runner.kv_caches))  # ConfigError if unsupported
        request = Request(
            request_id,
            token_ids,
            params,
            eos_token_ids=self.eos_token_ids,
            prompt=text,
            press=press,
            press_budget=budget,
        )
        self.scheduler.check_fits(request)
        return request

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        press: RequestPress | None = None,
    ) -> str:
        request = self.make_request(prompt, params, request_id, press)
        self.scheduler.add_request(request)
        return request.request_id

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The tokenizer's ids for `text` (what a text prompt becomes), safe from any thread.
        `add_special_tokens=False` for text that already holds them (a rendered chat template)."""
        with self._tokenizer_lock:
            if add_special_tokens:
                return list(self.tokenizer.encode(text))
            return list(self.tokenizer.encode(text, add_special_tokens=False))

    def detokenize(self, token_ids: list[int]) -> str:
        """The text of `token_ids` as outputs show it (special tokens skipped), safe from any thread."""
        return self._decode(token_ids)

    def abort(self, request_id: str) -> RequestOutput | None:
        """End a request; its final output, or None if it was unknown or had already finished."""
        for request in self.scheduler.finish_requests([request_id], RequestStatus.FINISHED_ABORTED):
            self.runner.release(request.request_id)
            text = self._text_of(request)
            text.update(request.output_token_ids, final=True)
            self._texts.pop(request_id, None)
            return _output(request, [], text)
        return None

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[RequestOutput]:
        """Schedule, run and commit one step; one output per request that got a token (or finished)."""
        started = time.perf_counter()
        with phase(PHASE_SCHEDULE):
            scheduled = self.scheduler.schedule()
        for request_id in scheduled.preempted_request_ids:
            # Recomputed from its first token: its recorded query chunks restart, even when this step
            # runs nothing (the runner skips empty steps).
            self.runner.recorded_queries.pop(request_id, None)
        sampled = self.runner.execute(scheduled)
        with phase(PHASE_COMMIT):
            finished = {r.request_id for r in self.scheduler.update(scheduled, sampled)}
            self._append_logprobs(scheduled)
            self._run_presses(scheduled)
        self._counters.num_press_evicted_tokens += sum(s.overwrites_slot for s in scheduled.scheduled)
        self._counters.step_seconds += time.perf_counter() - started
        self._counters.num_prompt_tokens += scheduled.num_prefill_tokens
        self._counters.num_generated_tokens += len(sampled)
        outputs = []
        for item in scheduled.scheduled:
            request = item.request
            if request.request_id not in sampled:
                continue
            text = self._text_of(request)
            text.update(request.output_token_ids, final=request.request_id in finished)
            if text.stopped and not request.is_finished:
                self.scheduler.finish_requests([request.request_id], RequestStatus.FINISHED_STOPPED)
                finished.add(request.request_id)
            elif text.stopped and request.status == RequestStatus.FINISHED_LENGTH:
                # The token that completed a stop string was also the last one allowed: the text is cut
                # at the stop string, so that is why it ended (as OpenAI and vLLM report it).
                request.status = RequestStatus.FINISHED_STOPPED
            if request.request_id in finished:
                self.runner.release(request.request_id)
                self._texts.pop(request.request_id, None)
            outputs.append(_output(request, [sampled[request.request_id]], text))
        return outputs

    def _append_logprobs(self, scheduled: SchedulerOutput) -> None:
        """Give each request the logprobs of the token this step appended to it (if it asked)."""
        step_logprobs = self.runner.step_logprobs
        if not step_logprobs:
            return
        for item in scheduled.scheduled:
            request = item.request
            logprobs = step_logprobs.get(request.request_id)
            # update() skips a request that stopped running during the step: no token, no logprobs.
            if logprobs is not None and len(request.output_logprobs) < len(request.output_token_ids):
                request.output_logprobs.append(logprobs)

    def _text_of(self, request: Request) -> OutputText:
        text = self._texts.get(request.request_id)
        if text is None:
            text = self._texts[request.request_id] = OutputText(self._decode, request.sampling_params.stop)
        return text

    def _decode(self, token_ids: list[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def _run_presses(self, scheduled: SchedulerOutput) -> None:
        """Compress each running request whose prompt this step finished computing (see compression.py)."""
        requests = [item.request for item in scheduled.scheduled]
        kv, caches = self.scheduler.kv, self.runner.kv_caches
        self._counters.num_press_evicted_tokens += run_presses(
            requests, kv, caches, self.runner.recorded_queries
        )

    def generate(
        self,
        prompts: list[str | list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
        press: RequestPress | None = None,
    ) -> list[RequestOutput]:
        """Run prompts to completion; outputs in prompt order. `press` applies to every prompt."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ConfigError(f"{len(prompts)} prompts but {len(params_list)} sampling params")
        # Every prompt is checked before any is queued: a bad one leaves the engine as it was.
        requests = [self.make_request(p, sp, press=press) for p, sp in zip(prompts, params_list, strict=True)]
        for request in requests:
            self.scheduler.add_request(request)
        ids = [r.request_id for r in requests]
        final: dict[str, RequestOutput] = {}
        while self.has_unfinished_requests():
            for output in self.step():
                if output.finished:
                    final[output.request_id] = output
        return [final[i] for i in ids]

    def get_stats(self) -> EngineStats:
        counters, pool = self._counters, self.scheduler.kv.pool
        seconds = counters.step_seconds or float("inf")
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            num_used_blocks=pool.num_used_blocks,
            num_blocks=pool.num_blocks,
            prefix_cache_hit_rate=self.scheduler.kv.prefix_stats.hit_rate,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens_per_s=counters.num_prompt_tokens / seconds,
            generation_tokens_per_s=counters.num_generated_tokens / seconds,
            num_press_evicted_tokens=counters.num_press_evicted_tokens,
            num_prompt_tokens=counters.num_prompt_tokens,
            num_generated_tokens=counters.num_generated_tokens,
        )


def _output(request: Request, new_token_ids: list[int], text: OutputText) -> RequestOutput:
    return RequestOutput(
        request_id=request.request_id,
        prompt=request.prompt,
        prompt_token_ids=request.prompt_token_ids,
        output_token_ids=list(request.output_token_ids),
        new_token_ids=new_token_ids,
        text=text.text,
        finish_reason=request.status.finish_reason,
        new_text=text.new_text,
        logprobs=list(request.output_logprobs) if request.sampling_params.logprobs is not None else None,
    )
