"""`autoplan compare A B`: two plans side by side, differing rows highlighted.

Rows: the knobs, the layout (stages), the recorded predictions (step time and each of its
terms, MFU, throughput, peak memory and each category). Values are read from each plan's
records; the delta column is B - A.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from planner.explain.report import fmt_bytes, fmt_s, term_label
from specs import Plan


def _row(group: str, name: str, a: Any, b: Any, kind: str = "text") -> dict[str, Any]:
    delta = None
    if (
        kind in ("s", "bytes", "pct", "num")
        and isinstance(a, (int, float))
        and isinstance(b, (int, float))
    ):
        delta = b - a
    return {
        "group": group,
        "name": name,
        "a": a,
        "b": b,
        "kind": kind,
        "delta": delta,
        "differs": a != b,
    }


def compare_data(a: Plan, b: Plan) -> dict[str, Any]:
    ka, kb = a.knobs().model_dump(mode="json"), b.knobs().model_dump(mode="json")
    rows = [
        _row("plan", "model", a.model.name, b.model.name),
        _row("plan", "hardware", str(a.hardware), str(b.hardware)),
        _row("plan", "global batch", a.train.global_batch_size, b.train.global_batch_size, "num"),
        _row("plan", "precision", a.train.precision, b.train.precision),
    ]
    rows += [_row("knobs", k, ka[k], kb.get(k)) for k in ka]
    sa = ", ".join(f"{s.first}-{s.last}" for s in a.pipeline.stages)
    sb = ", ".join(f"{s.first}-{s.last}" for s in b.pipeline.stages)
    rows.append(_row("knobs", "stages (blocks)", sa, sb))
    pa, pb = a.predicted, b.predicted
    if pa and pb:
        rows += [_row("time", "step time", pa.step_time_s, pb.step_time_s, "s")]
        keys = list(pa.time_breakdown_s) + [
            k for k in pb.time_breakdown_s if k not in pa.time_breakdown_s
        ]
        rows += [
            _row(
                "time",
                term_label(k),
                pa.time_breakdown_s.get(k, 0.0),
                pb.time_breakdown_s.get(k, 0.0),
                "s",
            )
            for k in keys
        ]
        rows += [
            _row("time", "MFU", pa.mfu, pb.mfu, "pct"),
            _row("time", "samples/s", pa.samples_per_s, pb.samples_per_s, "num"),
            _row("time", "bubble", pa.bubble_fraction, pb.bubble_fraction, "pct"),
            _row(
                "memory", "peak (worst rank)", pa.peak_memory_bytes, pb.peak_memory_bytes, "bytes"
            ),
            _row("memory", "capacity", pa.memory_capacity_bytes, pb.memory_capacity_bytes, "bytes"),
        ]
        keys = list(pa.memory_bytes) + [k for k in pb.memory_bytes if k not in pa.memory_bytes]
        rows += [
            _row("memory", k, pa.memory_bytes.get(k, 0.0), pb.memory_bytes.get(k, 0.0), "bytes")
            for k in keys
        ]
        rows.append(_row("memory", "fits", pa.fits, pb.fits))
    return {
        "a": str(a),
        "b": str(b),
        "rows": rows,
        "num_differences": sum(1 for r in rows if r["differs"]),
        "both_predicted": bool(pa and pb),
    }


def _fmt(v: Any, kind: str, signed: bool = False) -> str:
    if v is None:
        return "-"
    if kind == "s":
        return ("+" if signed and v > 0 else "") + fmt_s(v)
    if kind == "bytes":
        return ("+" if signed and v > 0 else "") + fmt_bytes(v)
    if kind == "pct":
        return f"{v:+.1%}" if signed else f"{v:.1%}"
    if kind == "num":
        return f"{v:+.4g}" if signed else f"{v:.4g}"
    return str(v)


def render_compare(
    d: dict[str, Any], console: Console, name_a: str = "A", name_b: str = "B"
) -> None:
    console.print(Text(f"A  {d['a']}", style="bold"), overflow="fold")
    console.print(Text(f"B  {d['b']}", style="bold"), overflow="fold")
    t = Table(
        title=f"{d['num_differences']} differences (highlighted); delta = B - A",
        title_justify="left",
    )
    t.add_column("", style="dim")
    t.add_column("")
    t.add_column(name_a, justify="right", overflow="fold", max_width=34)
    t.add_column(name_b, justify="right", overflow="fold", max_width=34)
    t.add_column("delta", justify="right")
    last = None
    for r in d["rows"]:
        style = "bold yellow" if r["differs"] else ""
        mark = "*" if r["differs"] else ""
        t.add_row(
            r["group"] if r["group"] != last else "",
            Text(f"{mark}{r['name']}", style=style),
            Text(_fmt(r["a"], r["kind"]), style=style),
            Text(_fmt(r["b"], r["kind"]), style=style),
            _fmt(r["delta"], r["kind"], signed=True) if r["delta"] not in (None, 0) else "",
        )
        last = r["group"]
    console.print(t)
    if not d["both_predicted"]:
        console.print(
            Text("(one of the plans carries no prediction; only knobs are compared)", style="dim")
        )
