"""Where an engine step's time goes: GEMMs, attention, the fused decode op, other ops, sampling,
scheduling and Python, from torch's profiler over a short run of the engine.

The engine marks its phases as profiler ranges (kvlab.engine.phases). Inside the forward pass and the
LM head, each op called directly from the model is attributed by name (a GEMM op includes what it
calls, e.g. aten::linear -> aten::addmm), and the range's time not spent in any op is Python. The
profiler adds a few microseconds per op, so absolute times are inflated, most on the op-by-op path;
the report gives per-step milliseconds under the profiler and shares.
"""

from collections import defaultdict
from typing import Any

from torch.profiler import ProfilerActivity, profile, record_function

from kvlab.engine.phases import (
    PHASE_COMMIT,
    PHASE_FORWARD,
    PHASE_LOGITS,
    PHASE_PREPARE,
    PHASE_SAMPLE,
    PHASE_SCHEDULE,
)

STEP = "kvlab::step"
GEMM_OPS = frozenset(
    {"aten::linear", "aten::addmm", "aten::mm", "aten::matmul", "aten::bmm", "kvlab::skinny_linear"}
)
ATTENTION_OPS = frozenset({"kvlab::paged_decode_attention", "aten::scaled_dot_product_attention"})
FUSED_OPS = frozenset({"kvlab::decode_step"})

# Report order: what the engine's model computes, then the engine's own work around it.
CATEGORIES = (
    "GEMMs",
    "attention",
    "fused decode step (GEMMs + attention + norms in one op)",
    "other ops (norms, RoPE, K/V writes, gathers)",
    "Python in the forward pass",
    "preparing inputs",
    "sampling",
    "scheduling and committing",
    "outputs and the rest of the step",
)


def _op_category(name: str) -> str:
    if name in GEMM_OPS:
        return CATEGORIES[0]
    if name in ATTENTION_OPS:
        return CATEGORIES[1]
    if name in FUSED_OPS:
        return CATEGORIES[2]
    return CATEGORIES[3]


def attribute(events) -> tuple[dict[str, float], int]:
    """Microseconds per category over the profiled steps (profiler events), and the number of steps."""
    totals: dict[str, float] = defaultdict(float)
    steps = 0
    for event in events:
        if event.name == STEP:
            steps += 1
            phases = sum(child.cpu_time_total for child in event.cpu_children)
            totals[CATEGORIES[8]] += event.cpu_time_total - phases
        elif event.name in (PHASE_FORWARD, PHASE_LOGITS):
            in_ops = 0.0
            for child in event.cpu_children:
                totals[_op_category(child.name)] += child.cpu_time_total
                in_ops += child.cpu_time_total
            totals[CATEGORIES[4]] += event.cpu_time_total - in_ops
        elif event.name == PHASE_PREPARE:
            totals[CATEGORIES[5]] += event.cpu_time_total
        elif event.name == PHASE_SAMPLE:
            totals[CATEGORIES[6]] += event.cpu_time_total
        elif event.name in (PHASE_SCHEDULE, PHASE_COMMIT):
            totals[CATEGORIES[7]] += event.cpu_time_total
    return {name: totals.get(name, 0.0) for name in CATEGORIES}, steps


def profile_steps(engine, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
    """Serve `prompts` (all at t=0, `new_tokens` each) under the profiler; ms per step by category."""
    from kvlab.engine.request import SamplingParams

    for prompt in prompts:
        engine.add_request(prompt, SamplingParams(max_tokens=new_tokens, ignore_eos=True))
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        while engine.has_unfinished_requests():
            with record_function(STEP):
                engine.step()
    totals, steps = attribute(profiler.events())
    step_ms = sum(totals.values()) / 1e3 / max(steps, 1)
    return {
        "num_requests": len(prompts),
        "prompt_len": len(prompts[0]),
        "new_tokens": new_tokens,
        "steps": steps,
        "ms_per_step": {name: value / 1e3 / max(steps, 1) for name, value in totals.items()},
        "step_ms": step_ms,
    }
