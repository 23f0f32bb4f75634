"""Where an engine step's time goes: GEMMs, attention, the fused decode op, other ops, sampling,
scheduling and Python, from torch's profiler over a short run of the engine.

The engine marks its phases as profiler ranges (kvlab/phases.py), and the models mark each attention
backend call. Inside the forward pass and the LM head, each child is attributed by what it is: an
attention range, a GEMM op (including what it calls, e.g. aten::linear -> aten::addmm), the fused
decode op, or any other op; the range's time in none of them is Python. The step's time outside its
phases (building outputs, detokenising, small ops between phases) is the rest. The profiler adds a few
microseconds per op, so absolute times are inflated, most on the op-by-op path; the report gives
per-step milliseconds under the profiler and shares.
"""

import time
from collections import defaultdict
from typing import Any

from torch.profiler import ProfilerActivity, profile, record_function

from kvlab.phases import (
    PHASE_ATTENTION,
    PHASE_COMMIT,
    PHASE_FORWARD,
    PHASE_LOGITS,
    PHASE_PREPARE,
    PHASE_SAMPLE,
    PHASE_SCHEDULE,
    PHASES,
)

STEP = "kvlab::step"
GEMM_OPS = frozenset({"aten::linear", "aten::addmm", "aten::mm", "aten::matmul", "kvlab::skinny_linear"})
FUSED_OPS = frozenset({"kvlab::decode_step"})

GEMMS = "GEMMs"
ATTENTION = "attention (backend calls)"
FUSED = "fused decode step (GEMMs + attention + norms, and the LM head, in one op)"
OTHER_OPS = "other ops (norms, RoPE, K/V writes, activations)"
PYTHON = "Python in the forward pass"
CATEGORIES = (
    GEMMS,
    ATTENTION,
    FUSED,
    OTHER_OPS,
    PYTHON,
    "preparing inputs",
    "sampling",
    "scheduling and committing",
    "outputs and the rest of the step",
)
BY_PHASE = {
    PHASE_PREPARE: "preparing inputs",
    PHASE_SAMPLE: "sampling",
    PHASE_SCHEDULE: "scheduling and committing",
    PHASE_COMMIT: "scheduling and committing",
}


def _child_category(name: str) -> str:
    if name == PHASE_ATTENTION:
        return ATTENTION
    if name in GEMM_OPS:
        return GEMMS
    if name in FUSED_OPS:
        return FUSED
    return OTHER_OPS


def _step_of(event):
    while event is not None and event.name != STEP:
        event = event.cpu_parent
    return event


def attribute(events, decode_only: list[bool]) -> dict[str, dict[str, Any]]:
    """Per kind of step ("decode": decode-only steps, "prefill": steps with prompt tokens), the number
    of steps, their total microseconds and the microseconds per category. `decode_only[i]` says what
    the i-th step (in time order) was."""
    steps = sorted((e for e in events if e.name == STEP), key=lambda e: e.time_range.start)
    if len(steps) != len(decode_only):
        raise ValueError(f"{len(steps)} profiled steps but {len(decode_only)} step kinds")
    kind_of = {
        id(step): "decode" if decode else "prefill" for step, decode in zip(steps, decode_only, strict=True)
    }
    kinds = {kind: {"steps": 0, "total_us": 0.0, "us": defaultdict(float)} for kind in ("decode", "prefill")}
    for event in events:
        step = _step_of(event)
        if step is None:
            continue
        kind = kinds[kind_of[id(step)]]
        totals = kind["us"]
        if event.name == STEP:
            kind["steps"] += 1
            kind["total_us"] += event.cpu_time_total
            in_phases = sum(child.cpu_time_total for child in event.cpu_children if child.name in PHASES)
            totals[CATEGORIES[-1]] += event.cpu_time_total - in_phases
        elif event.name in (PHASE_FORWARD, PHASE_LOGITS):
            attributed = 0.0
            for child in event.cpu_children:
                totals[_child_category(child.name)] += child.cpu_time_total
                attributed += child.cpu_time_total
            totals[PYTHON] += event.cpu_time_total - attributed
        elif event.name in BY_PHASE:
            totals[BY_PHASE[event.name]] += event.cpu_time_total
    for kind in kinds.values():
        kind["us"] = {name: kind["us"].get(name, 0.0) for name in CATEGORIES}
    return kinds


def profile_steps(engine, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
    """Serve `prompts` (all at t=0, `new_tokens` each) under the profiler; per kind of step (decode-only,
    with prefill), ms per step by category."""
    from kvlab.engine.request import SamplingParams

    for prompt in prompts:
        engine.add_request(prompt, SamplingParams(max_tokens=new_tokens, ignore_eos=True))
    decode_only = []
    prompt_tokens = engine.get_stats().num_prompt_tokens
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        while engine.has_unfinished_requests():
            with record_function(STEP):
                engine.step()
            now = engine.get_stats().num_prompt_tokens
            decode_only.append(now == prompt_tokens)
            prompt_tokens = now
    wall_s = time.perf_counter() - started
    by_kind = {}
    for name, kind in attribute(profiler.events(), decode_only).items():
        per_step = max(kind["steps"], 1) * 1e3
        by_kind[name] = {
            "steps": kind["steps"],
            "step_ms": kind["total_us"] / per_step,
            "ms_per_step": {category: value / per_step for category, value in kind["us"].items()},
        }
    return {
        "num_requests": len(prompts),
        "prompt_len": len(prompts[0]),
        "new_tokens": new_tokens,
        "num_preemptions": engine.get_stats().num_preemptions,
        "wall_s": wall_s,
        "by_kind": by_kind,
    }
