"""The planner's search space as lists of knob values (the "Space" part of planner.search's
docstring): meshes, micro-batch splits, sequence parallelism, shardings and schedules, each with
the rule that excludes a value recorded as a rejection. `SearchSpace` is a mixin of
planner.search.Search; it reads the problem (graph, hw, train, constraints `c`, pins) and
records rejections through `self.reject`.
"""

from __future__ import annotations

from planner.capabilities import (
    executable_candidate,
    knob_problem,
    pipeline_tp_problem,
    sequence_parallel_problem,
)
from planner.partition import MODES
from specs import SpecError

MAX_VIRTUAL_STAGES = 8
SHARDINGS = ("none", "zero1", "zero2", "zero3", "hsdp")
EP_REFUSED_SHARDINGS = ("zero1", "hsdp")  # with ep > 1 (specs.plan.check_expert_parallel)

def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def schedule_rule(schedule: str, pp: int, num_micro_batches: int, v: int) -> str | None:
    """Why a schedule cannot run this shape (torch.distributed.pipelining's checks), or None."""
    m = num_micro_batches
    if schedule == "1f1b" and m < pp:
        return f"1f1b needs num_micro_batches >= pp ({m} < {pp})"
    if schedule == "interleaved_1f1b" and m % pp:
        return f"interleaved_1f1b needs num_micro_batches ({m}) to be a multiple of pp ({pp})"
    if schedule == "zero_bubble" and m % max(1, m // pp):
        return f"zero_bubble needs num_micro_batches ({m}) to be a multiple of max(1, {m} // pp={pp})"
    if v > 1 and schedule not in ("interleaved_1f1b", "zero_bubble"):
        return f"virtual_stages={v} needs interleaved_1f1b or zero_bubble"
    return None


class SearchSpace:
    """Knob enumeration for Search (mixin)."""

    # ------------------------------------------------------------------ knob lists
    def _modes(self) -> tuple[str, ...]:
        pin = self.pins.get("recompute")
        if pin is not None:
            if pin != "none" and not self.train.allow_checkpointing:
                raise SpecError(
                    f"constraints.recompute: pinned to {pin!r} but train.allow_checkpointing is False; "
                    f"allow checkpointing or pin recompute: none"
                )
            return (pin,)
        return MODES if self.train.allow_checkpointing else ("none",)

    def _tp_divisor_problem(self, tp: int) -> str | None:
        if tp == 1:
            return None
        any_candidate = False
        for name in sorted(self.graph.layer_types):
            lt = self.graph.layer_types[name]
            for cand in lt.tp_candidates:
                if not executable_candidate(cand):
                    styles = sorted(set(cand.modules.values()))
                    return (f"tp={tp}: the runtime cannot split {name}'s {cand.kind} candidate "
                            f"(style {', '.join(styles)} is not executable yet; planner.capabilities)")
                any_candidate = True
                if cand.divisor % tp:
                    return f"tp={tp} does not divide {name}'s {cand.kind} candidate (divisor {cand.divisor})"
        if not any_candidate:
            return f"tp={tp}: no block has a tensor-parallel candidate, every op would be replicated"
        return None

    def meshes(self) -> list[tuple[int, int, int, int]]:
        """Valid (pp, dp, tp, cp), with every invalid factorization recorded."""
        n, per_node = self.num_devices, self.hw.devices_per_node
        out = []
        for cp in self.cp_options(n):
            m = n // cp
            self._check_pinned_degrees(m, cp)
            for tp in divisors(m):
                for pp in divisors(m // tp):
                    dp = m // (tp * pp)
                    why = self._mesh_problem(pp, dp, tp, per_node)
                    if why is None:
                        out.append((pp, dp, tp, cp))
                        self._reject_refused_shardings(pp, dp, tp)
                    elif why[0]:
                        region = why[0] + (f" cp={cp}" if cp > 1 else "")
                        self.reject(region, why[1], self._mesh_size(pp, dp, tp))
        return out

    def cp_options(self, n: int) -> list[int]:
        """Context-parallel degrees: 1, and where torch's context_parallel can run this model on
        this hardware (`context_parallel_problem`), every divisor of the device count that splits
        the sequence into 2 * cp equal chunks (its load balancing). A pinned cp that cannot run
        is an error naming why."""
        pin = self.pins.get("cp")
        if pin is not None and pin > 1:
            why = self.context_parallel_problem(pin, n)
            if why:
                raise SpecError(f"constraints.cp: pinned to {pin}, but {why}")
            return [pin]
        if pin == 1 or self.context_parallel_problem(2, n, sequence=False):
            return [1]
        if not self.train.allow_context_parallel:
            self.reject("cp > 1", "not offered: autoplan's runtime does not execute context parallelism yet; "
                        "allow it (--allow-context-parallel) for a plan to export to torchtitan or "
                        "Megatron-LM", 0)
            return [1]
        out = [1]
        for cp in divisors(n)[1:]:
            why = self.context_parallel_problem(cp, n)
            if why:
                self.reject(f"cp={cp}", why, 0)
            else:
                out.append(cp)
        return out

    def context_parallel_problem(self, cp: int, n: int, sequence: bool = True) -> str | None:
        """Why context parallelism of degree cp cannot run this model here, or None.
        `sequence`: also check that cp splits the sequence."""
        g = self.graph
        if self.hw.device_is_host_cpu:
            return ("context parallelism runs torch's context_parallel, which has no CPU path "
                    "(torch 2.14: CPU attention kernels have no ring/all-gather implementation)")
        if self.num_experts:
            return "context parallelism with mixture-of-experts layers is not supported here"
        attention = False
        for name in sorted(g.layer_types):
            lt = g.layer_types[name]
            core = any(op.kind == "attention" or op.tp_split == "head" for op in lt.ops)
            fa = lt.fused_attention
            if core and (fa is None or not fa.context_parallel or fa.kv_bytes_per_sample <= 0):
                return (f"{name}'s attention is not one causal F.scaled_dot_product_attention call, the "
                        f"only attention torch's context_parallel splits")
            attention = attention or fa is not None
        if not attention:
            return "the model has no attention for context parallelism to split"
        if sequence and (not g.seq_len or g.seq_len % (2 * cp)):
            return (f"cp={cp} must split the {g.seq_len}-token sequence into 2 * cp = {2 * cp} equal "
                    f"chunks (load-balanced causal attention)")
        if n % cp:
            return f"cp={cp} does not divide the {n} devices"
        return None

    def _check_pinned_degrees(self, n: int, cp: int = 1) -> None:
        """Pinned pp/dp/tp must multiply to a divisor of the device count / cp (all three: to it)."""
        pinned = {k: self.pins[k] for k in ("pp", "dp", "tp") if k in self.pins}
        if not pinned:
            return
        prod = 1
        for v in pinned.values():
            prod *= v
        expr = " * ".join(f"{k}({v})" for k, v in pinned.items())
        devices = f"{n} devices" if cp == 1 else f"{n} devices per cp rank (cp={cp})"
        if len(pinned) == 3 and prod != n:
            raise SpecError(f"constraints: {expr} = {prod}, but {self.hw} has {devices}; "
                            f"pin degrees whose product is {n}")
        if n % prod:
            raise SpecError(f"constraints: {expr} = {prod} does not divide the {devices} of {self.hw}; "
                            f"pin degrees whose product divides {n}")

    def _mesh_problem(self, pp: int, dp: int, tp: int, per_node: int) -> tuple[str, str] | None:
        p = self.pins
        for name, val in (("pp", pp), ("dp", dp), ("tp", tp)):
            if name in p and p[name] != val:
                return ("", "")  # outside the pinned space: not a rejection
        if self.c.max_tp and tp > self.c.max_tp:
            return ("", "")
        if self.c.max_pp and pp > self.c.max_pp:
            return ("", "")
        if tp > 1 and per_node % tp and not self.c.tp_across_nodes:
            return (f"tp={tp}", f"tp={tp} crosses nodes ({per_node} devices per node); "
                    f"allow with constraints.tp_across_nodes")
        why = self._tp_divisor_problem(tp)
        if why:
            return (f"tp={tp}", why)
        why = pipeline_tp_problem(self.graph, pp=pp, tp=tp)
        if why:
            return (f"pp={pp} tp={tp}", why)
        if pp > len(self.ends):
            return (f"pp={pp}", f"pp={pp} needs {pp} stages but the graph has {len(self.ends)} "
                    f"places to end a stage ({self.graph.num_blocks} blocks)")
        if self.train.global_batch_size % dp:
            return (f"dp={dp}", f"dp={dp} does not divide global batch {self.train.global_batch_size}")
        why = knob_problem(sharding="none", offload="none", pp=pp, dp=dp, tp=tp, precision=self.train.precision)
        if why:
            return (f"pp={pp} {self.train.precision}", why)
        return None

    def micro_batches(self, pp: int, dp: int) -> list[tuple[int, int]]:
        per_replica = self.train.global_batch_size // dp
        out = []
        for mb in divisors(per_replica):
            if mb < self.graph.min_micro_batch_size:
                continue  # BatchNorm would see one value per channel (ModelGraph.min_micro_batch_size)
            n_mb = per_replica // mb
            if "micro_batch_size" in self.pins and self.pins["micro_batch_size"] != mb:
                continue
            if "num_micro_batches" in self.pins and self.pins["num_micro_batches"] != n_mb:
                continue
            if n_mb > 1 and pp == 1 and not self.train.allow_grad_accumulation:
                continue
            out.append((mb, n_mb))
        return out

    def sp_options(self, tp: int) -> list[bool]:
        if "sequence_parallel" in self.pins:
            return [self.pins["sequence_parallel"]] if (tp > 1 or not self.pins["sequence_parallel"]) else []
        if tp > 1 and sequence_parallel_problem(self.graph) is not None:
            return [False]
        return [False, True] if tp > 1 else [False]

    def _reject_refused_shardings(self, pp: int, dp: int, tp: int) -> None:
        """Record the sharding/offload points of a valid mesh that the runtime refuses."""
        refused = [x for x in self.shardings(dp) if x not in self.shardings(dp, pp, tp)]
        if not refused:
            return
        per = len(self.sp_options(tp)) * sum(max(1, len(self.schedules(pp, n))) for _, n in self.micro_batches(pp, dp))
        for sharding, _hsdp, off in refused:
            why = knob_problem(sharding=sharding, offload=off, pp=pp, dp=dp, tp=tp, precision=self.train.precision)
            region = f"pp={pp} dp={dp} tp={tp} {sharding}" + (" offload=cpu" if off == "cpu" else "")
            self.reject(region, f"the runtime refuses it: {why}", per)

    def shardings(self, dp: int, pp: int | None = None, tp: int | None = None,
                  ep: int = 1, cp: int = 1) -> list[tuple[str, int | None, str]]:
        """(sharding, hsdp shard size, offload) options for dp; with pp and tp, only those the
        runtime executes (planner.capabilities; with expert parallelism, specs.plan.check_expert_parallel;
        with context parallelism no zero1: ZeroRedundancyOptimizer runs over DDP, which cannot)."""
        out = self._shardings(dp)
        if ep > 1:  # and no offload: the experts' FSDP2 group keeps its states on the device
            out = [x for x in out if x[0] not in EP_REFUSED_SHARDINGS and x[2] == "none"]
        if cp > 1:
            out = [x for x in out if x[0] != "zero1"]
        if pp is None or tp is None:
            return out
        prec = self.train.precision
        return [x for x in out if knob_problem(sharding=x[0], offload=x[2], pp=pp, dp=dp, tp=tp, precision=prec) is None]

    def ep_options(self, pp: int, dp: int, tp: int) -> list[int]:
        """Expert-parallel degrees for a mesh: 1 for a dense model; else every divisor of dp that
        divides every MoE layer's expert count (specs.ExpertsInfo), each with a data-parallel
        sharding it runs with. A pinned ep that does not apply is recorded as a rejection."""
        counts = self.num_experts
        pin = self.pins.get("ep")
        if not counts:
            if pin not in (None, 1):
                raise SpecError(f"constraints.ep: pinned to {pin}, but {self.graph.name} has no "
                                f"mixture-of-experts layer (expert parallelism shards experts)")
            return [1]
        out = []
        for ep in divisors(dp):
            if pin is not None and ep != pin:
                continue
            if any(n % ep for n in counts):
                if ep == pin:
                    self.reject(f"ep={ep}", f"ep={ep} does not divide the MoE layers' {counts} experts")
                continue
            if ep > 1 and not self.shardings(dp, pp, tp, ep):
                self.reject(f"pp={pp} dp={dp} tp={tp} ep={ep}",
                            f"expert parallelism runs with sharding none, zero2 or zero3, and none of "
                            f"them is allowed here ({', '.join(s for s, _, _ in self.shardings(dp, pp, tp))})")
                continue
            out.append(ep)
        if pin is not None and dp % pin:
            self.reject(f"dp={dp} ep={pin}", f"ep={pin} must divide dp={dp} (expert-parallel groups are "
                        f"data-parallel ranks)")
        return out

    def _shardings(self, dp: int) -> list[tuple[str, int | None, str]]:
        p = self.pins
        # dp = 1: only none, as the runtime runs no FSDP2 on one replica (apply_data_parallel
        # returns the model; training uses autocast), so a zero2/zero3 plan there would run as
        # none and not as its estimate (no autocast weight copy) says; a pin is kept as asked.
        # tests/test_planner_optimal.py fails when the runtime starts running FSDP2 at dp = 1.
        names = [p["sharding"]] if "sharding" in p else (list(SHARDINGS) if dp > 1 else ["none"])
        offloads = [p["offload"]] if "offload" in p else (["none", "cpu"] if self.train.allow_offload else ["none"])
        out = []
        for s in names:
            sizes: list[int | None] = [None]
            if s == "hsdp":
                sizes = [d for d in divisors(dp) if 1 < d < dp]
                if "hsdp_shard_size" in p:
                    sizes = [x for x in sizes if x == p["hsdp_shard_size"]]
            elif "hsdp_shard_size" in p:
                sizes = []
            for size in sizes:
                for off in offloads:
                    out.append((s, size, off))
        return out

    def schedules(self, pp: int, n_mb: int) -> list[tuple[str, int]]:
        p = self.pins
        if pp == 1:
            if p.get("virtual_stages", 1) != 1:
                return []
            return [(p.get("schedule", "1f1b"), 1)]
        vmax = min(MAX_VIRTUAL_STAGES, len(self.ends) // pp)
        cands = [("gpipe", 1), ("1f1b", 1), ("zero_bubble", 1)]
        cands += [("interleaved_1f1b", v) for v in range(2, vmax + 1)]
        if "virtual_stages" in p and p["virtual_stages"] > MAX_VIRTUAL_STAGES:
            cands.append(("interleaved_1f1b", p["virtual_stages"]))
        out = []
        for s, v in cands:
            if p.get("schedule", s) != s or p.get("virtual_stages", v) != v or pp * v > len(self.ends):
                continue
            if schedule_rule(s, pp, n_mb, v) is None:
                out.append((s, v))
        return out

    def _mesh_size(self, pp: int, dp: int, tp: int) -> int:
        if self.train.global_batch_size % dp:
            return len(self.shardings(dp)) * len(self.sp_options(tp))
        return sum(
            len(self.shardings(dp, pp, tp)) * len(self.sp_options(tp)) * max(1, len(self.schedules(pp, n)))
            for _, n in self.micro_batches(pp, dp)
        )
