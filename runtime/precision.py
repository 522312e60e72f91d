"""Mixed precision for `plan.train.precision`.

- fp32: nothing.
- bf16: master weights and optimizer states stay in the parameters' dtype; compute in bf16.
  Under FSDP2 that is `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)` (parameters
  cast at all-gather, gradients reduced in fp32); without FSDP2 (DDP, TP only, one process)
  it is `torch.autocast(device, bf16)` around forward and loss.
- fp16: the same with float16, plus loss scaling: `ShardedGradScaler` when gradients are
  sharded or DTensors (FSDP2/TP), else `torch.amp.GradScaler`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class PrecisionSetup:
    """What the training step needs: an autocast context, FSDP2's policy, and a loss scaler."""

    compute_dtype: torch.dtype | None
    device_type: str
    mp_policy: MixedPrecisionPolicy | None
    scaler: torch.amp.GradScaler | None

    def autocast(self) -> contextlib.AbstractContextManager:
        """autocast when the engine does not cast (no FSDP2 policy), else a no-op context."""
        if self.compute_dtype is None or self.mp_policy is not None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.compute_dtype)


def build_precision(precision: str, *, fsdp: bool, sharded_grads: bool, device_type: str) -> PrecisionSetup:
    """Args:
        precision: "fp32" | "bf16" | "fp16" (TrainSpec.precision).
        fsdp: an FSDP2 engine wraps the model (it casts, so no autocast).
        sharded_grads: gradients are DTensors or sharded (picks ShardedGradScaler for fp16).
        device_type: "cpu" or "cuda".
    """
    dtype = _DTYPES.get(precision)
    if dtype is None:
        return PrecisionSetup(None, device_type, None, None)
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if fsdp else None
    scaler = None
    if precision == "fp16":
        scaler = ShardedGradScaler(device_type) if sharded_grads else torch.amp.GradScaler(device_type)
    return PrecisionSetup(dtype, device_type, policy, scaler)
