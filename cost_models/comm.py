"""Collective communication times: an alpha-beta model on a two-level (node / network) topology.

Bus-bandwidth convention (nccl-tests, doc/PERFORMANCE.md): a link's bandwidth B is compared
with the collective's *bus bandwidth*, so for a message of S bytes over n ranks

    all-reduce      ring: 2(n-1)/n * S/B + 2(n-1) * alpha
                    tree: 2 * S/B + 2 * ceil(log2 n) * alpha   (NCCL double binary tree)
    all-gather      ring: (n-1)/n * S/B + (n-1) * alpha          (S = the gathered size)
    reduce-scatter  ring: (n-1)/n * S/B + (n-1) * alpha          (S = the unreduced size)
    all-to-all      (n-1)/n * S/B + (n-1) * alpha                (S = one rank's send buffer)
    broadcast       ring (pipelined): S/B + (n-1) * alpha;  tree: S/B + ceil(log2 n) * alpha
    p2p             S/B + alpha

and the better of ring and tree is taken where both exist. B = link bandwidth x
`hw.collective_efficiency` (the achieved fraction of link peak for large messages).

Per-collective calibration. Implementations reach very different fractions of the link per
collective (gloo on CPU: reduce-scatter ~1/3 of all-reduce's bus bandwidth), so one (alpha, B)
for all is off by x2.5 there. `hw.collectives[name]` (from `autoplan calibrate`: alpha-beta fits
of each collective with the ring conventions above) gives (alpha, B) for that collective in
groups inside one node; there the collective uses exactly the formula it was fitted with (ring;
broadcast pipelined ring; p2p) and B is already the achieved bus bandwidth. A collective not
listed, and every group that crosses nodes, uses the links as above.

Topology. Ranks are laid out `rank = (pp_i * dp + dp_i) * tp + tp_i`: tp innermost (inside a
node), then dp, then pp. A group of `size` ranks at `stride` apart therefore has
`members_per_node = min(size, devices_per_node // stride)` members in each node it touches:
- inside one node it uses the intra-node link (NVLink/NVSwitch): B = intra bandwidth;
- spanning nodes, every step of the ring crosses the network (alpha = inter-node latency), and
  the node's NIC bandwidth is shared by all devices of the node, because every other group of
  the same axis runs the same collective at the same time (SPMD): the group's share of its
  node's NICs is `inter_bw * members_per_node / devices_per_node`, and B = min(intra, that).
  With 8 members per node this gives nccl-tests' multi-node busbw ~ the node's NIC total;
  with 1 member per node (e.g. dp across nodes with tp=8) each rank gets one NIC's worth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from specs import HardwareSpec


@dataclass(frozen=True, slots=True)
class GroupLink:
    """A communication group as the cost model sees it."""

    size: int
    bandwidth_bytes_per_s: float  # effective bus bandwidth for this group's collectives
    latency_s: float  # alpha per step
    num_nodes: int
    members_per_node: int
    per_collective: tuple[tuple[str, float, float], ...] = ()  # (name, bus B, alpha), calibrated

    def figures(self, name: str) -> tuple[float, float, bool]:
        """(bandwidth, alpha, calibrated) for collective `name` on this group."""
        for nm, bw, alpha in self.per_collective:
            if nm == name:
                return bw, alpha, True
        return self.bandwidth_bytes_per_s, self.latency_s, False

    @property
    def crosses_nodes(self) -> bool:
        return self.num_nodes > 1


def _calibrated(hw: HardwareSpec) -> tuple[tuple[str, float, float], ...]:
    return tuple((k, v.bandwidth_bytes_per_s, v.latency_s) for k, v in sorted(hw.collectives.items()))


def group_link(hw: HardwareSpec, size: int, stride: int) -> GroupLink:
    """The link a group of `size` ranks, `stride` apart in rank order, communicates over."""
    dpn = hw.devices_per_node
    eff = hw.collective_efficiency
    if size <= 1:
        return GroupLink(1, hw.intra_node.bandwidth_bytes_per_s * eff, 0.0, 1, 1)
    per_node = max(1, min(size, dpn // stride)) if stride < dpn else 1
    num_nodes = math.ceil(size / per_node)
    if num_nodes == 1:
        return GroupLink(size, hw.intra_node.bandwidth_bytes_per_s * eff, hw.intra_node.latency_s, 1, per_node,
                         _calibrated(hw))
    share = hw.inter_node.bandwidth_bytes_per_s * per_node / dpn
    bw = min(hw.intra_node.bandwidth_bytes_per_s, share) if per_node > 1 else share
    return GroupLink(size, bw * eff, hw.inter_node.latency_s, num_nodes, per_node)


def p2p_link(hw: HardwareSpec, stride: int) -> GroupLink:
    """Point-to-point between ranks `stride` apart (pipeline neighbours): inside a node when
    both sit in it, else over the network at one device's share of the node's NICs (all
    devices of a node send their stage boundary at once)."""
    eff = hw.collective_efficiency
    if stride < hw.devices_per_node:
        return GroupLink(2, hw.intra_node.bandwidth_bytes_per_s * eff, hw.intra_node.latency_s, 1, 2,
                         _calibrated(hw))
    bw = hw.inter_node.bandwidth_bytes_per_s / hw.devices_per_node
    return GroupLink(2, bw * eff, hw.inter_node.latency_s, 2, 1)


# --------------------------------------------------------------------------- collectives


def ring_all_reduce_s(n_bytes: float, link: GroupLink) -> float:
    n = link.size
    if n <= 1 or n_bytes <= 0:
        return 0.0
    return 2 * (n - 1) / n * n_bytes / link.bandwidth_bytes_per_s + 2 * (n - 1) * link.latency_s


def tree_all_reduce_s(n_bytes: float, link: GroupLink) -> float:
    n = link.size
    if n <= 1 or n_bytes <= 0:
        return 0.0
    return 2 * n_bytes / link.bandwidth_bytes_per_s + 2 * math.ceil(math.log2(n)) * link.latency_s


def all_reduce_s(n_bytes: float, link: GroupLink) -> float:
    """All-reduce of `n_bytes` per rank: the better of ring and tree (calibrated: ring, as fitted)."""
    n = link.size
    if n <= 1 or n_bytes <= 0:
        return 0.0
    bw, alpha, cal = link.figures("all_reduce")
    if cal:
        return 2 * (n - 1) / n * n_bytes / bw + 2 * (n - 1) * alpha
    return min(ring_all_reduce_s(n_bytes, link), tree_all_reduce_s(n_bytes, link))


def _ring_one_pass_s(n_bytes: float, link: GroupLink, name: str) -> float:
    n = link.size
    if n <= 1 or n_bytes <= 0:
        return 0.0
    bw, alpha, _ = link.figures(name)
    return (n - 1) / n * n_bytes / bw + (n - 1) * alpha


def all_gather_s(n_bytes: float, link: GroupLink) -> float:
    """All-gather producing `n_bytes` (the full, gathered size) on every rank; ring."""
    return _ring_one_pass_s(n_bytes, link, "all_gather")


def reduce_scatter_s(n_bytes: float, link: GroupLink) -> float:
    """Reduce-scatter of `n_bytes` (the full, unreduced size) per rank; ring."""
    return _ring_one_pass_s(n_bytes, link, "reduce_scatter")


def all_to_all_s(n_bytes: float, link: GroupLink) -> float:
    """All-to-all where each rank sends `n_bytes` in all (1/n of it stays local)."""
    return _ring_one_pass_s(n_bytes, link, "all_to_all")


def broadcast_s(n_bytes: float, link: GroupLink) -> float:
    """Broadcast of `n_bytes` from one rank: pipelined ring or tree, whichever is better
    (calibrated: pipelined ring, as fitted)."""
    n = link.size
    if n <= 1 or n_bytes <= 0:
        return 0.0
    bw, alpha, cal = link.figures("broadcast")
    steps = n - 1 if cal else min(n - 1, math.ceil(math.log2(n)))
    return n_bytes / bw + steps * alpha


def p2p_s(n_bytes: float, link: GroupLink) -> float:
    """One send of `n_bytes` to a neighbour."""
    if n_bytes <= 0:
        return 0.0
    bw, alpha, _ = link.figures("p2p")
    return n_bytes / bw + alpha


# Bytes each rank sends for one collective of S bytes over n ranks (the per-axis volume figure).
def all_reduce_volume_bytes(n_bytes: float, n: int) -> float:
    return 2 * (n - 1) / n * n_bytes if n > 1 else 0.0


def all_gather_volume_bytes(n_bytes: float, n: int) -> float:
    return (n - 1) / n * n_bytes if n > 1 else 0.0


def bucketed_all_reduce_s(n_bytes: float, link: GroupLink, bucket_bytes: float) -> tuple[float, float]:
    """DDP-style all-reduce in buckets: (total time, time of the last bucket)."""
    if n_bytes <= 0 or link.size <= 1:
        return 0.0, 0.0
    full, rest = divmod(n_bytes, bucket_bytes)
    t_full = all_reduce_s(bucket_bytes, link) if full else 0.0
    t_rest = all_reduce_s(rest, link) if rest else 0.0
    last = t_rest if rest else t_full
    return full * t_full + t_rest, last


def bucketed_reduce_scatter_s(n_bytes: float, link: GroupLink, bucket_bytes: float) -> tuple[float, float]:
    """Reduce-scatter in buckets: (total time, time of the last bucket)."""
    if n_bytes <= 0 or link.size <= 1:
        return 0.0, 0.0
    full, rest = divmod(n_bytes, bucket_bytes)
    t_full = reduce_scatter_s(bucket_bytes, link) if full else 0.0
    t_rest = reduce_scatter_s(rest, link) if rest else 0.0
    return full * t_full + t_rest, (t_rest if rest else t_full)
