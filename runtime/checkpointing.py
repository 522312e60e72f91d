"""Activation checkpointing per pipeline stage, as the plan says (`Stage.recompute`).

- full: each block of the stage is wrapped in `checkpoint_wrapper(NO_REENTRANT)`: only the
  block's input is kept; the whole block is recomputed in backward.
- selective: only the attention core is recomputed (Korthikanti et al. 2022). Each block's
  attention module (class name ending in "Attention", or a child named attn / self_attn /
  attention) is wrapped with PyTorch's selective checkpointing: outputs of the projections
  (aten.mm / addmm / linear) are saved, everything else (QK^T, mask, softmax, PV) is
  recomputed. A block without an attention module is left as is (reported in the returned
  notes).

Applied after tensor parallelism and before FSDP2, as torchtitan does.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    checkpoint_wrapper,
)
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from specs import Plan

_ATTN_CHILD_NAMES = ("attn", "self_attn", "attention")
_SAVE_OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.linear.default}


def _save_projections(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _replace(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def _attention_paths(block: nn.Module) -> list[str]:
    out = []
    for name, mod in block.named_modules():
        if not name:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if type(mod).__name__.endswith("Attention") or leaf in _ATTN_CHILD_NAMES:
            if not any(name.startswith(p + ".") for p in out):
                out.append(name)
    return out


def apply_activation_checkpointing(model: nn.Module, plan: Plan) -> list[str]:
    """Wrap the blocks (or their attention) of stages with recompute != none, in place.

    Works on the whole model or one pipeline stage: blocks not present are skipped.

    Returns:
        Notes on blocks where selective checkpointing found no attention module.
    """
    notes: list[str] = []
    names = dict(model.named_modules())
    block_names = plan.model.block_names
    for stage in plan.pipeline.stages:
        if stage.recompute == "none":
            continue
        for i in range(stage.first, stage.last + 1):
            if i >= len(block_names) or block_names[i] not in names:
                continue
            path = block_names[i]
            block = names[path]
            if block is model:
                continue
            if stage.recompute == "full":
                _replace(model, path, checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT))
                continue
            attn = _attention_paths(block)
            if not attn:
                notes.append(f"{path}: selective recompute found no attention module; block not checkpointed")
            for sub in attn:
                wrapped = checkpoint_wrapper(
                    block.get_submodule(sub), checkpoint_impl=CheckpointImpl.NO_REENTRANT,
                    context_fn=partial(create_selective_checkpoint_contexts, _save_projections),
                )
                _replace(block, sub, wrapped)
    return notes
