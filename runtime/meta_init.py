"""Materialise a model built on the meta device: each rank's part ends up holding what the same
model built on one device, initialised from the same RNG state, would hold there.

A model built on meta holds no weights. runtime/parallelize.py shards it (tensor parallel, FSDP2)
or splits it (pipeline), then materialises each rank's part with `materialize`: to_empty on the
device, then a `MetaInit` built from the meta model before anything touched it. Four things keep
the part equal to the one-device model (tests/test_meta_init_parallelize.py checks the equality):

1. Ties. to_empty gives every module a new tensor, so a parameter registered under two names (the
   bundled GPT's lm_head and embedding) became two, and a larger, different model trained with
   no error. `MetaInit` records the ties on the meta model by module (`_tied_slots`) and binds each
   tie's slots to one parameter again (`_retie`; FSDP2 keeps ties, a plain module and DDP do not).
2. The model's own initialisation (`own_init`), run on the whole model as its own class: its
   init_weights() (planner's Transformer and MLP, Hugging Face's PreTrainedModel), or
   torchvision's, repeated here for ResNet and VisionTransformer (they initialise in __init__,
   which ran on meta). FSDP2 swaps the class for FSDP<Name>, which Hugging Face's init_weights
   takes for custom code, and then skips every module without parameters of its own (GPT-2's
   attention and MLP, whose c_proj get their depth-scaled std there): the class is swapped back
   while it runs.
3. Pipeline stages split by torch.fx hold the model's own submodules; a stage is initialised
   through the whole model, whose other stages stay on meta. A random fill of a meta tensor is
   drawn into a scratch tensor and thrown away (`_DrawAsOneDevice`), so the stage's draws come
   where the whole model's would; every part starts from the RNG state the first one started
   from; a tie across stages is bound to the copy at hand while the init runs, so that copy
   gets the tie's last draw, as on one device. Stages split by torch.export hold copies, not
   the model's modules: refused with one line.
4. Sharded (DTensor) parameters. On a CPU mesh torch draws each shard from the generator's own
   state, so every dp rank's shard of a ZeRO-3 parameter held the same numbers. A random fill of
   a DTensor is drawn at full size on this rank and the local shard kept (`_DrawAsOneDevice`): the
   shards are slices of one draw, and the RNG advances as on one device.

Cost: each part's init draws the whole model's random numbers (every rank, every part); the
scratch holds one full-size parameter at a time. Limits: torchvision's initialisation is repeated
in kind, not in draw order (its __init__ draws in construction order, lost on meta); a user's
init_fn is called on each part as it is (after the re-tie, with sharded draws as in 4); and
torch.nn.init functions that skip meta tensors themselves (trunc_normal_, orthogonal_, sparse_,
dirac_) draw nothing for another stage's tensors, so a later stage's draws are not one device's
there.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Partial
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils._python_dispatch import TorchDispatchMode

from specs import SpecError

InitFn = Callable[[nn.Module], None]


def materialize(part: nn.Module, device: torch.device, init: MetaInit) -> None:
    """Allocate `part`'s meta tensors on `device` (to_empty) and initialise them with `init`.

    Args:
        part: the model, one pipeline stage of it, or either wrapped by DDP; after sharding.
        device: where its tensors live.
        init: built from the model on meta before it was sharded or split.
    """
    if not any(t.is_meta for t in (*part.parameters(), *part.buffers())):
        return
    part.to_empty(device=device)
    with torch.no_grad():
        init(part.module if isinstance(part, DDP) else part)


def own_init(model: nn.Module) -> InitFn | None:
    """The model's own initialisation as a function of the model (None: none known)."""
    if hasattr(model, "init_weights"):
        return type(model).init_weights
    kind = (type(model).__module__, type(model).__name__)
    if kind == ("torchvision.models.resnet", "ResNet"):
        return _init_torchvision_resnet
    if kind == ("torchvision.models.vision_transformer", "VisionTransformer"):
        return _init_torchvision_vit
    return None


class MetaInit:
    """parallelize's init for one model built on meta, called once per materialised part (the
    model, or a pipeline stage) under torch.no_grad(), after to_empty.

    Args:
        model: the whole model, still on meta and not yet sharded or split.
        init_fn: the user's init, called on each part as it is (default: `own_init`, run through
            the whole model).
        ref: the model's name in messages.
        context, remedy: how messages begin, and what they advise.

    Raises:
        SpecError: no init_fn and no initialisation known for the model.
    """

    def __init__(self, model: nn.Module, init_fn: InitFn | None = None, *, ref: str = "the model",
                 context: str = "model on the meta device",
                 remedy: str = "pass init_fn= to parallelize, or build the model on a real device"):
        self.model, self.init_fn, self.ref = model, init_fn, ref
        self._context, self._remedy = context, remedy
        self._own = own_init(model) if init_fn is None else None
        if init_fn is None and self._own is None:
            raise SpecError(
                f"{context}: {ref} ({type(model).__name__}) has no init_weights() to initialise its shards once "
                f"they are materialised; give the module an init_weights() (called under torch.no_grad() on the "
                f"sharded model), or {remedy}"
            )
        self._ties, self._cls = _tied_slots(model), type(model)
        self._rng_start: list[tuple[torch.device, torch.Tensor]] | None = None

    def __call__(self, part: nn.Module) -> None:
        _retie(part, self._ties)
        with _DrawAsOneDevice(_device_of(part)):
            if self.init_fn is not None:
                self.init_fn(part)
            else:
                self._init_through_model(part)

    def _init_through_model(self, part: nn.Module) -> None:
        model = self.model
        if part is not model and not {id(p) for p in part.parameters()} <= {id(p) for p in model.parameters()}:
            raise SpecError(
                f"{self._context}: {self.ref} is split into pipeline stages by torch.export, whose stages are "
                f"copies of its modules fixed to the meta device they were traced on; {self._remedy}, or plan pp=1"
            )
        self._same_rng_for_every_part(_device_of(part))
        slots = _tensor_slots(model) + _tensor_slots(part)
        _bind_ties_to(self._ties, {id(p) for p in part.parameters()})
        for m in model.modules():  # Hugging Face skips a module it marked initialised (by an earlier part)
            m.__dict__.pop("_is_hf_initialized", None)
        sharded_cls = type(model)
        model.__class__ = self._cls  # FSDP2's FSDP<Name> back to <Name> while it initialises
        try:
            self._own(model)
        finally:
            model.__class__ = sharded_cls
            # each part keeps the tensors it was materialised with: Hugging Face's tie_weights
            # re-binds (in a stage, possibly to another stage's tensor, still on meta)
            for table, attr, tensor in slots:
                table[attr] = tensor

    def _same_rng_for_every_part(self, device: torch.device) -> None:
        """The first part records the RNG state; every later one starts from it again (each draws
        the whole model's numbers, so on every rank the state after a part is the same)."""
        if self._rng_start is None:
            self._rng_start = [(torch.device("cpu"), torch.get_rng_state())]
            if device.type == "cuda":
                self._rng_start.append((device, torch.cuda.get_rng_state(device)))
            return
        for dev, state in self._rng_start:
            if dev.type == "cpu":
                torch.set_rng_state(state)
            else:
                torch.cuda.set_rng_state(state, dev)


def _device_of(part: nn.Module) -> torch.device:
    for t in (*part.parameters(), *part.buffers()):
        if not t.is_meta:
            return t.device
    return torch.device("cpu")


class _DrawAsOneDevice(TorchDispatchMode):
    """Random fills (normal_, uniform_, ...) drawn as on one device: a DTensor's at full size on
    this rank, its local shard kept; a meta tensor's into a scratch tensor on `device` (or the
    op's generator's), thrown away. Other ops run as they are."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = args[0] if args else None
        if not (_is_random_fill(func) and isinstance(target, torch.Tensor)
                and not any(isinstance(a, torch.Tensor) for a in args[1:])):
            return func(*args, **kwargs)
        if isinstance(target, DTensor):
            if any(isinstance(p, Partial) for p in target.placements):
                return func(*args, **kwargs)
            local = target.to_local()
            full = torch.empty_strided(target.shape, target.stride(), dtype=target.dtype,
                                       device=self.device if local.is_meta else local.device)
            func(full, *args[1:], **kwargs)
            if not local.is_meta:
                shape, offset = compute_local_shape_and_global_offset(target.shape, target.device_mesh,
                                                                      target.placements)
                local.copy_(full[tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))])
            return target
        if target.is_meta:
            gen = kwargs.get("generator")
            scratch = torch.empty_strided(target.shape, target.stride(), dtype=target.dtype,
                                          device=gen.device if gen is not None else self.device)
            func(scratch, *args[1:], **kwargs)
            return target
        return func(*args, **kwargs)


def _is_random_fill(func) -> bool:
    return torch.Tag.nondeterministic_seeded in func.tags and func._schema.name.endswith("_")


def _tensor_slots(module: nn.Module) -> list[tuple[dict, str, torch.Tensor]]:
    """(the _parameters or _buffers dict holding it, its name there, it) for each tensor."""
    return [(table, attr, tensor) for mod in module.modules() for table in (mod._parameters, mod._buffers)
            for attr, tensor in table.items() if tensor is not None]


Slot = tuple[nn.Module, str]  # (module, attribute name) holding a parameter


def _tied_slots(model: nn.Module) -> list[list[Slot]]:
    """The slots of each parameter registered in several (module, name) slots. Kept by module, not
    by name: the modules stay the same objects through tensor parallel, activation checkpointing's
    wrappers (which rename them), FSDP2 and the pipeline split."""
    slots: dict[int, list[Slot]] = {}
    for mod in model.modules():
        for attr, p in mod._parameters.items():
            if p is not None:
                slots.setdefault(id(p), []).append((mod, attr))
    return [group for group in slots.values() if len(group) > 1]


def _retie(part: nn.Module, ties: list[list[Slot]]) -> None:
    """Make the slots of each tie in `part` hold one parameter again (where to_empty gave each its
    own; copies of another kind, shape or DTensor placement are left apart)."""
    mods = {id(m) for m in part.modules()}
    for group in ties:
        present = [(m, attr) for m, attr in group if id(m) in mods]
        if len(present) < 2:
            continue
        f = present[0][0]._parameters[present[0][1]]
        for m, attr in present[1:]:
            a = m._parameters[attr]
            if a is f or type(a) is not type(f) or a.shape != f.shape:
                continue
            if isinstance(f, DTensor) and (a.device_mesh, a.placements) != (f.device_mesh, f.placements):
                continue
            m._parameters[attr] = f


def _bind_ties_to(ties: list[list[Slot]], part_ids: set[int]) -> None:
    """For the whole model's init: every slot of a tie bound to one tensor, the part's copy if it
    holds one (a tie across pipeline stages), else one already materialised; the caller restores
    the model's own tensors afterwards."""
    for group in ties:
        tensors = [m._parameters[attr] for m, attr in group]
        keep = next((t for t in tensors if id(t) in part_ids), None)
        if keep is None:
            keep = next((t for t in tensors if not t.is_meta), None)
        if keep is not None:
            for m, attr in group:
                m._parameters[attr] = keep


def _reset_parameters(model: nn.Module) -> None:
    """Every layer's own default initialisation (nn.Linear, nn.Conv2d, norms incl. BatchNorm's
    running statistics, nn.MultiheadAttention's projections), inner modules first (so that
    MultiheadAttention zeroes its out_proj's bias after nn.Linear's reset, as in __init__)."""
    for m in reversed(list(model.modules())):
        reset = getattr(m, "reset_parameters", None) or getattr(m, "_reset_parameters", None)
        if callable(reset):
            reset()


def _init_torchvision_resnet(model: nn.Module) -> None:
    """torchvision/models/resnet.py ResNet.__init__: Kaiming-normal (fan_out, relu) convolutions,
    norms at weight 1 and bias 0, nn.Linear's default for fc (zero_init_residual=False, the
    bundled default)."""
    _reset_parameters(model)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def _init_torchvision_vit(model: nn.Module) -> None:
    """torchvision/models/vision_transformer.py: MLPBlock.__init__ (Xavier-uniform weights, biases
    normal(std=1e-6)), Encoder.__init__ (pos_embedding normal(std=0.02)) and
    VisionTransformer.__init__ (class token 0, patchify stem truncated-normal(std=sqrt(1/fan_in)),
    pre_logits likewise, head 0); every other layer keeps its default."""
    from torchvision.models.vision_transformer import MLPBlock

    _reset_parameters(model)
    for block in model.modules():
        if isinstance(block, MLPBlock):
            for m in block.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                    if m.bias is not None:
                        nn.init.normal_(m.bias, std=1e-6)
    model.class_token.zero_()
    nn.init.normal_(model.encoder.pos_embedding, std=0.02)
    stem = model.conv_proj
    if isinstance(stem, nn.Conv2d):
        _trunc_normal_fan_in(stem, stem.in_channels * stem.kernel_size[0] * stem.kernel_size[1])
    elif isinstance(getattr(stem, "conv_last", None), nn.Conv2d):
        nn.init.normal_(stem.conv_last.weight, std=math.sqrt(2.0 / stem.conv_last.out_channels))
        if stem.conv_last.bias is not None:
            nn.init.zeros_(stem.conv_last.bias)
    if isinstance(getattr(model.heads, "pre_logits", None), nn.Linear):
        _trunc_normal_fan_in(model.heads.pre_logits, model.heads.pre_logits.in_features)
    if isinstance(model.heads.head, nn.Linear):
        nn.init.zeros_(model.heads.head.weight)
        nn.init.zeros_(model.heads.head.bias)


def _trunc_normal_fan_in(layer: nn.Module, fan_in: int) -> None:
    nn.init.trunc_normal_(layer.weight, std=math.sqrt(1 / fan_in))
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
