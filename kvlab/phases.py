"""The phases of an engine step, marked as torch profiler ranges so that a profile of the engine
(kvlab.bench.serving.step_profile) can attribute each step's time to scheduling, input preparation,
the forward pass (and the attention inside it), the LM head, sampling and committing the results."""

import contextlib

import torch
from torch.profiler import record_function

PHASE_SCHEDULE = "kvlab::schedule"
PHASE_PREPARE = "kvlab::prepare_inputs"
PHASE_FORWARD = "kvlab::forward"
PHASE_ATTENTION = "kvlab::attention"  # inside the forward: one attention backend call
PHASE_LOGITS = "kvlab::compute_logits"
PHASE_SAMPLE = "kvlab::sample"
PHASE_COMMIT = "kvlab::commit"
PHASES = (PHASE_SCHEDULE, PHASE_PREPARE, PHASE_FORWARD, PHASE_LOGITS, PHASE_SAMPLE, PHASE_COMMIT)

_UNPROFILED = contextlib.nullcontext()


def phase(name: str):
    """A profiler range named `name` while a torch profiler records, else nothing: an idle
    `record_function` still costs ~9 us, a step has six phases and a decode step lasts milliseconds."""
    return record_function(name) if torch.autograd._profiler_enabled() else _UNPROFILED
