"""A plain MLP: Linear -> GELU -> Linear blocks with residuals, for the smallest tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class MLPConfig:
    in_features: int = 32
    hidden: int = 64
    ffn_hidden: int = 128
    num_layers: int = 4
    out_features: int = 8


class MLPBlock(nn.Module):
    def __init__(self, cfg: MLPConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.hidden)
        self.up_proj = nn.Linear(cfg.hidden, cfg.ffn_hidden)
        self.down_proj = nn.Linear(cfg.ffn_hidden, cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down_proj(F.gelu(self.up_proj(self.norm(x))))


class MLP(nn.Module):
    """(B, in_features) -> (B, out_features)."""

    def __init__(self, cfg: MLPConfig | None = None):
        super().__init__()
        cfg = cfg or MLPConfig()
        self.cfg = cfg
        self.embed = nn.Linear(cfg.in_features, cfg.hidden)
        self.layers = nn.ModuleList(MLPBlock(cfg) for _ in range(cfg.num_layers))
        self.head = nn.Linear(cfg.hidden, cfg.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.normal_(mod.weight, 0.0, 0.05, generator=gen if mod.weight.device.type == "cpu" else None)
                nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.LayerNorm):
                mod.reset_parameters()


MLP_CONFIGS = {
    "mlp-tiny": MLPConfig(),
    "mlp-small": MLPConfig(in_features=256, hidden=512, ffn_hidden=2048, num_layers=8, out_features=16),
}
