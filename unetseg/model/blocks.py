"""Building blocks of the U-Net: convolution blocks, down- and up-sampling.

Every block works for 2D and 3D tensors; ``spatial_dims`` picks the layer
types. Tensors are channel-first: ``(batch, channels, *spatial)``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

NormName = Literal["batch", "instance", "group", "none"]
ActName = Literal["relu", "leaky_relu"]


def activation(act: ActName) -> Callable[[torch.Tensor], torch.Tensor]:
    """``torch.relu``, or leaky ReLU with slope 0.01 for negative inputs (nnU-Net's activation)."""
    if act == "relu":
        return torch.relu
    if act == "leaky_relu":
        return partial(F.leaky_relu, negative_slope=0.01)
    raise ValueError(f"act must be 'relu' or 'leaky_relu', got {act!r}")


def conv_layer(spatial_dims: int) -> type[nn.Module]:
    """Return ``nn.Conv2d`` or ``nn.Conv3d``."""
    return {2: nn.Conv2d, 3: nn.Conv3d}[spatial_dims]


def transposed_conv_layer(spatial_dims: int) -> type[nn.Module]:
    """Return ``nn.ConvTranspose2d`` or ``nn.ConvTranspose3d``."""
    return {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[spatial_dims]


def max_pool_layer(spatial_dims: int) -> type[nn.Module]:
    """Return ``nn.MaxPool2d`` or ``nn.MaxPool3d``."""
    return {2: nn.MaxPool2d, 3: nn.MaxPool3d}[spatial_dims]


def norm_layer(norm: NormName, spatial_dims: int, channels: int) -> nn.Module:
    """Normalisation layer over ``channels`` feature maps.

    Args:
        norm: ``"batch"``, ``"instance"`` (affine), ``"group"`` (8 groups, or
            fewer when ``channels`` is not divisible by 8), or ``"none"`` (identity:
            plain convolutions, which then carry a bias; see :class:`ConvBlock`).
        spatial_dims: 2 or 3.
        channels: number of feature maps.
    """
    if norm == "batch":
        return {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[spatial_dims](channels)
    if norm == "instance":
        return {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[spatial_dims](channels, affine=True)
    if norm == "group":
        groups = 8
        while channels % groups:
            groups //= 2
        return nn.GroupNorm(groups, channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"norm must be 'batch', 'instance', 'group' or 'none', got {norm!r}")


class ConvBlock(nn.Module):
    """Two 3x3 convolutions, each followed by normalisation and ReLU (or leaky ReLU, ``act``).

    With ``residual=True`` the block is a short (ResNet-style) skip:
    ``relu(shortcut(x) + branch(x))``, where ``branch`` is conv-norm-relu-conv-norm
    and ``shortcut`` is the identity, or a 1x1 convolution + norm when the channel
    count changes. ``lesion_residual=True`` (test time only) removes the
    residual branch, leaving ``relu(shortcut(x))``, as in Veit et al. (2016).

    Shapes: ``(B, in_channels, *S) -> (B, out_channels, *S)``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        norm: NormName = "batch",
        dropout: float = 0.0,
        residual: bool = False,
        act: ActName = "relu",
    ) -> None:
        super().__init__()
        conv = conv_layer(spatial_dims)
        self.act = activation(act)
        self.residual = residual
        self.lesion_residual = False
        bias = norm == "none"  # a normalisation layer after the convolution would cancel a bias
        self.conv1 = conv(in_channels, out_channels, kernel_size=3, padding=1, bias=bias)
        self.norm1 = norm_layer(norm, spatial_dims, out_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = conv(out_channels, out_channels, kernel_size=3, padding=1, bias=bias)
        self.norm2 = norm_layer(norm, spatial_dims, out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if residual and in_channels != out_channels:
            self.shortcut = nn.Sequential(
                conv(in_channels, out_channels, kernel_size=1, bias=bias),
                norm_layer(norm, spatial_dims, out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.residual and self.lesion_residual:
            return self.act(self.shortcut(x))
        y = self.act(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(self.dropout(y)))
        if self.residual:
            y = y + self.shortcut(x)
        return self.act(y)


class UpBlock(nn.Module):
    """Decoder level: transposed-convolution upsampling, optional long-skip merge, ConvBlock.

    Sized like segmentation_models_pytorch's decoder block by
    ``(in_channels, skip_channels, out_channels)``: a level without a long skip
    has ``skip_channels=0`` and reserves no channels for it.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the coarser decoder (or bottleneck) tensor.
        skip_channels: channels of the encoder tensor merged here; 0 for no skip.
        out_channels: channels after the block.
        merge: ``"concat"`` (U-Net, DenseNet-style) or ``"add"`` (ResNet-style;
            requires ``skip_channels`` equal to ``out_channels``).
        norm, dropout, residual, act: as for :class:`ConvBlock`.

    Shapes: ``x (B, in_channels, *S)``, ``skip (B, skip_channels, *2S)`` or ``None``
    -> ``(B, out_channels, *2S)``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        skip_channels: int,
        out_channels: int,
        merge: Literal["concat", "add"] = "concat",
        norm: NormName = "batch",
        dropout: float = 0.0,
        residual: bool = False,
        act: ActName = "relu",
    ) -> None:
        super().__init__()
        if merge not in ("concat", "add"):
            raise ValueError(f"merge must be 'concat' or 'add', got {merge!r}")
        if merge == "add" and skip_channels not in (0, out_channels):
            raise ValueError(
                f"merge='add' needs skip_channels == out_channels, got {skip_channels} and {out_channels}"
            )
        self.merge = merge
        self.skip_channels = skip_channels
        self.lesion_skip = False
        self.up = transposed_conv_layer(spatial_dims)(in_channels, out_channels, kernel_size=2, stride=2)
        block_in = out_channels + skip_channels if merge == "concat" else out_channels
        self.block = ConvBlock(spatial_dims, block_in, out_channels, norm, dropout, residual, act)

    @property
    def has_skip(self) -> bool:
        """True when this level merges an encoder tensor."""
        return self.skip_channels > 0

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        x = self.up(x)
        if self.has_skip:
            if skip is None:
                raise ValueError("this level was built with a long skip; pass the encoder tensor")
            if self.lesion_skip:
                skip = torch.zeros_like(skip)
            x = torch.cat([skip, x], dim=1) if self.merge == "concat" else x + skip
        return self.block(x)
