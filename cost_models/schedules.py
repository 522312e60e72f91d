"""Pipeline schedules as data: per-rank ordered action lists.

An action is F (forward), B (backward; input grads only when the schedule splits backward, all
grads otherwise) or W (weight grads, zero-bubble only) of one (virtual) stage and micro-batch,
printed as PyTorch's pipelining package prints them: `2F0` = stage 2, forward, micro-batch 0
(`Action.from_str` parses that back).

Builders (P = pp ranks, m = micro-batches, v = virtual stages per rank):
- `gpipe`: rank r runs all m forwards of stage r, then all m backwards (Huang et al. 2019).
- `1f1b`: rank r warms up with min(P-1-r, m) forwards, then alternates one forward and one
  backward, then drains the remaining backwards (PipeDream-Flush, Narayanan et al. 2021).
- `interleaved_1f1b`: Megatron-LM's interleaved schedule (Narayanan et al. 2021, §2.2):
  v stages per rank in loop style, virtual stage j on rank j % P; micro-batches go in groups
  of P through chunk 0, then chunk 1, ...; warm-up (P-r-1)*2 + (v-1)*P forwards; then 1F1B.
- `zero_bubble`: ZB-H1 (Qi et al. 2023, "Zero Bubble Pipeline Parallelism", §3), v = 1:
  1F1B with backward split into B and W; rank r runs each W r micro-batches late, so the last
  ranks finish their weight grads while the input-grad chain B drains towards rank 0. With
  equal stages this gives step = m(F+B+W) + (P-1)(F+B-W), the paper's ZB-H1 figure (a test).
  Same stage-to-rank layout as 1f1b.

The schedules say nothing about time; `cost_models.simulator.simulate` plays them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from specs import SpecError

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zero_bubble")


ActionTuple = tuple[str, int, int]  # (kind, stage, micro-batch): an Action's fields


class Action(NamedTuple):
    """One pipeline action; a tuple (cheap to build by the thousand)."""

    kind: str  # "F", "B" or "W"
    stage: int
    microbatch: int

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{self.microbatch}"

    @classmethod
    def from_str(cls, text: str) -> Action:
        for kind in "FBW":
            if kind in text:
                stage, mb = text.split(kind)
                return cls(kind, int(stage), int(mb))
        raise ValueError(f"action {text!r}: expected like '2F0' (stage, F/B/W, micro-batch)")


@dataclass(frozen=True, slots=True)
class Schedule:
    name: str
    pp: int
    num_micro_batches: int
    virtual_stages: int
    # per pp rank, in execution order: Actions (build_schedule) or plain (kind, stage, micro-batch)
    # tuples equal to them (build_schedule_plain)
    actions: tuple[tuple[ActionTuple, ...], ...]
    stage_rank: tuple[int, ...]  # virtual stage -> pp rank
    split_backward: bool  # B is input-grad only and W actions exist

    @property
    def num_stages(self) -> int:
        return self.pp * self.virtual_stages

    def __str__(self) -> str:
        return "\n".join(f"rank {r}: " + " ".join(map(str, acts)) for r, acts in enumerate(self.actions))


# The builders return (kind, stage, micro-batch) tuples (tuple literals: the compile step builds
# hundreds of thousands of them in a search); build_schedule makes Actions of them.


def _gpipe(p: int, m: int) -> list[list[ActionTuple]]:
    return [[("F", r, i) for i in range(m)] + [("B", r, i) for i in range(m)] for r in range(p)]


def _one_f_one_b(p: int, m: int) -> list[list[ActionTuple]]:
    out = []
    for r in range(p):
        w = min(p - 1 - r, m)
        acts = [("F", r, i) for i in range(w)]
        for k in range(m - w):
            acts += [("F", r, w + k), ("B", r, k)]
        acts += [("B", r, i) for i in range(m - w, m)]
        out.append(acts)
    return out


def _interleaved(p: int, m: int, v: int) -> list[list[ActionTuple]]:
    order: list[tuple[int, int]] = []  # (chunk, microbatch) in Megatron's forward order
    for g0 in range(0, m, p):
        grp = range(g0, min(g0 + p, m))
        for c in range(v):
            order += [(c, i) for i in grp]
    total = m * v
    out = []
    for r in range(p):
        fwd = [("F", c * p + r, i) for c, i in order]
        bwd = [("B", (v - 1 - c) * p + r, i) for c, i in order]
        w = min((p - r - 1) * 2 + (v - 1) * p, total)
        acts = fwd[:w]
        for k in range(total - w):
            acts += [fwd[w + k], bwd[k]]
        acts += bwd[total - w :]
        out.append(acts)
    return out


def _zb_h1(p: int, m: int) -> list[list[ActionTuple]]:
    out = []
    for r in range(p):
        w = min(p - 1 - r, m)
        acts = [("F", r, i) for i in range(w)]
        pending: list[int] = []  # micro-batches whose W is still to run
        for k in range(m):
            if k < m - w:
                acts.append(("F", r, w + k))
            acts.append(("B", r, k))
            pending.append(k)
            if len(pending) > r:  # rank r keeps r weight-grad passes back for the drain
                acts.append(("W", r, pending.pop(0)))
        acts += [("W", r, i) for i in pending]
        out.append(acts)
    return out


def build_schedule(name: str, pp: int, num_micro_batches: int, virtual_stages: int = 1) -> Schedule:
    """Per-rank action lists for schedule `name` (see module docstring); immutable."""
    _check(name, pp, num_micro_batches, virtual_stages)
    return _build(name, pp, num_micro_batches, virtual_stages, Action._make)


def _check(name: str, p: int, m: int, v: int) -> None:
    if name not in SCHEDULES:
        raise SpecError(f"pipeline.schedule: unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    if p < 1 or m < 1 or v < 1:
        raise SpecError(f"pipeline: pp ({p}), num_micro_batches ({m}) and virtual_stages ({v}) must be >= 1")
    if v > 1 and name != "interleaved_1f1b":
        raise SpecError(
            f"pipeline.virtual_stages: {v} virtual stages are modelled only for interleaved_1f1b "
            f"(zero_bubble is modelled as ZB-H1 with one stage per rank); use virtual_stages: 1"
        )
    if name == "interleaved_1f1b" and v > 1 and p > 1 and m % p:
        raise SpecError(
            f"pipeline.num_micro_batches: interleaved_1f1b needs a multiple of pp ({p}) micro-batches "
            f"(got {m}), as Megatron-LM's interleaved schedule does; pick num_micro_batches = {p * -(-m // p)}"
        )


def build_schedule_plain(name: str, pp: int, num_micro_batches: int, virtual_stages: int = 1) -> Schedule:
    """`build_schedule` with plain (kind, stage, micro-batch) tuples as actions (equal to the Actions
    element by element, several times cheaper to build): for the simulator's compile step."""
    _check(name, pp, num_micro_batches, virtual_stages)
    return _build(name, pp, num_micro_batches, virtual_stages, None)


def _build(name: str, p: int, m: int, v: int, make: Callable[[ActionTuple], Action] | None) -> Schedule:
    """`make`: applied to each (kind, stage, micro-batch) tuple (None: the tuples themselves)."""
    if name == "gpipe":
        acts = _gpipe(p, m)
    elif name == "1f1b":
        acts = _one_f_one_b(p, m)
    elif name == "interleaved_1f1b":
        acts = _interleaved(p, m, v)
    else:
        acts = _zb_h1(p, m)
    stage_rank = tuple(j % p for j in range(p * v))
    rows = tuple(tuple(a) if make is None else tuple(map(make, a)) for a in acts)
    return Schedule(name, p, m, v, rows, stage_rank, name == "zero_bubble")


def schedule_from_str(name: str, pp: int, num_micro_batches: int, virtual_stages: int, text: str) -> Schedule:
    """Parse the output of `str(schedule)` (one 'rank r: 0F0 0F1 ...' line per rank)."""
    rows = []
    for line in text.strip().splitlines():
        _, _, body = line.partition(":")
        rows.append(tuple(Action.from_str(t) for t in body.split()))
    split = any(a.kind == "W" for row in rows for a in row)
    stage_rank = tuple(j % pp for j in range(pp * virtual_stages))
    return Schedule(name, pp, num_micro_batches, virtual_stages, tuple(rows), stage_rank, split)
