"""The core's own implementations of the observation hooks: they run the stage or the prefill.

Observers (profiler, reporters, tests) wrap these with ``@hookimpl(wrapper=True)``.
"""

from __future__ import annotations

from typing import Any

from tokenpress.core.hookspecs import hookimpl


@hookimpl(trylast=True)
def tokenpress_run_stage(stage: Any, method: Any, point: str, payload: Any, call: Any, layer: int | None) -> Any:
    return call(payload)


@hookimpl(trylast=True)
def tokenpress_prefill(adapter: Any, batch_size: int, call: Any) -> Any:
    return call()
