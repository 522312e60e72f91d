"""autoplan's planner: tracing, the bundled models, the search, the explainer and the CLI.

`autoplan`, `plan_from_knobs` and `trace` are imported on first use (PEP 562), so the parts that
need no torch (the CLI's --help, `autoplan explain` of a plan file) start without importing it."""

from __future__ import annotations

from typing import Any

__all__ = ["autoplan", "plan_from_knobs", "trace"]


def __getattr__(name: str) -> Any:
    if name in ("autoplan", "plan_from_knobs"):
        from planner import api

        return getattr(api, name)
    if name == "trace":
        from planner.tracer import trace

        return trace
    raise AttributeError(f"module 'planner' has no attribute {name!r}")
