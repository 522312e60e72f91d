"""Which PyTorch engine runs a plan's data parallelism: the one rule the runtime and the cost model
share (runtime/data_parallel.py applies it; cost_models.ranks charges its memory and traffic).

| dp | sharding            | tp, pp            | engine            | what it holds beyond the states        |
|----|---------------------|-------------------|-------------------|----------------------------------------|
| 1  | any                 | any               | `none`            | nothing: no wrapper, no gradient sync  |
| >1 | none                | tp == pp == 1     | `ddp`             | a flat copy of every gradient (buckets)|
| >1 | none                | tp, pp or ep > 1  | `fsdp2_replicate` | the gradients' all-reduce input        |
| >1 | zero1               | tp == pp == 1     | `zero_redundancy` | DDP's buckets (ZeroRedundancyOptimizer)|
| >1 | zero2, zero3, hsdp  | any               | `fully_shard`     | FSDP2's unsharded units                |

DDP takes neither DTensor parameters (tp > 1) nor several forwards in flight before their
backwards (a pipeline schedule: its reducer fails "rebuilt parameter indices size is not same"),
so sharding none runs FSDP2's `replicate` there; so does expert parallelism (ep > 1), whose
expert shards are DTensors (runtime/expert_parallel.py). zero1 with tp > 1 or pp > 1 is refused by the
runtime (runtime/data_parallel.py `validate_data_parallel`, planner/capabilities.py); the rule
still names the engine the setting asks for. At dp = 1 the runtime wraps nothing whatever the
sharding (one replica: nothing to synchronise or shard), so no engine's buffers are charged.
"""

from __future__ import annotations

from typing import Literal

from specs import Knobs

DataParallelEngine = Literal["none", "ddp", "fsdp2_replicate", "zero_redundancy", "fully_shard"]
FSDP_SHARDINGS = ("zero2", "zero3", "hsdp")
DDP_ENGINES = ("ddp", "zero_redundancy")  # torch DistributedDataParallel underneath
FSDP2_ENGINES = ("fsdp2_replicate", "fully_shard")  # FSDP2: DTensor parameters, its own mixed precision
ALL_REDUCE_ENGINES = ("ddp", "zero_redundancy", "fsdp2_replicate")  # all gradients all-reduced once per step


def data_parallel_engine(knobs: Knobs) -> DataParallelEngine:
    """The engine that runs the data parallelism of `knobs` (table in the module docstring).

    Args:
        knobs: a plan's knobs (`Plan.knobs()`); reads dp, tp, pp and sharding.
    Returns:
        "none", "ddp", "fsdp2_replicate", "zero_redundancy" or "fully_shard".
    """
    if knobs.dp == 1:
        return "none"
    if knobs.sharding in FSDP_SHARDINGS:
        return "fully_shard"
    if knobs.sharding == "zero1":
        return "zero_redundancy"
    return "ddp" if knobs.tp == 1 and knobs.pp == 1 and knobs.ep == 1 else "fsdp2_replicate"
