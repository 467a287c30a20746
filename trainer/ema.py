"""Exponential moving average of a model's parameters (reference train.py:62-73)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    """An fp32 copy of a model, updated as ema = decay * ema + (1 - decay) * param after every
    optimizer step; initialised as an exact copy (the reference's `update_ema(decay=0)`, train.py:234).

    Covers all `named_parameters`, the frozen pos_embed included, as the reference does; a
    `state_dict` is the model's, so a checkpoint's EMA loads straight into a SiT."""

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1); got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema = list(self.model.parameters())
        params = [p.detach().float() for p in model.parameters()]
        torch._foreach_mul_(ema, self.decay)
        torch._foreach_add_(ema, params, alpha=1.0 - self.decay)

    def state_dict(self, *args, **kwargs):
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.model.load_state_dict(state_dict, strict=strict, assign=assign)
