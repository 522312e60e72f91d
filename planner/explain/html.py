"""A self-contained HTML report of an explanation (`autoplan explain PLAN --html report.html`).

One file, no network: CSS and the small sorting script are inline, charts are inline SVG drawn
by matplotlib (timeline, memory of the worst rank against capacity, step-time terms). The
content is `report.explain_data(plan)`, the same as the terminal view.
"""

from __future__ import annotations

import html
import io
import json
from pathlib import Path

from planner.explain import timeline as tl
from planner.explain.report import explain_data, fmt_bytes, fmt_params, fmt_rate, fmt_s
from specs import Plan

MEM_COLORS = [
    "#B279A2",
    "#72B7B2",
    "#EECA3B",
    "#FF9DA6",
    "#9D755D",
    "#BAB0AC",
    "#79706E",
    "#D67195",
]
TERM_COLOR = "#E45756"

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;
max-width:1100px;color:#222;line-height:1.4;padding:0 16px}
h1{font-size:1.4em;margin-bottom:0}h2{font-size:1.15em;border-bottom:1px solid #ddd;padding-bottom:2px;
margin-top:1.6em}code,.mono{font-family:ui-monospace,Menlo,Consolas,monospace}
.oneline{font-size:1.1em;background:#f4f6fa;padding:8px 10px;border-radius:4px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
th{background:#f4f6fa}td.num{text-align:right;font-variant-numeric:tabular-nums}
table.sortable th{cursor:pointer;user-select:none}table.sortable th:after{content:" \\2195";color:#aaa}
tr.bad td{color:#b00}.muted{color:#777}.chart svg{max-width:100%;height:auto}
ul.tree{list-style:none;padding-left:1em}ul.tree li:before{content:"\\2514\\2500 ";color:#aaa}
"""

SORT_JS = """
document.querySelectorAll('table.sortable').forEach(function(t){
  t.querySelectorAll('th').forEach(function(th,i){th.addEventListener('click',function(){
    var body=t.tBodies[0],rows=Array.from(body.rows),asc=th.dataset.asc!=='1';
    t.querySelectorAll('th').forEach(function(h){h.dataset.asc=''});th.dataset.asc=asc?'1':'0';
    rows.sort(function(a,b){
      var x=a.cells[i].dataset.v||a.cells[i].textContent,y=b.cells[i].dataset.v||b.cells[i].textContent;
      var nx=parseFloat(x),ny=parseFloat(y);
      var c=(!isNaN(nx)&&!isNaN(ny))?nx-ny:x.localeCompare(y);return asc?c:-c;});
    rows.forEach(function(r){body.appendChild(r)});});});});
"""


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    return text[text.index("<svg") :]


def _figure(width_in: float, height_in: float):
    import matplotlib

    matplotlib.use("Agg", force=False)
    matplotlib.rcParams["svg.hashsalt"] = "autoplan"  # stable ids in SVG output
    from matplotlib.figure import Figure

    return Figure(figsize=(width_in, height_in), dpi=100)


def memory_svg(d: dict) -> str:
    """Stacked bar of the worst rank's memory by category, with the capacity as a line."""
    mem = d["predicted"]["memory"]
    gib = 2**30
    fig = _figure(9, 1.9)
    ax = fig.add_subplot(1, 1, 1)
    left = 0.0
    for i, c in enumerate(mem["categories"]):
        w = c["bytes"] / gib
        ax.barh(
            [0],
            [w],
            left=left,
            color=MEM_COLORS[i % len(MEM_COLORS)],
            label=c["category"],
            height=0.5,
        )
        left += w
    cap = mem["capacity_bytes"] / gib
    ax.axvline(cap, color="#222", linestyle="--", linewidth=1.2)
    ax.text(
        cap,
        0.34,
        f" capacity {fmt_bytes(mem['capacity_bytes'])}",
        fontsize=8,
        va="bottom",
        ha="right" if left <= cap else "left",
    )
    ax.set_xlim(0, max(cap, left) * 1.05)
    ax.set_yticks([])
    ax.set_xlabel("GiB")
    ax.legend(loc="center left", bbox_to_anchor=(1.005, 0.5), fontsize=8, frameon=False)
    ax.set_title(
        f"memory of the worst rank (pp stage {mem['worst_rank_stage']}): "
        f"{fmt_bytes(mem['peak_bytes'])} of {fmt_bytes(mem['capacity_bytes'])}",
        fontsize=10,
    )
    fig.tight_layout()
    return _svg(fig)


def breakdown_svg(d: dict) -> str:
    terms = d["predicted"]["breakdown"]
    fig = _figure(9, 0.6 + 0.3 * len(terms))
    ax = fig.add_subplot(1, 1, 1)
    ax.barh([t["label"] for t in terms], [t["seconds"] for t in terms], color=TERM_COLOR)
    ax.invert_yaxis()
    ax.set_xlabel("seconds per step")
    ax.tick_params(labelsize=8)
    fig.tight_layout()
    return _svg(fig)


def _e(x: object) -> str:
    return html.escape(str(x))


def _table(
    headers: list[str],
    rows: list[list[tuple[str, object]]],
    cls: str = "",
    row_classes: list[str] | None = None,
) -> str:
    """rows of (display text, sort value or None)."""
    out = [
        f'<table class="{cls}"><thead><tr>'
        + "".join(f"<th>{_e(h)}</th>" for h in headers)
        + "</tr></thead><tbody>"
    ]
    for i, row in enumerate(rows):
        rc = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        cells = []
        for text, val in row:
            if val is None:
                cells.append(f"<td>{_e(text)}</td>")
            else:
                cells.append(f'<td class="num" data-v="{_e(val)}">{_e(text)}</td>')
        out.append(f"<tr{rc}>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _axis_item(a: dict, nested: str = "") -> str:
    """One mesh axis as a list item (`nested`: the list of its parts, HSDP's dp)."""
    bandwidth = f" ({fmt_rate(a['bandwidth_bytes_per_s'])})" if a["bandwidth_bytes_per_s"] else ""
    where = f"spans {a['num_nodes_spanned']} nodes" if a["spans_nodes"] else "inside one node"
    return (
        f"<li><b>{a['axis']}={a['degree']}</b>: rank stride {a['stride']}, {where} "
        f"&rarr; {_e(a['link'])}{_e(bandwidth)}{nested}</li>"
    )


def render_html(plan: Plan, title: str | None = None, top_k: int = 20) -> str:
    """The report as one HTML string."""
    d = explain_data(plan, top_k=top_k)
    pr = d["predicted"]
    parts = [
        f"<h1>{_e(title or 'autoplan: ' + d['model']['name'])}</h1>",
        f'<p class="oneline mono">{_e(d["plan"])}</p>',
        f"<p>{_e(d['model']['name'])} ({_e(fmt_params(d['model']['num_params']))}, "
        f"{d['model']['num_blocks']} blocks) on {_e(d['hardware'])}</p>",
    ]
    # layout
    items = []
    for a in d["mesh"]:
        if a["degree"] > 1 and a["part_of"] is None:
            parts = [
                _axis_item(p) for p in d["mesh"] if p["part_of"] == a["axis"] and p["degree"] > 1
            ]
            nested = f"<ul>{''.join(parts)}</ul>" if parts else ""  # HSDP: dp's two parts
            items.append(_axis_item(a, nested))
    stage_rows = [
        [
            (s["stage"], s["stage"]),
            (s["rank"], s["rank"]),
            (f"{s['first']}-{s['last']}", s["first"]),
            (f"{s['first_name']} .. {s['last_name']}", None),
            (s["recompute"], None),
        ]
        for s in d["stages"]
    ]
    dp = d["data_parallel"]
    parts += [
        "<h2>Layout</h2>",
        '<ul class="tree">',
        *items,
        f"<li>data parallel: <b>{_e(dp['sharding'])}</b>, optimizer offload {_e(dp['offload'])}</li>",
        f"<li>pipeline: {_e(d['pipeline']['schedule'])} (v={d['pipeline']['virtual_stages']}), "
        f"{d['pipeline']['num_micro_batches']} micro-batches of {d['pipeline']['micro_batch_size']}</li>",
        "</ul>",
        # long stage lists fold away so the charts stay near the top
        f"<details{' open' if len(stage_rows) <= 12 else ''}><summary>{len(stage_rows)} stage(s)</summary>"
        + _table(["stage", "pp rank", "blocks", "names", "recompute"], stage_rows)
        + "</details>",
    ]
    if pr:
        parts += [
            "<h2>Why: where the step time goes</h2>",
            f"<p>Step <b>{_e(fmt_s(pr['step_time_s']))}</b>, MFU <b>{pr['mfu']:.1%}</b> "
            f"(HFU {pr['hfu']:.1%}), {pr['samples_per_s']:.4g} samples/s, "
            f"{pr['tokens_per_s']:.4g} tokens/s, bubble {pr['bubble_fraction']:.1%}.</p>",
            _table(
                ["term", "time", "share"],
                [
                    [
                        (t["label"], None),
                        (fmt_s(t["seconds"]), t["seconds"]),
                        (f"{t['fraction']:.1%}", t["fraction"]),
                    ]
                    for t in pr["breakdown"]
                ],
            ),
            f'<div class="chart" id="breakdown-chart">{breakdown_svg(d)}</div>',
        ]
        if pr["comm"]:
            parts.append(
                _table(
                    ["axis", "volume", "time", "exposed"],
                    [
                        [
                            (a, None),
                            (fmt_bytes(c["volume_bytes"]), c["volume_bytes"]),
                            (fmt_s(c["time_s"]), c["time_s"]),
                            (fmt_s(c["exposed_s"]), c["exposed_s"]),
                        ]
                        for a, c in pr["comm"].items()
                    ],
                )
            )
        mem = pr["memory"]
        parts += [
            "<h2>Memory per device</h2>",
            f'<div class="chart" id="memory-chart">{memory_svg(d)}</div>',
            _table(
                ["category", "bytes", "of capacity"],
                [
                    [
                        (c["category"], None),
                        (fmt_bytes(c["bytes"]), c["bytes"]),
                        (f"{c['bytes'] / (mem['capacity_bytes'] or 1):.1%}", c["bytes"]),
                    ]
                    for c in mem["categories"]
                ],
            ),
        ]
        if not pr["fits"]:
            parts.append('<p class="bad"><b>Predicted not to fit in device memory.</b></p>')
        parts += [f"<p class='muted'>note: {_e(n)}</p>" for n in pr["notes"]]
    parts.append("<h2>Pipeline timeline</h2>")
    entries, why = tl.plan_timeline(plan)
    if entries:
        parts.append(f'<div class="chart" id="timeline-chart">{tl.timeline_svg(entries)}</div>')
    else:
        parts.append(f'<p class="muted">No timeline: {_e(why)}</p>')
    if d["alternatives"]:
        rows, classes = [], []
        for a in d["alternatives"]:
            delta = a["delta_s"]
            rows.append(
                [
                    (a["rank"], a["rank"]),
                    (a["change"], None),
                    (fmt_s(a["step_time_s"]), a["step_time_s"]),
                    (
                        "-" if delta is None else f"{delta:+.4g} s",
                        delta if delta is not None else "",
                    ),
                    (fmt_bytes(a["peak_memory_bytes"]), a["peak_memory_bytes"]),
                    ("yes" if a["fits"] else "no", None),
                    (a["note"], None),
                ]
            )
            classes.append("" if a["fits"] else "bad")
        parts += [
            "<h2>Alternatives</h2><p class='muted'>Click a column to sort.</p>",
            _table(
                ["#", "change", "step", "delta", "peak mem", "fits", "why it lost"],
                rows,
                "sortable",
                classes,
            ),
        ]
    if d["rejected"]:
        parts += [
            "<h2>Pruned from the search</h2>",
            _table(
                ["region", "count", "reason"],
                [
                    [(r["region"], None), (r["count"], r["count"]), (r["reason"], None)]
                    for r in d["rejected"]
                ],
                "sortable",
            ),
        ]
    data = json.dumps(d).replace("<", "\\u003c")  # nothing in the data can close the script
    body = "\n".join(parts)
    return (
        f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{_e(d['plan'])}</title><style>{CSS}</style></head><body>\n{body}\n"
        f"<script type='application/json' id='plan-data'>{data}</script>\n"
        f"<script>{SORT_JS}</script></body></html>\n"
    )


def write_html(plan: Plan, path: str | Path) -> Path:
    p = Path(path)
    p.write_text(render_html(plan), encoding="utf-8")
    return p
