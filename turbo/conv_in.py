"""The UNet's first conv, retrained per model (it now reads an image latent, not noise)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class SwitchableConvIn(nn.Module):
    """Stands in for `unet.conv_in`: one trained conv per adapter, the pretrained one otherwise.

    Models trained for diverse outputs keep a twin: their own copy of the pretrained conv, and the
    output is `(1 - gamma) * pretrained(x) + gamma * trained(x)` (the pretrained branch is detached,
    as in the original). `active` and `gamma` are set by the generator before every UNet call.
    """

    def __init__(self, pretrained: nn.Conv2d):
        super().__init__()
        self.pretrained = pretrained
        self.trained = nn.ModuleDict()
        self.twins = nn.ModuleDict()
        self.active: str | None = None
        self.gamma: float | torch.Tensor = 1.0
        # diffusers reads these from unet.conv_in in a few places
        self.in_channels, self.out_channels = pretrained.in_channels, pretrained.out_channels

    def add(self, name: str, twin: bool) -> None:
        """A trained conv for `name`, starting from the pretrained weights (and a twin if asked)."""
        self.trained[name] = copy.deepcopy(self.pretrained)
        if twin:
            self.twins[name] = copy.deepcopy(self.pretrained).requires_grad_(False)

    def remove(self, name: str) -> None:
        for d in (self.trained, self.twins):
            if name in d:
                del d[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.active is None:
            return self.pretrained(x)
        out = self.trained[self.active](x)
        if self.active in self.twins:
            g = self.gamma
            if isinstance(g, torch.Tensor):
                g = g.reshape(-1, 1, 1, 1).to(out.dtype)
            out = self.twins[self.active](x).detach() * (1 - g) + out * g
        return out
