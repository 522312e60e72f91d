"""Distributed checkpoints (torch.distributed.checkpoint, DCP) of a ParallelModel.

Layout: `DIR/step_00000012/` per checkpoint. Saving is atomic: DCP writes `step_N.tmp/`, every
rank finishes (barrier), then rank 0 renames it to `step_N/`; a crash mid-save leaves only a
`.tmp` directory, which `latest_checkpoint` ignores. On a shared file system every rank writes
its own shards; on separate disks per node, give each node the same mounted path.

Contents: model and optimizer state from `get_state_dict` (sharded DTensors are stored by
shard and re-shard on load, so a checkpoint loads under another plan), the training position
(`train.step`, `train.data_position`) and each rank's torch RNG state (`rng.rank{R}`, restored
when the same rank exists at load). ZeroRedundancyOptimizer (zero1) state is not supported by
get_state_dict; saving under zero1 raises.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.optim import ZeroRedundancyOptimizer

from runtime.parallelize import ParallelModel
from specs import SpecError

_STEP_DIR = re.compile(r"^step_(\d+)$")


def _app_state(pm: ParallelModel) -> tuple[dict, dict, list[tuple[list, list, int]]]:
    """Merged model/optimizer state of the local stage(s), and per stage: (model keys, optimizer
    state keys, number of param groups) to split the merged state back at load."""
    if any(isinstance(o, ZeroRedundancyOptimizer) for o in pm.optimizers):
        raise SpecError(
            "checkpoint: zero1 (ZeroRedundancyOptimizer) state cannot be saved as a distributed checkpoint; "
            "use sharding zero2 to checkpoint with sharded optimizer states"
        )
    model_sd: dict = {}
    optim_sd: dict = {"state": {}, "param_groups": []}
    parts = []
    for module, opt in zip(pm.modules, pm.optimizers, strict=True):
        m, o = get_state_dict(module, opt)
        model_sd.update(m)
        optim_sd["state"].update(o["state"])
        optim_sd["param_groups"].extend(o["param_groups"])
        parts.append((list(m), list(o["state"]), len(o["param_groups"])))
    return model_sd, optim_sd, parts


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under `directory`, or None."""
    d = Path(directory)
    if not d.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in d.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return max(steps)[1] if steps else None


def save_checkpoint(pm: ParallelModel, directory: str | os.PathLike, *, step: int, data_position: int) -> Path:
    """Save model, optimizer, position and RNG at `step`. A collective: every rank calls it."""
    model_sd, optim_sd, _ = _app_state(pm)
    rank = dist.get_rank()
    state = {"model": model_sd, "optim": optim_sd,
             "train": {"step": torch.tensor(step), "data_position": torch.tensor(data_position)},
             "rng": {f"rank{rank}": torch.get_rng_state()}}
    final = Path(directory) / f"step_{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    dcp.save(state, checkpoint_id=str(tmp))
    dist.barrier()
    if rank == 0:
        if final.exists():  # a re-run of the same step: replace it
            import shutil

            shutil.rmtree(final)
        os.replace(tmp, final)
    dist.barrier()
    return final


def load_checkpoint(pm: ParallelModel, path: str | os.PathLike) -> dict[str, int]:
    """Load a checkpoint into `pm` (any plan; DCP re-shards). Returns {"step", "data_position"}."""
    path = Path(path)
    if not (path / ".metadata").exists():
        raise SpecError(f"checkpoint: {path} is not a complete DCP checkpoint (no .metadata file)")
    model_sd, optim_sd, parts = _app_state(pm)
    rank = dist.get_rank()
    stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    state = {"model": model_sd, "optim": optim_sd,
             "train": {"step": torch.tensor(0), "data_position": torch.tensor(0)}}
    rng_key = f"rank{rank}"
    if f"rng.{rng_key}" in stored:
        state["rng"] = {rng_key: torch.get_rng_state()}
    dcp.load(state, checkpoint_id=str(path))
    groups = state["optim"]["param_groups"]
    for module, opt, (mkeys, skeys, ngroups) in zip(pm.modules, pm.optimizers, parts, strict=True):
        osd = {"state": {k: state["optim"]["state"][k] for k in skeys}, "param_groups": groups[:ngroups]}
        groups = groups[ngroups:]
        set_state_dict(module, opt, model_state_dict={k: state["model"][k] for k in mkeys}, optim_state_dict=osd)
    if "rng" in state:
        torch.set_rng_state(state["rng"][rng_key])
    return {"step": int(state["train"]["step"]), "data_position": int(state["train"]["data_position"])}
