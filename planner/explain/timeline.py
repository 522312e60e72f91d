"""The pipeline timeline (which rank does what, when) as a compact text chart and a picture.

Source of the entries: the Plan's recorded per-stage times (`predicted.stage_times`) replayed
through the cost model's own schedule simulator (`cost_models.build_schedule` + `simulate`), the
same one the search used. Nothing here estimates a time.

Text chart: one row per pp rank, time on the x axis in equal columns. Each column shows the
action that covers most of it (F forward, B backward / input-grad, W weight-grad; '.' idle when
less than half of the column is busy; '#' when no action covers 3/4 of the busy time, i.e.
a steady phase of alternating actions too fine for the columns). An action wide enough carries its micro-batch number,
e.g. `F3` or `B3==`; the rest of its span is filled with '-' (F), '=' (B) or '+' (W).
When the schedule fits, the shortest action gets two columns, so small schedules read exactly.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, NamedTuple

from cost_models import build_schedule, simulate
from specs import Plan, SpecError


class Entry(NamedTuple):
    rank: int
    action: str  # "F", "B" or "W" (normalised)
    stage: int
    microbatch: int
    start_s: float
    end_s: float


FILL = {"F": "-", "B": "=", "W": "+"}
COLORS = {"F": "#4C78A8", "B": "#54A24B", "W": "#F58518"}  # also the HTML test's probe colours
STYLES = {"F": "bold blue", "B": "bold green", "W": "bold yellow", "#": "cyan", ".": "dim"}


def normalise_action(action: Any) -> str:
    """Map a simulator action name ('F', 'forward', 'B', 'I', 'backward_input', 'W', ...)."""
    text = str(getattr(action, "name", action)).strip().upper()
    if text.startswith("F"):
        return "F"
    if text.startswith("W"):
        return "W"
    if text.startswith(("B", "I")):
        return "B"
    return text[:1] or "?"


def to_entries(timeline: Any) -> list[Entry]:
    """Entries from any sequence of records with rank/action/stage/microbatch/start_s/end_s
    (attributes, mapping keys or a tuple in that order)."""
    out = []
    for rec in timeline:
        if isinstance(rec, dict):
            vals = [rec[k] for k in Entry._fields]
        elif hasattr(rec, "start_s"):
            vals = [getattr(rec, k) for k in Entry._fields]
        else:
            vals = list(rec)
        out.append(
            Entry(
                int(vals[0]),
                normalise_action(vals[1]),
                int(vals[2]),
                int(vals[3]),
                float(vals[4]),
                float(vals[5]),
            )
        )
    return out


def plan_timeline(plan: Plan) -> tuple[list[Entry], str | None]:
    """(entries, None), or ([], why there is no timeline)."""
    prediction = plan.predicted
    if plan.mesh.pp == 1:
        return [], "no pipeline (pp=1): every rank runs the whole model"
    if prediction is None or not prediction.stage_times:
        return [], "the plan records no per-stage times (predicted.stage_times is empty)"
    pipeline = plan.pipeline
    schedule = build_schedule(
        pipeline.schedule, plan.mesh.pp, pipeline.num_micro_batches, pipeline.virtual_stages
    )
    result = simulate(schedule, list(prediction.stage_times))
    return to_entries(result.timeline), None


def _columns(entries: list[Entry], max_cols: int) -> tuple[int, float]:
    total = max(e.end_s for e in entries)
    shortest = min((e.end_s - e.start_s for e in entries if e.end_s > e.start_s), default=total)
    want = math.ceil(round(2 * total / shortest, 6)) if shortest > 0 else max_cols
    cols = max(1, min(max_cols, want))
    return cols, total


def text_rows(entries: list[Entry], width: int = 100) -> list[tuple[str, str]]:
    """[(row label, chart cells)], chart cells one character per column."""
    if not entries:
        return []
    num_ranks = max(e.rank for e in entries) + 1
    label_w = len(f"rank {num_ranks - 1} |")
    cols, total = _columns(entries, max(10, width - label_w))
    col_s = total / cols
    rows = []
    for rank in range(num_ranks):
        cover = [dict() for _ in range(cols)]  # column -> {action: seconds covered}
        mine = sorted((e for e in entries if e.rank == rank), key=lambda e: e.start_s)
        for e in mine:
            c0, c1 = int(e.start_s / col_s), min(cols - 1, int(math.ceil(e.end_s / col_s)) - 1)
            for c in range(c0, max(c0, c1) + 1):
                lo, hi = max(e.start_s, c * col_s), min(e.end_s, (c + 1) * col_s)
                if hi > lo:
                    cover[c][e.action] = cover[c].get(e.action, 0.0) + (hi - lo)
        cells = []
        for c in range(cols):
            busy = sum(cover[c].values())
            if busy < 0.5 * col_s * (1 - 1e-9):
                cells.append(".")
            else:
                top = max(cover[c], key=cover[c].get)
                # a column shared by several actions (a steady 1F1B phase at low resolution)
                cells.append(FILL.get(top, "#") if cover[c][top] >= 0.75 * busy else "#")
        for e in mine:  # labels where an action owns enough columns
            c0 = int(round(e.start_s / col_s, 9))
            c1 = int(round(e.end_s / col_s, 9))
            label = f"{e.action}{e.microbatch}"
            if c1 - c0 >= len(label) and all(cells[c] == FILL.get(e.action) for c in range(c0, c1)):
                cells[c0 : c0 + len(label)] = list(label)
        rows.append((f"rank {rank}".ljust(label_w - 1) + "|", "".join(cells)))
    return rows


def text_chart(entries: list[Entry], width: int = 100) -> list[str]:
    """The chart as plain lines (header with the time axis, one row per rank)."""
    rows = text_rows(entries, width)
    if not rows:
        return []
    total = max(e.end_s for e in entries)
    from planner.explain.report import fmt_s

    pad = " " * len(rows[0][0])
    cols = len(rows[0][1])
    right = fmt_s(total)
    axis = "0" + right.rjust(cols - 1) if cols > len(right) + 1 else "0 .. " + right
    lines = [pad + axis]
    lines += [label + cells for label, cells in rows]
    lines.append(pad + "F fwd  B bwd  W weight-grad  # mixed  . idle  (digits: micro-batch)")
    return lines


# ------------------------------------------------------------------ pictures
def _figure(entries: list[Entry], title: str = ""):
    import matplotlib

    matplotlib.use("Agg", force=False)
    matplotlib.rcParams["svg.hashsalt"] = "autoplan"  # stable ids in SVG output
    from matplotlib.figure import Figure

    num_ranks = max(e.rank for e in entries) + 1
    total = max(e.end_s for e in entries)
    fig = Figure(figsize=(10, 0.6 + 0.45 * num_ranks), dpi=110)
    ax = fig.add_subplot(1, 1, 1)
    scale, unit = (1e3, "ms") if total < 1 else (1.0, "s")
    bars: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for e in entries:
        bars.setdefault((e.rank, e.action), []).append(
            (e.start_s * scale, (e.end_s - e.start_s) * scale)
        )
    for (rank, action), spans in bars.items():  # one collection per row and colour: fast for 1000s
        ax.broken_barh(
            spans,
            (rank - 0.4, 0.8),
            facecolors=COLORS.get(action, "#999999"),
            edgecolors="white",
            linewidth=0.4 if len(spans) < 200 else 0.0,
        )
    if len(entries) <= 400:
        for e in entries:
            x, w = e.start_s * scale, (e.end_s - e.start_s) * scale
            if w > total * scale / 60:
                ax.text(
                    x + w / 2,
                    e.rank,
                    str(e.microbatch),
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white",
                )
    ax.set_yticks(range(num_ranks), [f"rank {r}" for r in range(num_ranks)])
    ax.invert_yaxis()
    ax.set_xlim(0, total * scale)
    ax.set_xlabel(f"time ({unit})")
    from matplotlib.patches import Patch

    present = sorted({e.action for e in entries}, key="FBW".find)
    names = {"F": "forward", "B": "backward", "W": "weight grad"}
    ax.legend(
        handles=[Patch(color=COLORS.get(a, "#999999"), label=names.get(a, a)) for a in present],
        loc="center left",
        bbox_to_anchor=(1.005, 0.5),
        fontsize=8,
        frameon=False,
    )
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def _metadata(fmt: str) -> dict:
    """No creation date in the files, so the same plan gives the same picture."""
    return {"Date": None} if fmt == "svg" else {"Software": "autoplan"}


def draw_timeline(entries: list[Entry], path: str | Path, title: str = "") -> Path:
    """Write the timeline as PNG or SVG (by the file's suffix)."""
    p = Path(path)
    fmt = p.suffix.lower().lstrip(".")
    if fmt not in ("png", "svg"):
        raise SpecError(f"--picture {p}: the picture must end in .png or .svg")
    if not entries:
        raise SpecError(f"--picture {p}: this plan has no pipeline timeline to draw")
    fig = _figure(entries, title)
    fig.savefig(p, format=fmt, metadata=_metadata(fmt))
    return p


def timeline_svg(entries: list[Entry], title: str = "") -> str:
    """The picture as an inline <svg> element (for the HTML report)."""
    buf = io.StringIO()
    _figure(entries, title).savefig(buf, format="svg", metadata=_metadata("svg"))
    text = buf.getvalue()
    return text[text.index("<svg") :]
