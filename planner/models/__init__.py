"""Bundled models, by name, and `package.module:factory` references.

`build_model(ref, device=..., dtype=...) -> BuiltModel` gives the module, example inputs (dim 0 is
the batch), a loss function and a synthetic-batch maker. Nothing is downloaded: torchvision and
Hugging Face models are built from configs with random weights.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from planner.models.mlp import MLP, MLP_CONFIGS, MLPConfig
from planner.models.transformer import (
    GPT_CONFIGS,
    LLAMA_CONFIGS,
    MOE_CONFIGS,
    Transformer,
    TransformerConfig,
)
from specs import SpecError


def lm_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy; the targets are the inputs (synthetic language modelling)."""
    return F.cross_entropy(logits.flatten(0, -2).float(), tokens.flatten())


def mse_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out, target)


def class_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, target)


@dataclass
class BuiltModel:
    name: str
    module: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None  # None: the factory gave none
    make_batch: Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    info: dict[str, Any] = field(default_factory=dict)


def _lm(name: str, cfg: TransformerConfig, batch: int, device, dtype) -> BuiltModel:
    with torch.device(device):
        model = Transformer(cfg)
    if dtype is not None:
        model = model.to(dtype)
    tokens = torch.zeros(batch, cfg.seq_len, dtype=torch.long, device=device)

    def make_batch(b: int, gen: torch.Generator):
        t = torch.randint(0, cfg.vocab_size, (b, cfg.seq_len), generator=gen)
        return t, t

    return BuiltModel(name, model, (tokens,), lm_loss, make_batch, {"config": cfg, "seq_len": cfg.seq_len})


def _mlp(name: str, cfg: MLPConfig, batch: int, device, dtype) -> BuiltModel:
    with torch.device(device):
        model = MLP(cfg)
    if dtype is not None:
        model = model.to(dtype)
    if device != "meta" and torch.device(device).type != "meta":
        model.init_weights(0)
    x = torch.zeros(batch, cfg.in_features, device=device, dtype=dtype or torch.float32)

    def make_batch(b: int, gen: torch.Generator):
        return (torch.randn(b, cfg.in_features, generator=gen, dtype=dtype or torch.float32),
                torch.randn(b, cfg.out_features, generator=gen, dtype=dtype or torch.float32))

    return BuiltModel(name, model, (x,), mse_loss, make_batch, {"config": cfg})


def _torchvision(name: str, batch: int, device, dtype, image: int = 224, num_classes: int = 1000) -> BuiltModel:
    try:
        import torchvision
    except ImportError as e:  # pragma: no cover - dev extra
        raise SpecError(f"model {name!r} needs torchvision (pip install 'autoplan[dev]'): {e}") from None
    with torch.device(device):
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if dtype is not None:
        model = model.to(dtype)
    x = torch.zeros(batch, 3, image, image, device=device, dtype=dtype or torch.float32)

    def make_batch(b: int, gen: torch.Generator):
        return (torch.randn(b, 3, image, image, generator=gen, dtype=dtype or torch.float32),
                torch.randint(0, num_classes, (b,), generator=gen))

    return BuiltModel(name, model, (x,), class_loss, make_batch, {"image": image})


TORCHVISION_BUNDLED = ("resnet18", "resnet50", "vit_b_16")

# Hugging Face transformers models built from small configs (random weights, nothing downloaded),
# eager attention and no KV cache so torch.export can capture them.
HF_BUNDLED = {
    "hf-gpt2-tiny": ("GPT2Config", "GPT2LMHeadModel",
                     dict(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64,
                          bos_token_id=0, eos_token_id=0), 32),
    "hf-llama-tiny": ("LlamaConfig", "LlamaForCausalLM",
                      dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                           max_position_embeddings=64, bos_token_id=0, eos_token_id=0), 32),
    # Mixtral's structure (routed SwiGLU experts, top-2); its experts trace as one op (planner.experts)
    "hf-mixtral-tiny": ("MixtralConfig", "MixtralForCausalLM",
                        dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                             num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                             num_local_experts=4, num_experts_per_tok=2,
                             max_position_embeddings=64, bos_token_id=0, eos_token_id=0), 32),
}


def _hf(name: str, batch: int, device, dtype) -> BuiltModel:
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - dev extra
        raise SpecError(f"model {name!r} needs transformers (pip install 'autoplan[dev]'): {e}") from None
    cfg_cls, model_cls, kwargs, seq = HF_BUNDLED[name]
    cfg = getattr(transformers, cfg_cls)(**kwargs, use_cache=False, attn_implementation="eager")
    with torch.device(device):
        model = getattr(transformers, model_cls)(cfg)
    if dtype is not None:
        model = model.to(dtype)
    tokens = torch.zeros(batch, seq, dtype=torch.long, device=device)

    def make_batch(b: int, gen: torch.Generator):
        t = torch.randint(0, cfg.vocab_size, (b, seq), generator=gen)
        return t, t

    def loss(out, target):
        return lm_loss(out.logits if hasattr(out, "logits") else out, target)

    return BuiltModel(name, model, (tokens,), loss, make_batch, {"config": cfg, "seq_len": seq})


def list_models() -> list[str]:
    return sorted([*GPT_CONFIGS, *LLAMA_CONFIGS, *MOE_CONFIGS, *MLP_CONFIGS, *TORCHVISION_BUNDLED, *HF_BUNDLED])


def is_bundled(ref: str) -> bool:
    """Whether `ref` names a bundled model: building it is a lookup, it imports no user code."""
    return ref in list_models()


def build_model(
    ref: str, *, batch: int = 1, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> BuiltModel:
    """Build a bundled model by name, or import and call `package.module:factory`.

    A factory returns an nn.Module, a (module, example_inputs) pair, or a BuiltModel. Only pass a
    `ref` that the user gave on their own command line or in their own code: a factory reference
    is code to run, so one read from a file (a plan, a hardware spec, a checkpoint) must be
    checked with `is_bundled` first (planner.explain.whynot.build_graph does).
    """
    if ref in GPT_CONFIGS:
        return _lm(ref, GPT_CONFIGS[ref], batch, device, dtype)
    if ref in LLAMA_CONFIGS:
        return _lm(ref, LLAMA_CONFIGS[ref], batch, device, dtype)
    if ref in MOE_CONFIGS:
        return _lm(ref, MOE_CONFIGS[ref], batch, device, dtype)
    if ref in MLP_CONFIGS:
        return _mlp(ref, MLP_CONFIGS[ref], batch, device, dtype)
    if ref in TORCHVISION_BUNDLED:
        return _torchvision(ref, batch, device, dtype)
    if ref in HF_BUNDLED:
        return _hf(ref, batch, device, dtype)
    if ":" in ref:
        return _from_factory(ref, batch, device, dtype)
    raise SpecError(
        f"unknown model {ref!r}; bundled models: {', '.join(list_models())}; "
        f"or name a factory as package.module:function"
    )


def _from_factory(ref: str, batch: int, device, dtype) -> BuiltModel:
    mod_name, _, fn_name = ref.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except Exception as e:  # any import-time failure is the user's module's
        raise SpecError(f"model {ref!r}: cannot import module {mod_name!r}: {type(e).__name__}: {e}") from None
    fn = getattr(mod, fn_name, None)
    if fn is None or not callable(fn):
        raise SpecError(f"model {ref!r}: module {mod_name!r} has no callable {fn_name!r}")
    try:
        with torch.device(device):
            out = fn()
    except Exception as e:  # the user's factory failed: name it, keep the message on one line
        first = (str(e).strip().splitlines() or [""])[0]
        raise SpecError(f"model {ref!r}: the factory {fn_name}() raised {type(e).__name__}: {first}; "
                        f"fix the factory (it is called with no arguments)") from None
    if isinstance(out, BuiltModel):
        return out
    loss_fn = None
    if isinstance(out, tuple) and len(out) in (2, 3) and isinstance(out[0], nn.Module):
        module, inputs = out[:2]
        inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
        if len(out) == 3:
            loss_fn = out[2]
            if not callable(loss_fn):
                raise SpecError(f"model {ref!r}: the factory's third value must be loss_fn(outputs, targets) -> "
                                f"the mean loss, got {type(loss_fn).__name__}")
    elif isinstance(out, nn.Module):
        raise SpecError(
            f"model {ref!r}: the factory returned a module without example inputs; return "
            f"(module, example_inputs) so the tracer knows the input shapes"
        )
    else:
        raise SpecError(f"model {ref!r}: the factory must return an nn.Module with example inputs, got {type(out).__name__}")
    if dtype is not None:
        module = module.to(dtype)

    def make_batch(b: int, gen: torch.Generator):
        xs = [torch.randn((b, *x.shape[1:]), generator=gen) if x.is_floating_point()
              else torch.randint(0, 2, (b, *x.shape[1:]), generator=gen) for x in inputs]
        return xs[0], xs[0]

    # no loss given: planning needs none; runtime.launch refuses to train without one (it once
    # trained an LM on mse_loss(output, inputs), which failed as a peer rank's death)
    return BuiltModel(ref, module, inputs, loss_fn, make_batch, {})


__all__ = ["BuiltModel", "build_model", "is_bundled", "list_models", "lm_loss", "GPT_CONFIGS", "LLAMA_CONFIGS",
           "MOE_CONFIGS", "MLP_CONFIGS", "Transformer", "TransformerConfig", "MLP", "MLPConfig"]
