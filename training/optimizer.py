"""AdamW with parameter groups updated more than once per step, as a parameter listed twice is.

The original CycleGAN-Turbo trainer lists the first conv's and the skip convs' LoRA weights twice in
its generator optimizer (once among the LoRA weights, once among those modules' own parameters).
torch's for-loop AdamW (`foreach=False`) given such a list updates each of them twice per step, one
full AdamW update after the other with the same gradient: the moments, the step count and the weight
decay advance twice, which is not one update with twice the learning rate. A group with
`"updates": 2` here gets exactly that, whatever the implementation (torch's foreach and fused
kernels, the defaults on a GPU, leave the order of a duplicated tensor's updates undefined).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class RepeatedAdamW(torch.optim.AdamW):
    """`torch.optim.AdamW` whose param groups may carry `"updates": n` (n >= 1, default 1): `step()`
    updates every group once, then steps those with n > 1 again, until each had its n updates."""

    def step(self, closure: Callable[[], float] | None = None):
        loss = super().step(closure)
        groups = self.param_groups
        rounds = max((int(g.get("updates", 1)) for g in groups), default=1)
        for k in range(1, rounds):
            # torch's step walks self.param_groups: show it the groups that are due another update
            self.param_groups = [g for g in groups if int(g.get("updates", 1)) > k]
            try:
                super().step()
            finally:
                self.param_groups = groups
        return loss
