"""Hugging Face causal LMs built from small configs (no download), for the pipeline tests.

`build_hf(family)` returns a float64 `Wrap` (tokens (B, T) -> logits (B, T, vocab): the
schedule's loss needs a tensor, not a ModelOutput) and its block names in execution order:
the embedding (with, for rotary families, the rotary module, which the model calls once before
the first layer), one block per decoder layer, then the final norm with the LM head. torch.fx
cannot trace these models (transformers 5.x), so runtime.pipeline_split splits them with
torch.export, and every layer reads values computed once at the top (rotary cos/sin, the
causal mask): the pipeline must carry them through the stages in between.
"""

from __future__ import annotations

import torch
from torch import nn

VOCAB, SEQ, LAYERS = 128, 32, 4
FAMILIES = ("hf_gpt2", "hf_llama", "hf_qwen3")


class Wrap(nn.Module):
    """Logits only: `m` is the Hugging Face model."""

    def __init__(self, m: nn.Module):
        super().__init__()
        self.m = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m(input_ids=x, use_cache=False).logits


def build_hf(family: str, num_layers: int = LAYERS) -> tuple[nn.Module, list[str]]:
    """(float64 model, block names) of a small `family` model ("hf_gpt2", "hf_llama", "hf_qwen3")."""
    import transformers

    if family == "hf_gpt2":
        cfg = transformers.GPT2Config(n_layer=num_layers, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=SEQ,
                                      use_cache=False, bos_token_id=0, eos_token_id=0,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        m = transformers.GPT2LMHeadModel(cfg)
    elif family in ("hf_llama", "hf_qwen3"):
        config = transformers.LlamaConfig if family == "hf_llama" else transformers.Qwen3Config
        cfg = config(num_hidden_layers=num_layers, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=SEQ,
                     use_cache=False, attn_implementation="eager", tie_word_embeddings=False)
        m = transformers.LlamaForCausalLM(cfg) if family == "hf_llama" else transformers.Qwen3ForCausalLM(cfg)
    else:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    return Wrap(m).double(), block_names(family, num_layers)


def block_names(family: str, num_layers: int = LAYERS) -> list[str]:
    """Block names of `build_hf(family, num_layers)`'s model, in execution order."""
    layers = range(num_layers)
    if family == "hf_gpt2":
        return (["m.transformer.wte+m.transformer.wpe+m.transformer.drop"]
                + [f"m.transformer.h.{i}" for i in layers] + ["m.transformer.ln_f+m.lm_head"])
    return (["m.model.embed_tokens+m.model.rotary_emb"] + [f"m.model.layers.{i}" for i in layers]
            + ["m.model.norm+m.lm_head"])
