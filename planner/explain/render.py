"""Terminal rendering of an explanation with rich (plain text when the output is not a terminal).

`render_explain(plan, console)` prints, in order: the plan in one line and as a tree (mesh axes
-> the link each uses, data/tensor parallel settings, stages -> block ranges); why (step time
term by term, MFU, throughput, communication per axis); memory of the worst rank by category
against capacity (a bar); the pipeline timeline as a text chart; the top alternatives with
their deltas and the rejected regions of the search. Every figure is read from
`report.explain_data(plan)`, i.e. from the planner's records. Tables are sized to fit the
console width (100 columns is the bar the tests hold it to).
"""

from __future__ import annotations

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from planner.explain import timeline as tl
from planner.explain.report import explain_data, fmt_bytes, fmt_count, fmt_params, fmt_rate, fmt_s
from specs import Plan

MEM_COLORS = ["magenta", "cyan", "yellow", "blue", "green", "red", "bright_magenta", "bright_cyan"]
MEM_CHARS = "#%@*+=o~"


def make_console(width: int | None = None, file=None, color: bool | None = None) -> Console:
    """A console for the CLI: real width on a terminal, 100 columns otherwise."""
    kw = {"width": width} if width else {}
    if file is not None:
        kw["file"] = file
    if color is False:
        kw["no_color"] = True
        kw["force_terminal"] = False
    con = Console(highlight=False, soft_wrap=False, **kw)
    if not width and not con.is_terminal:
        con = Console(
            highlight=False, soft_wrap=False, width=100, **({"file": file} if file else {})
        )
    return con


def _section(console: Console, title: str) -> None:
    console.print()
    console.print(Text(title, style="bold underline"))


def _axis_line(a: dict) -> str:
    """`dp=16  rank stride 8, spans 16 nodes -> InfiniBand across nodes (25 GB/s)`."""
    where = f"spans {a['num_nodes_spanned']} nodes" if a["spans_nodes"] else "inside one node"
    bandwidth = f" ({fmt_rate(a['bandwidth_bytes_per_s'])})" if a["bandwidth_bytes_per_s"] else ""
    return (
        f"{a['axis']}={a['degree']}  rank stride {a['stride']}, {where} -> {a['link']}{bandwidth}"
    )


def plan_tree(d: dict) -> Tree:
    axes = {a["axis"]: a for a in d["mesh"]}
    world = d["num_devices"]
    root = Tree(Text("layout", style="bold"))
    cp = f" x cp={axes['cp']['degree']}" if "cp" in axes else ""
    mesh = root.add(
        f"mesh pp={axes['pp']['degree']} x dp={axes['dp']['degree']}{cp} x tp={axes['tp']['degree']} = "
        f"{world} devices"
    )
    for axis in ("tp", "cp", "dp", "pp") if cp else ("tp", "dp", "pp"):
        a = axes[axis]
        if a["degree"] == 1:
            mesh.add(Text(f"{axis}=1  (not used)", style="dim"))
            continue
        node = mesh.add(_axis_line(a))
        for part in d["mesh"]:  # HSDP: dp_shard and dp_replicate under dp
            if part["part_of"] == axis and part["degree"] > 1:
                node.add(_axis_line(part))
    dp = d["data_parallel"]
    sharding = dp["sharding"]
    what = {
        "none": "DDP, replicated",
        "zero1": "ZeRO-1: optimizer states sharded",
        "zero2": "ZeRO-2: optimizer states + gradients sharded",
        "zero3": "ZeRO-3/FSDP: states, gradients, parameters sharded",
        "hsdp": f"HSDP: sharded in groups of {dp.get('hsdp_shard_size')}, replicated across",
    }[sharding]
    root.add(f"data parallel: {sharding} ({what}); optimizer offload: {dp['offload']}")
    cp_degree = d["knobs"].get("cp", 1)
    if cp_degree > 1:
        root.add(
            f"context parallel: cp={cp_degree}: each sample's tokens split over {cp_degree} ranks "
            f"(2 x {cp_degree} load-balanced causal chunks); attention all-gathers keys and values "
            f"among them (torch's context_parallel); gradients average over dp x cp"
        )
    ep = d["knobs"].get("ep", 1)
    if ep > 1:
        root.add(
            f"expert parallel: ep={ep} of the dp ranks share each MoE layer's experts (1/{ep} each); "
            f"tokens reach them by all-to-all (dispatch + combine, forward and backward); their "
            f"gradients sync over the {axes['dp']['degree'] // ep} copies (expert_dp)"
        )
    tp = d["tensor_parallel"]
    if axes["tp"]["degree"] > 1:
        extra = [
            n
            for n, on in (
                ("sequence parallel", tp["sequence_parallel"]),
                ("loss parallel", tp["loss_parallel"]),
            )
            if on
        ]
        counts: dict[str, int] = {}
        for style in tp["styles"].values():
            counts[style] = counts.get(style, 0) + 1
        styles = f"{len(tp['styles'])} module patterns"
        root.add(
            f"tensor parallel: {', '.join(extra) or 'plain Megatron splits'}"
            + (f"; {styles}" if tp["styles"] else "")
        )
    p = d["pipeline"]
    sched = p["schedule"] + (f" (v={p['virtual_stages']})" if p["virtual_stages"] > 1 else "")
    pipe = root.add(
        f"pipeline: {sched if axes['pp']['degree'] > 1 else 'none'}; {p['num_micro_batches']} "
        f"micro-batch(es) of {p['micro_batch_size']} per replica"
    )
    stages = d["stages"]
    shown = stages if len(stages) <= 12 else stages[:6] + stages[-5:]
    for i, s in enumerate(shown):
        if len(stages) > 12 and i == 6:
            pipe.add(Text(f"... {len(stages) - 11} more stages", style="dim"))
        names = f" ({s['first_name']} .. {s['last_name']})" if s["first_name"] else ""
        chunk = f", chunk {s['chunk']}" if p["virtual_stages"] > 1 else ""
        pipe.add(
            f"stage {s['stage']} on pp rank {s['rank']}{chunk}: blocks {s['first']}-{s['last']}"
            f"{names}, recompute {s['recompute']}"
        )
    return root


def why_table(d: dict) -> Table:
    prediction = d["predicted"]
    t = Table(
        title=f"step time {fmt_s(prediction['step_time_s'])}, term by term", title_justify="left"
    )
    t.add_column("term")
    t.add_column("time", justify="right")
    t.add_column("share", justify="right")
    t.add_column("", min_width=10, max_width=40)
    for row in prediction["breakdown"]:
        bar = "#" * max(0, round(row["fraction"] * 40))
        t.add_row(
            row["label"], fmt_s(row["seconds"]), f"{row['fraction']:.1%}", Text(bar, style="cyan")
        )
    return t


def comm_table(d: dict) -> Table | None:
    comm = d["predicted"]["comm"]
    if not comm:
        return None
    axes = {a["axis"]: a for a in d["mesh"]}
    t = Table(title="communication per mesh axis, per device per step", title_justify="left")
    for col in ("axis", "link", "volume", "time", "exposed"):
        t.add_column(col, justify="left" if col in ("axis", "link") else "right")
    for axis, c in comm.items():
        link = axes[axis]["link"] if axis in axes else "-"
        t.add_row(
            axis, link, fmt_bytes(c["volume_bytes"]), fmt_s(c["time_s"]), fmt_s(c["exposed_s"])
        )
    return t


def memory_bar(mem: dict, width: int = 60) -> Text:
    """A stacked bar of the worst rank's memory by category; its full length is the capacity."""
    cap = mem["capacity_bytes"] or 1.0
    text = Text("[")
    used = 0
    for i, c in enumerate(mem["categories"]):
        n = round(c["bytes"] / cap * width)
        n = min(n, width - used)
        text.append(MEM_CHARS[i % len(MEM_CHARS)] * n, style=MEM_COLORS[i % len(MEM_COLORS)])
        used += n
    text.append("." * max(0, width - used), style="dim")
    text.append(f"] {fmt_bytes(mem['peak_bytes'])} of {fmt_bytes(cap)}")
    return text


def memory_table(d: dict) -> Table:
    mem = d["predicted"]["memory"]
    t = Table(
        title=f"memory of the worst rank (pp stage {mem['worst_rank_stage']})", title_justify="left"
    )
    t.add_column("")
    t.add_column("category")
    t.add_column("bytes", justify="right")
    t.add_column("of capacity", justify="right")
    cap = mem["capacity_bytes"] or 1.0
    for i, c in enumerate(mem["categories"]):
        t.add_row(
            Text(MEM_CHARS[i % len(MEM_CHARS)], style=MEM_COLORS[i % len(MEM_COLORS)]),
            c["category"],
            fmt_bytes(c["bytes"]),
            f"{c['bytes'] / cap:.1%}",
        )
    t.add_row(
        "",
        Text("peak", style="bold"),
        fmt_bytes(mem["peak_bytes"]),
        f"{mem['peak_bytes'] / cap:.1%}",
    )
    free = mem["free_bytes"]
    t.add_row(
        "",
        "free" if free >= 0 else Text("OVER capacity", style="bold red"),
        fmt_bytes(free),
        f"{free / cap:.1%}",
    )
    return t


def alternatives_table(d: dict) -> Table:
    t = Table(
        title=f"top alternatives (of {d['num_alternatives']} recorded), vs this plan",
        title_justify="left",
    )
    t.add_column("#", justify="right")
    t.add_column("change", max_width=30, overflow="fold")
    t.add_column("step", justify="right")
    t.add_column("delta", justify="right")
    t.add_column("peak mem", justify="right")
    t.add_column("why it lost", overflow="fold")
    for a in d["alternatives"]:
        delta = (
            "-"
            if a["delta_s"] is None
            else f"{'+' if a['delta_s'] >= 0 else ''}{fmt_s(a['delta_s'])}"
        )
        if a["delta_fraction"] is not None:
            delta += f" ({a['delta_fraction']:+.0%})"
        note = a["note"] or ("does not fit" if not a["fits"] else "")
        t.add_row(
            str(a["rank"]),
            a["change"],
            fmt_s(a["step_time_s"]),
            delta,
            Text(fmt_bytes(a["peak_memory_bytes"]), style="" if a["fits"] else "red"),
            note,
        )
    return t


def rejected_table(d: dict, max_rows: int = 12) -> Table:
    """The pruned regions: named baselines (regions whose name is not a knob, e.g. the primer's
    layer-wise model parallelism) always, then the largest regions, in the planner's order, up to max_rows."""
    rows = d["rejected"]
    keep = {i for i, r in enumerate(rows) if "=" not in (r["region"].split() or [""])[0]}
    by_count = sorted(range(len(rows)), key=lambda i: -rows[i]["count"])
    for i in by_count:
        if len(keep) >= max_rows:
            break
        keep.add(i)
    t = Table(title=f"pruned from the search ({len(rows)} regions)", title_justify="left")
    t.add_column("region", max_width=24, overflow="fold")
    t.add_column("count", justify="right")
    t.add_column("reason", overflow="fold")
    for i in sorted(keep):
        r = rows[i]
        t.add_row(r["region"], str(r["count"]), r["reason"])
    if len(keep) < len(rows):
        t.caption = (
            f"{len(rows) - len(keep)} smaller regions not shown (all in --format json and --html)"
        )
        t.caption_justify = "left"
    return t


def timeline_text(plan: Plan, width: int) -> Group | Text:
    entries, why = tl.plan_timeline(plan)
    if not entries:
        return Text(f"(no timeline: {why})", style="dim")
    lines = tl.text_chart(entries, width=width)
    out = [Text(lines[0], style="dim")]
    for line in lines[1:-1]:
        label, _, cells = line.partition("|")
        t = Text(label + "|")
        for ch in cells:
            key = next((a for a, f in tl.FILL.items() if f == ch), ch if ch in "FBW.#" else None)
            t.append(ch, style=tl.STYLES.get(key or "", ""))
        out.append(t)
    out.append(Text(lines[-1], style="dim"))
    return Group(*out)


def render_explain(plan: Plan, console: Console, top_k: int = 5) -> dict:
    """Print the whole explanation; returns the data it rendered."""
    d = explain_data(plan, top_k=top_k)
    width = console.width
    console.print(Text("plan  ", style="bold") + Text(d["plan"], style="bold cyan"))
    console.print(
        f"      {d['model']['name']} ({fmt_params(d['model']['num_params'])}, "
        f"{d['model']['num_blocks']} blocks) on {d['hardware']}",
        overflow="fold",
    )
    prediction = d["predicted"]
    if prediction:
        memory = prediction["memory"]
        console.print(
            f"      predicted {fmt_s(prediction['step_time_s'])}/step, "
            f"MFU {prediction['mfu']:.1%}, {fmt_bytes(memory['peak_bytes'])} peak of "
            f"{fmt_bytes(memory['capacity_bytes'])}"
        )
    console.print(plan_tree(d))
    if prediction is None:
        console.print(
            Text("This plan carries no prediction; re-plan it to get one.", style="yellow")
        )
    else:
        _section(console, "Why: where the step time goes")
        console.print(why_table(d))
        mfu = (
            f"MFU {prediction['mfu']:.1%} (HFU {prediction['hfu']:.1%}, "
            f"{fmt_count(prediction['model_flops_per_step'])}FLOP of model work per step); "
            f"throughput {prediction['samples_per_s']:.4g} samples/s, "
            f"{fmt_count(prediction['tokens_per_s'])} tokens/s; "
            f"bubble {prediction['bubble_fraction']:.1%} of the step"
        )
        console.print(mfu)
        comm = comm_table(d)
        if comm is not None:
            console.print(comm)
        _section(console, "Memory per device")
        console.print(memory_bar(prediction["memory"], width=min(60, width - 25)))
        console.print(memory_table(d))
        per = prediction["memory"]["per_stage_bytes"]
        if len(per) > 1:
            console.print(
                "peak per pp rank: " + ", ".join(fmt_bytes(b) for b in per), overflow="fold"
            )
        if not prediction["fits"]:
            console.print(
                Text("This plan is predicted NOT to fit in device memory.", style="bold red")
            )
        for note in prediction["notes"]:
            console.print(Text(f"note: {note}", style="italic"), overflow="fold")
    _section(console, "Pipeline timeline (one step)")
    console.print(timeline_text(plan, width))
    if d["alternatives"]:
        _section(console, "Alternatives")
        console.print(alternatives_table(d))
    if d["rejected"]:
        console.print(rejected_table(d))
    if d["search"]:
        s = d["search"]
        console.print(
            Text(
                f"search: {s['candidates_scored']} candidates scored, {s['candidates_pruned']} pruned, "
                f"{s['search_time_s']:.2f} s (trace {s['trace_time_s']:.2f} s)",
                style="dim",
            )
        )
    return d


VERDICTS = {
    "invalid": ("cannot be built", "bold red"),
    "does_not_fit": ("does not fit", "bold red"),
    "slower": ("slower", "yellow"),
    "faster": ("faster", "green"),
    "same": ("the same", ""),
}


def render_why_not(d: dict, console: Console) -> None:
    """Print a `whynot.why_not` answer: verdict, reason, and the term-by-term table."""
    word, style = VERDICTS.get(d["verdict"], (d["verdict"], ""))
    console.print(Text("plan     ", style="bold") + Text(d["plan"]))
    console.print(Text("why not  ", style="bold") + Text(d["asked"] or ""))
    if d["knobs"]:
        console.print(Text("   -> ", style="dim") + Text(d["knobs"]), overflow="fold")
    console.print(
        Text("verdict  ", style="bold") + Text(word, style=style) + Text(f": {d['reason']}"),
        overflow="fold",
    )
    for rec in d["records"]:
        console.print(Text(f"record   {rec}", style="italic"), overflow="fold")
    if not d["terms"]:
        return
    t = Table(title="term by term (the planner's cost model)", title_justify="left")
    for col in ("term", "plan", "why-not", "delta"):
        t.add_column(col, justify="left" if col == "term" else "right")
    for r in d["terms"]:
        delta = r["delta_s"]
        ds = "" if abs(delta) < 1e-12 else ("+" if delta > 0 else "") + fmt_s(delta)
        st = "red" if delta > 1e-12 else ("green" if delta < -1e-12 else "")
        bold = "bold " if r["term"] == "step_time" else ""
        t.add_row(
            Text(r["label"], style=bold),
            fmt_s(r["plan_s"]),
            fmt_s(r["other_s"]),
            Text(ds, style=bold + st),
        )
    b, o = d["base"], d["other"]
    t.add_row("MFU", f"{b['mfu']:.1%}", f"{o['mfu']:.1%}", f"{o['mfu'] - b['mfu']:+.1%}")
    t.add_row(
        "peak memory",
        fmt_bytes(b["peak_memory_bytes"]),
        fmt_bytes(o["peak_memory_bytes"]),
        Text(
            ("+" if o["peak_memory_bytes"] >= b["peak_memory_bytes"] else "")
            + fmt_bytes(o["peak_memory_bytes"] - b["peak_memory_bytes"]),
            style="red" if not o["fits"] else "",
        ),
    )
    t.add_row(
        "capacity", fmt_bytes(b["memory_capacity_bytes"]), fmt_bytes(o["memory_capacity_bytes"]), ""
    )
    console.print(t)
