"""Pipeline cut points from the dataflow graph (networkx).

Nodes are the graph's ops and placeholders (get_attr parameters are state, not dataflow), each
labelled with its block index (placeholders: -1). A pipeline stage may end after block i when
the edges crossing the cut all go forward: no tensor produced after block i is consumed at or
before it (an edge v -> u with block(v) > block(u) invalidates every cut in
[block(u), block(v) - 1]). The bytes crossing the cut are the tensors produced at or before
block i and consumed after it, each counted once however many later blocks read it; tensors
that do not depend on the model inputs (masks or tables built from buffers) are constant in the
batch, can be rebuilt by every stage, and are left out of the per-sample figure.

So a residual network's skip connections inside a Bottleneck never cross a cut between blocks,
and a value that many later blocks read (HF Llama's rotary cos/sin, an attention mask built from
the inputs) counts at every cut it spans.
"""

from __future__ import annotations

import networkx as nx
import torch
from torch import fx
from torch.utils._pytree import tree_flatten

from specs import CutPoint


def dataflow_graph(gm: fx.GraphModule, assign: dict[fx.Node, int]) -> nx.DiGraph:
    g = nx.DiGraph()
    for n in gm.graph.nodes:
        if n in assign:
            g.add_node(n, block=assign[n])
    for n in gm.graph.nodes:
        if n not in assign:
            continue
        for u in n.users:
            if u in assign:
                g.add_edge(n, u)
    return g


def input_dependent_nodes(g: nx.DiGraph, values: dict) -> set[fx.Node]:
    """Nodes whose tensors are computed from tensor inputs of the model (scale with the batch).

    Dependence flows only through tensor values: `x.shape[1]` used to slice a causal-mask buffer
    does not make the mask input-dependent."""
    out: set[fx.Node] = set()
    for n in nx.topological_sort(g):
        v = values.get(n)
        has_tensor = any(isinstance(t, torch.Tensor) for t in tree_flatten(v)[0])
        if not has_tensor:
            continue
        if n.op == "placeholder" or any(p in out for p in g.predecessors(n)):
            out.add(n)
    return out


def find_cut_points(
    g: nx.DiGraph, num_blocks: int, values: dict, input_dependent: set[fx.Node], batch: int
) -> list[CutPoint]:
    crossing = [0.0] * max(num_blocks - 1, 0)
    invalid = [False] * max(num_blocks - 1, 0)
    for n in g.nodes:
        b = g.nodes[n]["block"]
        later = [g.nodes[u]["block"] for u in g.successors(n)]
        if not later:
            continue
        for lb in later:
            if lb < b:  # backward edge: cuts in [lb, b-1] would cut a cycle
                for i in range(max(lb, 0), min(b, num_blocks - 1)):
                    invalid[i] = True
        last = max(later)
        if last <= b or n not in input_dependent:
            continue
        nbytes = sum(t.numel() * t.element_size() for t in tree_flatten(values.get(n))[0]
                     if isinstance(t, torch.Tensor))
        for i in range(max(b, 0), min(last, num_blocks - 1)):
            crossing[i] += nbytes / batch
    return [CutPoint(after_block=i, bytes_per_sample=crossing[i])
            for i in range(num_blocks - 1) if not invalid[i]]
