"""OpenAI's response objects and stream chunks, built from engine outputs.

Completions answer `text_completion` objects (streamed as chunks of the same object type), chat
answers `chat.completion` objects streamed as `chat.completion.chunk`s; both end a stream with
`data: [DONE]`. finish_reason is the engine's: "stop" (EOS, a stop string or token), "length"
(max_tokens or the context), or "abort" (kvlab's: the server aborted the request while draining).
"""

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from kvlab.engine.llm_engine import RequestOutput
from kvlab.engine.request import TokenLogprobs

TokenText = Callable[[int], str]  # token id -> its text, for logprobs


@dataclass(frozen=True, slots=True)
class Envelope:
    """What every object and chunk of one response repeats."""

    id: str
    object: str  # "text_completion" | "chat.completion"
    model: str
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def new(cls, kind: str, model: str) -> "Envelope":
        prefix = "cmpl" if kind == "text_completion" else "chatcmpl"
        return cls(f"{prefix}-{uuid.uuid4().hex}", kind, model)

    @property
    def is_chat(self) -> bool:
        return self.object == "chat.completion"

    def wrap(self, choices: list[dict], object_type: str | None = None, **extra) -> dict:
        return {
            "id": self.id,
            "object": object_type or self.object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_logprobs(entries: list[TokenLogprobs], token_text: TokenText, offset: int) -> dict:
    """The legacy completions format; `offset`: where the first token's text starts in the choice."""
    tokens, offsets = [], []
    for entry in entries:
        text = token_text(entry.token_id)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{token_text(i): lp for i, lp in e.top} for e in entries],
        "text_offset": offsets,
    }


def chat_logprobs(entries: list[TokenLogprobs], token_text: TokenText) -> dict:
    def item(token_id: int, logprob: float) -> dict:
        text = token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = [
        item(e.token_id, e.logprob) | {"top_logprobs": [item(i, lp) for i, lp in e.top]} for e in entries
    ]
    return {"content": content, "refusal": None}


def response_object(
    envelope: Envelope, finals: list[RequestOutput], prompt_tokens: int, token_text: TokenText
) -> dict:
    """The whole answer of a non-streaming request, one choice per final output (in choice order)."""
    choices = []
    for index, output in enumerate(finals):
        logprobs = None
        if output.logprobs is not None:
            logprobs = (
                chat_logprobs(output.logprobs, token_text)
                if envelope.is_chat
                else completion_logprobs(output.logprobs, token_text, 0)
            )
        choice = {"index": index, "logprobs": logprobs, "finish_reason": output.finish_reason}
        if envelope.is_chat:
            choice["message"] = {"role": "assistant", "content": output.text}
        else:
            choice["text"] = output.text
        choices.append(choice)
    completion_tokens = sum(len(o.output_token_ids) for o in finals)
    return envelope.wrap(choices, usage=usage(prompt_tokens, completion_tokens))


class ChunkWriter:
    """Turns one response's engine outputs, as they arrive, into SSE events."""

    def __init__(self, envelope: Envelope, num_choices: int, token_text: TokenText, include_usage: bool):
        self.envelope = envelope
        self.token_text = token_text
        self.include_usage = include_usage
        self.object_type = "chat.completion.chunk" if envelope.is_chat else "text_completion"
        self.text_lengths = [0] * num_choices  # characters sent per choice (completions' text_offset)
        self.started = [False] * num_choices
        self.num_tokens = [0] * num_choices

    def events(self, index: int, output: RequestOutput) -> list[bytes]:
        events = []
        if self.envelope.is_chat and not self.started[index]:  # the role comes first, alone
            events.append(self._chunk(index, {"role": "assistant", "content": ""}, None, None))
        self.started[index] = True
        self.num_tokens[index] = len(output.output_token_ids)
        new_logprobs = None
        if output.logprobs is not None and output.new_token_ids:
            entries = output.logprobs[len(output.logprobs) - len(output.new_token_ids) :]
            new_logprobs = (
                chat_logprobs(entries, self.token_text)
                if self.envelope.is_chat
                else completion_logprobs(entries, self.token_text, self.text_lengths[index])
            )
        if output.new_text or new_logprobs is not None or output.new_token_ids:
            # One chunk per token, its text empty where the token completes no character yet (part
            # of a multi-byte character, a skipped special token): a client timing tokens by chunks
            # (TTFT, TPOT) sees every one.
            events.append(self._chunk(index, output.new_text, new_logprobs, None))
            self.text_lengths[index] += len(output.new_text)
        if output.finished:
            events.append(self._chunk(index, {} if self.envelope.is_chat else "", None, output.finish_reason))
        return events

    def closing(self, prompt_tokens: int) -> list[bytes]:
        """The usage chunk (if asked for) and [DONE]."""
        events = []
        if self.include_usage:
            body = self.envelope.wrap([], self.object_type, usage=usage(prompt_tokens, sum(self.num_tokens)))
            events.append(sse(body))
        events.append(b"data: [DONE]\n\n")
        return events

    def _chunk(
        self, index: int, content: str | dict, logprobs: dict | None, finish_reason: str | None
    ) -> bytes:
        choice: dict = {"index": index}
        if self.envelope.is_chat:
            choice["delta"] = content if isinstance(content, dict) else {"content": content}
        else:
            choice["text"] = content
        choice |= {"logprobs": logprobs, "finish_reason": finish_reason}
        extra = {"usage": None} if self.include_usage else {}
        return sse(self.envelope.wrap([choice], self.object_type, **extra))


def sse(data: dict) -> bytes:
    """One server-sent event."""
    return b"data: " + json.dumps(data, ensure_ascii=False).encode("utf-8") + b"\n\n"
