"""LoRA adapters (peft) on the UNet and the VAE: where they sit, their weights and their scale.

Several adapters (one per loaded model and direction) live side by side in the same frozen
network; `activate` picks the one that runs and scales its delta (gamma in stochastic mode).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from typing import cast

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from turbo.errors import TurboError


class LoraWeightsError(TurboError):
    """LoRA weights that do not fit the network they are loaded into."""


def matches(name: str, patterns: Iterable[str]) -> bool:
    """peft's rule for a list of target modules: the exact name, or a suffix after a dot."""
    return any(name == p or name.endswith("." + p) for p in patterns)


def find_targets(model: nn.Module, patterns: Iterable[str], skip_prefixes: Iterable[str] = ()) -> list[str]:
    """Full names of the Linear/Conv2d modules of `model` that peft would adapt for `patterns`."""
    patterns, skip = list(patterns), tuple(skip_prefixes)
    names = []
    for name, module in model.named_modules():
        if name.endswith(".base_layer") or ".lora_" in name:
            continue  # peft's own sub-modules
        base = module.get_base_layer() if isinstance(module, LoraLayer) else module
        if isinstance(base, (nn.Linear, nn.Conv2d)) and not name.startswith(skip) and matches(name, patterns):
            names.append(name)
    return names


def add_lora(model: nn.Module, adapter: str, targets: list[str], rank: int, alpha: float) -> None:
    """Inject a LoRA adapter named `adapter` into exactly the modules `targets` (full names).

    peft initialises B to zero (the network is unchanged until weights are loaded or trained).
    peft also marks every non-LoRA parameter as frozen; callers re-enable what they train.
    """
    if not targets:
        raise LoraWeightsError(f"adapter {adapter!r} has no target modules")
    # Anchored full names: a plain name would also match deeper modules with the same suffix.
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,  # type: ignore[arg-type]  # peft annotates int; it only divides by it (alpha / r)
        target_modules=targets,
        init_lora_weights="gaussian",
        lora_dropout=0.0,
    )
    with warnings.catch_warnings():
        # peft warns when a network already carries adapters; several per network is the design.
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(config, model, adapter_name=adapter)
    for _, layer in lora_layers(model):
        if adapter in layer.lora_A:
            # Newly injected adapters must not run until activated.
            _set_active(layer, [a for a in layer.active_adapters if a != adapter])


def _set_active(layer: LoraLayer, adapters: list[str]) -> None:
    """peft's `set_adapter`, keeping every adapter's requires_grad as it was: peft's would freeze the
    adapters that do not run (one direction's while the other direction trains) and unfreeze the one
    that does (a model at inference)."""
    flags = [
        (p, p.requires_grad) for name in layer.adapter_layer_names for p in getattr(layer, name).parameters()
    ]
    layer.set_adapter(adapters)
    for p, flag in flags:
        p.requires_grad_(flag)


def adapter_weight(mods: nn.ModuleDict, adapter: str) -> nn.Parameter:
    """The weight of `adapter` in a LoRA layer's `lora_A` or `lora_B` (a bias-free Linear or Conv2d)."""
    # cast: nn.Module's attribute lookup is typed Tensor | Module
    return cast(nn.Parameter, mods[adapter].weight)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def load_lora_weights(model: nn.Module, adapter: str, weights: dict[str, torch.Tensor], where: str) -> None:
    """Copy `{"<module>.lora_A.weight": A, "<module>.lora_B.weight": B}` into adapter `adapter`.

    `where` names the checkpoint in error messages. Every LoRA layer of the adapter must be given.
    """
    layers = {name: layer for name, layer in lora_layers(model) if adapter in layer.lora_A}
    expected = {f"{n}.lora_{ab}.weight" for n in layers for ab in "AB"}
    missing, unexpected = expected - weights.keys(), weights.keys() - expected
    if unexpected:
        raise LoraWeightsError(
            f"{where}: LoRA weights for modules the base does not have: {sorted(unexpected)[:5]}"
        )
    if missing:
        raise LoraWeightsError(f"{where}: missing LoRA weights: {sorted(missing)[:5]}")
    with torch.no_grad():
        for name, layer in layers.items():
            for ab, mods in (("A", layer.lora_A), ("B", layer.lora_B)):
                src, dst = weights[f"{name}.lora_{ab}.weight"], adapter_weight(mods, adapter)
                if src.shape != dst.shape:
                    shapes = f"has shape {tuple(src.shape)}, the base needs {tuple(dst.shape)}"
                    raise LoraWeightsError(f"{where}: {name}.lora_{ab} {shapes}")
                dst.copy_(src.to(dst.dtype))


def lora_weights(model: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """The adapter's weights as `{"<module>.lora_A.weight": A, "<module>.lora_B.weight": B}`."""
    out = {}
    for name, layer in lora_layers(model):
        if adapter in layer.lora_A:
            out[f"{name}.lora_A.weight"] = adapter_weight(layer.lora_A, adapter).detach()
            out[f"{name}.lora_B.weight"] = adapter_weight(layer.lora_B, adapter).detach()
    return out


def lora_parameters(model: nn.Module, adapter: str) -> list[nn.Parameter]:
    params = []
    for _, layer in lora_layers(model):
        if adapter in layer.lora_A:
            params += [adapter_weight(layer.lora_A, adapter), adapter_weight(layer.lora_B, adapter)]
    return params


def activate(model: nn.Module, adapter: str | None, scale: float | torch.Tensor = 1.0) -> None:
    """Run only `adapter` (None: no adapter) with its delta multiplied by `scale`.

    `scale` may be a tensor of shape (B,) to scale each sample of a batch differently (diverse-output
    training); it is reshaped per layer so it broadcasts over (B, C, H, W) or (B, tokens, C).
    """
    for _, layer in lora_layers(model):
        if adapter is None or adapter not in layer.lora_A:
            if layer.active_adapters:
                _set_active(layer, [])
            continue
        if layer.active_adapters != [adapter]:
            _set_active(layer, [adapter])
        s = scale
        if isinstance(scale, torch.Tensor):
            dims = 4 if isinstance(layer.get_base_layer(), nn.Conv2d) else 3
            s = scale.reshape(-1, *([1] * (dims - 1)))
        # s * alpha / r; peft annotates a float, a tensor scales per sample the same way
        layer.set_scale(adapter, s)  # type: ignore[arg-type]


def remove_lora(model: nn.Module, adapter: str) -> None:
    """Delete the adapter's layers and weights from every LoRA layer that has it."""
    for _, layer in lora_layers(model):
        if adapter in layer.lora_A:
            # deactivated first: peft would warn, and switch another adapter on, on deleting an active one
            _set_active(layer, [a for a in layer.active_adapters if a != adapter])
            layer.delete_adapter(adapter)
    # inject_adapter_in_model records each adapter's config on the network; left there, a long-running
    # app that loads and evicts models would keep one per load
    configs = getattr(model, "peft_config", None)
    if isinstance(configs, dict):
        configs.pop(adapter, None)


# Where the original code puts its adapters (module-name patterns, peft list semantics).
PAIRED_UNET_PATTERNS = (
    "to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_shortcut", "conv_out",
    "proj_in", "proj_out", "ff.net.2", "ff.net.0.proj",
)  # fmt: skip
VAE_PATTERNS = (
    "conv1", "conv2", "conv_in", "conv_shortcut", "conv", "conv_out",
    "skip_conv_1", "skip_conv_2", "skip_conv_3", "skip_conv_4", "to_k", "to_q", "to_v", "to_out.0",
)  # fmt: skip
_UNPAIRED_GREP = (
    "to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_in", "conv_shortcut", "conv_out",
    "proj_out", "proj_in", "ff.net.2", "ff.net.0.proj",
)  # fmt: skip


def unpaired_unet_groups(unet: nn.Module) -> dict[str, list[str]]:
    """The original CycleGAN-Turbo's UNet targets, split into encoder/decoder/other groups.

    It greps parameter names by substring (not peft's suffix rule): every weight (not bias/norm)
    whose name contains one of the patterns; down blocks and conv_in form the "encoder" group.
    """
    groups: dict[str, list[str]] = {"encoder": [], "decoder": [], "other": []}
    for n, _ in unet.named_parameters():
        if "bias" in n or "norm" in n or ".lora_" in n or not any(p in n for p in _UNPAIRED_GREP):
            continue
        module = n.rsplit(".", 1)[0].replace(".base_layer", "")
        if module.startswith("conv_in"):
            module = "conv_in"
        group = (
            "encoder"
            if ("down_blocks" in n or "conv_in" in n)
            else "decoder"
            if "up_blocks" in n
            else "other"
        )
        if module not in groups[group]:
            groups[group].append(module)
    return groups
