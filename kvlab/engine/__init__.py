"""The serving engine: request state, paged KV blocks, scheduling, model execution.

Import names from their modules (`kvlab.engine.scheduler.Scheduler`, ...); this package exports nothing.
"""
