"""Signal propagation layer by layer, as Glorot & Bengio (2010) measure it.

For every 3x3 convolution along the data path (encoder shallow to deep, then
decoder coarse to fine; order of :func:`unetseg.ablation.gradients.path_position`)
one forward and backward pass of a batch records:

- ``pre_var``: the variance of the convolution's output, the pre-activation
  ``z = W x + b`` (before normalisation, when there is one);
- ``grad_var``: the variance of the back-propagated gradient of the loss with
  respect to that pre-activation, ``dL/dz``;
- ``act_var``: the variance of the block's output activation (after its
  second convolution, normalisation and non-linearity), on ``conv2`` rows.

Glorot & Bengio's claim is about these quantities in networks without
normalisation: with standard initialisation the back-propagated gradient's
variance shrinks (or grows) from the output towards the input. Weight
gradients, which the ablation studies log, are a different quantity.

Shapes: ``images`` ``(N, C, H, W)`` float32, ``labels`` ``(N, H, W)`` int64.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from unetseg.ablation.gradients import path_position
from unetseg.model import UNet
from unetseg.model.blocks import ConvBlock


def signal_profile(
    model: UNet, images: torch.Tensor, labels: torch.Tensor, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> list[dict[str, Any]]:
    """One row per convolution on the data path, in path order: ``layer``, ``pre_var``, ``grad_var``, ``act_var``.

    The model runs in training mode (batch statistics, as in training) and is
    left unchanged apart from its gradients, which are cleared afterwards.
    """
    convs = {name: module for name, module in model.named_modules()
             if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d))
             and path_position(f"{name}.weight", len(model.channels)) is not None}
    blocks = {name: module for name, module in model.named_modules()
              if isinstance(module, ConvBlock) and f"{name}.conv2" in convs}
    rows: dict[str, dict[str, Any]] = {name: {"layer": name} for name in convs}
    handles = []

    def on_conv(name: str):
        def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            rows[name]["pre_var"] = float(output.detach().var())
            output.register_hook(lambda grad: rows[name].__setitem__("grad_var", float(grad.var())))
        return hook

    def on_block(name: str):
        def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            rows[f"{name}.conv2"]["act_var"] = float(output.detach().var())
        return hook

    try:
        for name, module in convs.items():
            handles.append(module.register_forward_hook(on_conv(name)))
        for name, module in blocks.items():
            handles.append(module.register_forward_hook(on_block(name)))
        was_training = model.training
        model.train()
        loss_fn(model(images), labels[:, None]).backward()
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    finally:
        for handle in handles:
            handle.remove()
    depth = len(model.channels)
    return sorted(rows.values(), key=lambda r: path_position(f"{r['layer']}.weight", depth))


def shrinkage(rows: list[dict[str, Any]], key: str = "grad_var") -> float:
    """``key`` at the first convolution over ``key`` at the last one on the path (the input side over the output
    side): below 1, the quantity shrinks on its way back to the input; above 1, it grows."""
    return rows[0][key] / rows[-1][key]
