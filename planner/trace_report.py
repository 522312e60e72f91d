"""The block table of a traced model (rich), as printed by `autoplan trace MODEL`.

Consecutive blocks of the same layer type are one row (`layers.0 .. layers.95`, count 96).
Columns: block range, layer type (with attention heads), count, parameters per block, forward
GFLOPs per sample, saved activation MiB per sample (per block), boundary MiB per sample (bytes
leaving the block), and the tensor-parallel candidates (kind/divisor; attn = attention).
"""

from __future__ import annotations

import io

from rich.console import Console
from rich.table import Table

from specs import ModelGraph

MiB = 2**20


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _runs(graph: ModelGraph) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for i, b in enumerate(graph.blocks):
        if runs and graph.blocks[runs[-1][1]].layer_type == b.layer_type and runs[-1][1] == i - 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


_SHORT = {"attention": "attn", "vocab_embedding": "vocab_emb", "output_head": "out_head"}


def _tp_text(lt) -> str:
    parts = [f"{_SHORT.get(c.kind, c.kind)}/{c.divisor}" for c in lt.tp_candidates]
    text = ", ".join(dict.fromkeys(parts))
    return text or "-"


def render_block_table(graph: ModelGraph) -> Table:
    """A rich Table of the graph's blocks, grouped into runs of one layer type."""
    cut_after = {c.after_block for c in graph.cut_points}
    title = (f"{graph.name}: {_human(graph.num_params)} params, {graph.num_blocks} blocks, "
             f"{len(graph.layer_types)} layer types, traced by {graph.traced_by} in "
             f"{graph.trace_time_s:.2f} s ({graph.activation_dtype} activations)")
    t = Table(title=title, title_justify="left")
    for col, just in (("blocks", "left"), ("type", "left"), ("n", "right"), ("params", "right"),
                      ("GFLOP", "right"), ("saved MiB", "right"),
                      ("out MiB", "right"), ("TP (kind/divisor)", "left")):
        text_col = just == "left"
        t.add_column(col, justify=just, overflow="fold", no_wrap=not text_col,
                     min_width=18 if col.startswith("TP") else None, ratio=1 if text_col else None)
    for first, last in _runs(graph):
        b0, b1 = graph.blocks[first], graph.blocks[last]
        lt = graph.layer(first)
        name = b0.name if first == last else f"{b0.name} .. {b1.name}"
        heads = f" ({lt.num_heads}h)" if lt.num_heads else ""
        t.add_row(
            name + ("" if last in cut_after or last == graph.num_blocks - 1 else " (no cut)"),
            lt.name + heads,
            str(last - first + 1),
            _human(lt.num_params),
            f"{lt.fwd_flops_per_sample / 1e9:.3f}",
            f"{lt.saved_bytes_per_sample / MiB:.2f}",
            f"{lt.output_bytes_per_sample / MiB:.2f}",
            _tp_text(lt),
        )
    t.caption = (f"GFLOP (forward), saved and output MiB: per sample and per block, linear in "
                 f"micro-batch size; "
                 f"{len(graph.cut_points)} pipeline cut points; "
                 + (f"tied blocks {graph.tied_blocks} ({graph.tied_param_bytes / MiB:.1f} MiB)"
                    if graph.tied_blocks else "no tied parameters"))
    return t


def block_table_text(graph: ModelGraph, width: int = 100) -> str:
    """The block table rendered as plain text, `width` columns wide."""
    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None, force_terminal=False).print(render_block_table(graph))
    return buf.getvalue()
