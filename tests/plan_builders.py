"""Hand-built Plans for tests (no planner search): `make_plan("gpt-tiny", pp=2, ...)`.

Block names are module paths, derived from the model by `block_names_of`: the top-level
children in order, ModuleList/Sequential children expanded one level per container (so
"layers.0", "layer2.1"), and each run of other top-level modules grouped into one block named by
its modules joined with "+", as planner.trace names them (a ResNet's stem is block
"conv1+bn1+relu+maxpool", its head "avgpool+fc"). Stages split the blocks as evenly as possible, earlier stages taking the
extra block.
"""

from __future__ import annotations

from torch import nn

from planner.models import build_model
from specs import (
    DataParallel,
    HardwareSpec,
    Mesh,
    ModelRef,
    Pipeline,
    Plan,
    Stage,
    TensorParallel,
    TrainSpec,
)


def block_names_of(model: nn.Module) -> list[str]:
    """Block names as planner.trace gives them for the bundled models (see the module docstring)."""
    names: list[str] = []
    run: list[str] = []
    for name, child in model.named_children():
        if isinstance(child, (nn.ModuleList, nn.Sequential)):
            if run:
                names.append("+".join(run))
                run = []
            for sub, grand in child.named_children():
                if isinstance(grand, (nn.ModuleList, nn.Sequential)):
                    names += [f"{name}.{sub}.{g}" for g, _ in grand.named_children()]
                else:
                    names.append(f"{name}.{sub}")
        else:
            run.append(name)
    if run:
        names.append("+".join(run))
    return names


def even_stages(num_blocks: int, num_stages: int, recompute: str = "none") -> list[Stage]:
    if num_stages > num_blocks:
        raise ValueError(f"{num_stages} stages for {num_blocks} blocks")
    base, extra = divmod(num_blocks, num_stages)
    out, first = [], 0
    for i in range(num_stages):
        n = base + (1 if i < extra else 0)
        out.append(Stage(first=first, last=first + n - 1, recompute=recompute))
        first += n
    return out


def make_plan(
    model_name: str,
    *,
    pp: int = 1,
    dp: int = 1,
    tp: int = 1,
    schedule: str = "1f1b",
    virtual_stages: int = 1,
    micro_batch_size: int = 1,
    num_micro_batches: int = 1,
    sharding: str = "none",
    recompute: str = "none",
    sequence_parallel: bool = False,
    global_batch: int | None = None,
    model: nn.Module | None = None,
    precision: str = "fp32",
    optimizer: str = "adamw",
    block_names: list[str] | None = None,
) -> Plan:
    """A Plan for a bundled model (or `model`, e.g. a variant with more layers) on `cpu` processes.

    block_names overrides the derived block names (for toy models in tests).

    global_batch defaults to micro_batch_size * num_micro_batches * dp. The fingerprint is the
    model name until fingerprint checks land.
    """
    if model is None:
        model = build_model(model_name, device="meta").module
    names = list(block_names) if block_names is not None else block_names_of(model)
    world = pp * dp * tp
    batch = global_batch if global_batch is not None else micro_batch_size * num_micro_batches * dp
    return Plan(
        model=ModelRef(
            name=model_name, fingerprint=model_name, num_blocks=len(names), block_names=names,
            num_params=sum(p.numel() for p in model.parameters()),
        ),
        hardware=HardwareSpec.preset("cpu", devices=world),
        train=TrainSpec(global_batch_size=batch, precision=precision, optimizer=optimizer),
        mesh=Mesh(pp=pp, dp=dp, tp=tp),
        data_parallel=DataParallel(sharding=sharding),
        tensor_parallel=TensorParallel(sequence_parallel=sequence_parallel),
        pipeline=Pipeline(
            schedule=schedule, virtual_stages=virtual_stages, micro_batch_size=micro_batch_size,
            num_micro_batches=num_micro_batches,
            stages=even_stages(len(names), pp * virtual_stages, recompute),
        ),
    )
