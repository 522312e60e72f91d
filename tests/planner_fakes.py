"""A stand-in cost model and small synthetic graphs for testing the planner's search on its own.

FakeBackend implements the planner's Backend protocol (planner.scoring) with simple closed forms
that have the features the search must cope with: micro-batch efficiency, tp communication,
data-parallel traffic by sharding, pipeline bubbles by schedule, per-stage recompute, and a
memory model that differs from the partition DP's (a transient term and its own in-flight counts)
so that the search's re-partitioning is exercised. It is NOT the project's cost model; brute-force
tests against the real one live beside these.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from planner.scoring import BlockProfile
from specs import (
    Block,
    CutPoint,
    HardwareSpec,
    Knobs,
    LayerType,
    ModelGraph,
    TPCandidate,
    TrainSpec,
)


def toy_graph(num_layers: int = 6, hidden: int = 256, heads: int = 8, vocab: int = 1024, seq: int = 128,
              cut_every: int = 1, name: str = "toy") -> ModelGraph:
    """embed -> layers.0..L-1 -> head, with transformer-like numbers (fp32 bytes, one sample)."""
    h, s = hidden, seq
    layer_params = 12 * h * h
    layer = LayerType(
        name="layer", module_type="Block", num_params=layer_params, param_bytes=4 * layer_params,
        fwd_flops_per_sample=2 * layer_params * s + 4 * s * s * h,
        bwd_flops_per_sample=2 * (2 * layer_params * s + 4 * s * s * h),
        saved_bytes_per_sample=s * h * 34 + 5 * heads * s * s,
        saved_bytes_attention_core_per_sample=5 * heads * s * s,
        saved_bytes_replicated_per_sample=10 * s * h,
        input_bytes_per_sample=4 * s * h, output_bytes_per_sample=4 * s * h,
        tp_candidates=[
            TPCandidate(kind="attention", modules={"attn.q_proj": "colwise", "attn.k_proj": "colwise",
                                                   "attn.v_proj": "colwise", "attn.o_proj": "rowwise"},
                        divisor=heads),
            TPCandidate(kind="mlp", modules={"mlp.up_proj": "colwise", "mlp.down_proj": "rowwise"},
                        divisor=4 * h),
        ],
        num_heads=heads,
    )
    embed = LayerType(
        name="embed", module_type="Embedding", num_params=vocab * h, param_bytes=4 * vocab * h,
        fwd_flops_per_sample=s * h, bwd_flops_per_sample=s * h, saved_bytes_per_sample=4 * s * h,
        input_bytes_per_sample=8 * s, output_bytes_per_sample=4 * s * h,
        tp_candidates=[TPCandidate(kind="vocab_embedding", modules={"tok": "vocab"}, divisor=vocab)],
    )
    head = LayerType(
        name="head", module_type="Head", num_params=vocab * h, param_bytes=4 * vocab * h,
        fwd_flops_per_sample=2 * vocab * h * s, bwd_flops_per_sample=4 * vocab * h * s,
        saved_bytes_per_sample=4 * s * (h + 2 * vocab), input_bytes_per_sample=4 * s * h,
        output_bytes_per_sample=4 * s * vocab,
        tp_candidates=[TPCandidate(kind="output_head", modules={"lm_head": "colwise"}, divisor=vocab)],
    )
    blocks = [Block(name="embed", layer_type="embed", index=0)]
    blocks += [Block(name=f"layers.{i}", layer_type="layer", index=i + 1) for i in range(num_layers)]
    blocks.append(Block(name="head", layer_type="head", index=num_layers + 1))
    cuts = [CutPoint(after_block=i, bytes_per_sample=4 * s * h) for i in range(0, num_layers + 1, cut_every)]
    return ModelGraph(
        name=name, fingerprint=f"{name}-{num_layers}-{hidden}", traced_by="manual",
        num_params=layer_params * num_layers + 2 * vocab * h, seq_len=seq, blocks=blocks,
        layer_types={"embed": embed, "layer": layer, "head": head}, cut_points=cuts,
    )


@dataclass(frozen=True)
class FakeEstimate:
    step_time_s: float
    fits: bool
    peak_memory_bytes: float
    time_breakdown_s: dict[str, float]
    bubble_fraction: float = 0.0
    memory_capacity_bytes: float = 0.0

    def to_prediction(self):
        from specs import Prediction

        return Prediction(
            step_time_s=self.step_time_s, samples_per_s=0.0, tokens_per_s=0.0, mfu=0.0, hfu=0.0,
            model_flops_per_step=0.0, time_breakdown_s=self.time_breakdown_s,
            memory_bytes={"total": self.peak_memory_bytes}, peak_memory_bytes=self.peak_memory_bytes,
            memory_capacity_bytes=self.memory_capacity_bytes, fits=self.fits,
            bubble_fraction=self.bubble_fraction,
        )


@dataclass
class FakeBackend:
    graph: ModelGraph
    hw: HardwareSpec
    train: TrainSpec
    calls: int = 0
    _prof: dict = field(default_factory=dict)

    # per block, one micro-batch ------------------------------------------------
    def _block(self, i: int, tp: int, sp: bool, mb: int, recompute: str):
        lt = self.graph.layer(i)
        peak = self.hw.device.peak_flops_per_s["bf16"]
        eff = 0.6 * mb / (mb + 1.0) * (1.0 if tp == 1 else 0.95)
        fwd = lt.fwd_flops_per_sample * mb / tp / (peak * eff)
        bwd = lt.bwd_flops_per_sample * mb / tp / (peak * eff)
        extra = {"none": 0.0, "selective": 0.15 * fwd, "full": fwd}[recompute]
        comm = 0.0
        if tp > 1:
            vol = lt.output_bytes_per_sample / 2 * mb  # bf16
            comm = 4 * 2 * (tp - 1) / tp * vol / self.hw.intra_node.bandwidth_bytes_per_s
            comm *= 0.9 if sp else 1.0
        time_s = fwd + bwd + extra + comm
        split = 1.0 / tp if lt.tp_candidates else 1.0
        params = lt.num_params * split
        saved = lt.saved_bytes_per_sample / 2 * mb
        repl = lt.saved_bytes_replicated_per_sample / 2 * mb
        act = (saved - repl) / tp + (repl / tp if sp else repl)
        if recompute == "selective":
            act -= lt.saved_bytes_attention_core_per_sample / 2 * mb / tp
        elif recompute == "full":
            act = lt.input_bytes_per_sample / 2 * mb
        return time_s, 2 * params, 2 * params, 12 * params, max(act, 0.0)

    def profile(self, tp: int, sp: bool, mb: int, recompute: str, ep: int = 1, cp: int = 1) -> BlockProfile:
        key = (tp, sp, mb, recompute)  # the fake models dense blocks only: ep changes nothing
        if key not in self._prof:
            rows = [self._block(i, tp, sp, mb, recompute) for i in range(self.graph.num_blocks)]
            self._prof[key] = BlockProfile(*(tuple(r[j] for r in rows) for j in range(5)))
        return self._prof[key]

    def inflight(self, schedule, pp, num_micro_batches, virtual_stages):
        from planner.scoring import inflight_closed_form

        return inflight_closed_form(schedule, pp, num_micro_batches, virtual_stages)

    # one configuration ---------------------------------------------------------
    def score(self, k: Knobs, stages) -> FakeEstimate:
        self.calls += 1
        pp, v, m = k.pp, k.virtual_stages, k.num_micro_batches
        assert len(stages) == pp * v
        rank_t = [0.0] * pp
        rank_mem = [0.0] * pp
        held = self.inflight(k.schedule, pp, m, v)
        # this model keeps one more micro-batch on interleaved ranks than the planner's estimate
        if v > 1:
            held = tuple(h + 1 for h in held)
        div = {"none": (1, 1, 1), "zero1": (1, 1, k.dp), "zero2": (1, k.dp, k.dp), "zero3": (k.dp,) * 3}
        dpp, dpg, dpo = (k.hsdp_shard_size,) * 3 if k.sharding == "hsdp" else div[k.sharding]
        state_total = 0.0
        for j, (a, b, mode) in enumerate(stages):
            prof = self.profile(k.tp, k.sequence_parallel, k.micro_batch_size, mode)
            r = j % pp
            rank_t[r] += sum(prof.time_s[a : b + 1])
            st = sum(p / dpp + g / dpg + (0 if k.offload == "cpu" else o / dpo) for p, g, o in zip(
                prof.param_bytes[a : b + 1], prof.grad_bytes[a : b + 1], prof.optimizer_bytes[a : b + 1],
                strict=True))
            state_total += sum(prof.param_bytes[a : b + 1])
            rank_mem[r] += st + held[j] * sum(prof.act_bytes[a : b + 1])
            rank_mem[r] += 0.05 * max(prof.param_bytes[a : b + 1])  # transient buffers
        busiest = max(rank_t)
        compute = m * busiest
        if pp == 1:
            bubble = 0.0
        elif k.schedule == "zero_bubble":
            bubble = 0.1 * (pp - 1) * busiest / m
        else:
            bubble = (pp - 1) * busiest / v
        bubble += 2e-5 * (pp - 1) * m * v  # p2p latency per hop
        param_bytes = state_total / pp  # bf16 params on the busiest rank, roughly
        bw = self.hw.inter_node.bandwidth_bytes_per_s / self.hw.devices_per_node if k.dp * k.tp > self.hw.devices_per_node else self.hw.intra_node.bandwidth_bytes_per_s
        ring = 2 * (k.dp - 1) / k.dp * param_bytes / bw if k.dp > 1 else 0.0
        exposed = {"none": 0.2, "zero1": 0.3, "zero2": 0.35, "zero3": 0.6, "hsdp": 0.45}[k.sharding] * ring
        optim = 1e-12 * param_bytes / (1 if k.sharding == "none" else k.dp)
        if k.offload == "cpu":
            optim += param_bytes * 6 / self.hw.host.pcie_bandwidth_bytes_per_s
        step = compute + bubble + exposed + optim
        peak = max(rank_mem)
        cap = float(self.hw.device.memory_bytes)
        return FakeEstimate(
            step_time_s=step, fits=peak <= cap, peak_memory_bytes=peak,
            time_breakdown_s={"compute_s": compute, "bubble_s": bubble, "exposed_dp_comm_s": exposed,
                              "optimizer_s": optim},
            bubble_fraction=bubble / step, memory_capacity_bytes=cap,
        )

    def data_parallel_single_process(self, num_devices: int) -> FakeEstimate:
        k = Knobs(pp=1, dp=num_devices, tp=1, micro_batch_size=max(1, self.train.global_batch_size // num_devices))
        base = self.score(k, [(0, self.graph.num_blocks - 1, "none")])
        return FakeEstimate(base.step_time_s * 1.5, base.fits, base.peak_memory_bytes * 1.1,
                            base.time_breakdown_s)
