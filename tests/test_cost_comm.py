"""Collectives: alpha-beta closed forms, ring vs tree, topology of mesh axes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cost_models import comm
from specs import HardwareSpec, LinkSpec

pytestmark = pytest.mark.tier1


def _hw(nodes: int = 1, eff: float = 1.0) -> HardwareSpec:
    hw = HardwareSpec.preset("dgx-a100-80gb", nodes=nodes)
    return hw.model_copy(update={"collective_efficiency": eff})


@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("size", [1e3, 1e6, 1e9])
def test_ring_all_reduce_closed_form(n, size):
    hw = _hw()
    link = comm.group_link(hw, n, 1)
    B, a = 3.0e11, 3.0e-6
    assert comm.ring_all_reduce_s(size, link) == pytest.approx(2 * (n - 1) / n * size / B + 2 * (n - 1) * a)
    assert comm.all_reduce_s(size, link) <= comm.ring_all_reduce_s(size, link)
    assert comm.all_gather_s(size, link) == pytest.approx((n - 1) / n * size / B + (n - 1) * a)
    assert comm.p2p_s(size, link) == pytest.approx(size / B + a)


def test_tree_wins_small_messages_on_many_ranks_ring_wins_large():
    hw = _hw(nodes=64)
    link = comm.group_link(hw, 64, 8)  # dp across 64 nodes, one rank per node
    assert comm.tree_all_reduce_s(1e3, link) < comm.ring_all_reduce_s(1e3, link)
    assert comm.ring_all_reduce_s(1e10, link) < comm.tree_all_reduce_s(1e10, link)


def test_topology_inside_node_and_across_nodes():
    hw = _hw(nodes=4, eff=1.0)
    tp = comm.group_link(hw, 8, 1)
    assert not tp.crosses_nodes and tp.bandwidth_bytes_per_s == 3.0e11
    # dp group with tp=8: one member per node, shares the node's NICs with 7 other groups
    dp = comm.group_link(hw, 4, 8)
    assert dp.crosses_nodes and dp.members_per_node == 1
    assert dp.bandwidth_bytes_per_s == pytest.approx(2.0e11 / 8)
    # dp group with tp=1 spanning all 32 devices: 8 members per node, the node's whole NIC bandwidth
    dp32 = comm.group_link(hw, 32, 1)
    assert dp32.members_per_node == 8 and dp32.num_nodes == 4
    assert dp32.bandwidth_bytes_per_s == pytest.approx(2.0e11)
    # p2p between pipeline ranks in different nodes: one device's share of the NICs
    assert comm.p2p_link(hw, 8).bandwidth_bytes_per_s == pytest.approx(2.0e11 / 8)
    assert comm.p2p_link(hw, 2).bandwidth_bytes_per_s == pytest.approx(3.0e11)


def test_collective_efficiency_scales_bandwidth():
    a = comm.all_reduce_s(1e9, comm.group_link(_hw(eff=1.0), 8, 1))
    b = comm.all_reduce_s(1e9, comm.group_link(_hw(eff=0.5), 8, 1))
    assert b > 1.9 * a


def test_bucketed_all_reduce_sums_buckets():
    link = comm.group_link(_hw(), 8, 1)
    tot, last = comm.bucketed_all_reduce_s(100e6, link, 25e6)
    assert tot == pytest.approx(4 * comm.all_reduce_s(25e6, link))
    assert last == pytest.approx(comm.all_reduce_s(25e6, link))
    assert comm.all_reduce_s(1e6, comm.group_link(_hw(), 1, 1)) == 0.0


@settings(max_examples=60, deadline=None)
@given(bw=st.floats(1e8, 1e12), factor=st.floats(1.0, 10.0), size=st.floats(1.0, 1e10),
       n=st.sampled_from([2, 3, 8, 16, 64]), stride=st.sampled_from([1, 2, 8, 16]))
def test_more_bandwidth_never_slower(bw, factor, size, n, stride):
    base = HardwareSpec.preset("dgx-a100-80gb", nodes=16)
    slow = base.model_copy(update={"intra_node": LinkSpec(bandwidth_bytes_per_s=bw, latency_s=3e-6),
                                   "inter_node": LinkSpec(bandwidth_bytes_per_s=bw, latency_s=5e-6)})
    fast = base.model_copy(update={"intra_node": LinkSpec(bandwidth_bytes_per_s=bw * factor, latency_s=3e-6),
                                   "inter_node": LinkSpec(bandwidth_bytes_per_s=bw * factor, latency_s=5e-6)})
    for fn in (comm.all_reduce_s, comm.all_gather_s, comm.reduce_scatter_s, comm.all_to_all_s, comm.broadcast_s):
        assert fn(size, comm.group_link(fast, n, stride)) <= fn(size, comm.group_link(slow, n, stride)) * (1 + 1e-12)
