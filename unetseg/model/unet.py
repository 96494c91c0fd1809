"""U-Net with switchable long skip connections, 2D or 3D."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from unetseg.model.blocks import ActName, ConvBlock, NormName, UpBlock, conv_layer, max_pool_layer


def resolve_skips(skips: bool | Sequence[bool], num_levels: int) -> tuple[bool, ...]:
    """Expand ``skips`` into one flag per decoder level (index 0 = finest level).

    Raises:
        ValueError: a sequence whose length is not ``num_levels``.
    """
    if isinstance(skips, bool):
        return (skips,) * num_levels
    flags = tuple(bool(s) for s in skips)
    if len(flags) != num_levels:
        raise ValueError(
            f"skips needs one flag per decoder level ({num_levels}, finest first), got {len(flags)}: {list(skips)}"
        )
    return flags


def pad_high_end(x: torch.Tensor, pad: Sequence[int]) -> torch.Tensor:
    """``x`` ``(B, C, *S)`` with ``pad[i]`` zeros added at the high end of spatial axis ``i`` (itself if none)."""
    if not any(pad):
        return x
    return F.pad(x, [v for p in reversed(pad) for v in (0, p)])  # F.pad: (last_lo, last_hi, ..., first_lo, ...)


def crop_to(x: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
    """``x`` ``(B, C, *S')`` cut back to its first ``spatial`` voxels along each spatial axis (``S' >= S``)."""
    return x if tuple(x.shape[2:]) == tuple(spatial) else x[(..., *(slice(0, s) for s in spatial))]


class UNet(nn.Module):
    """Encoder-decoder segmentation network with symmetrical long skips.

    Encoder level ``i`` is a :class:`ConvBlock` with ``channels[i]`` feature maps,
    followed by 2x max pooling (all but the last, the bottleneck). Decoder level
    ``i`` (for ``i < len(channels) - 1``) upsamples with a kernel-2, stride-2
    transposed convolution to ``channels[i]`` maps, merges encoder level ``i``
    when its long skip is on, and applies a :class:`ConvBlock`. A 1x1
    convolution maps to ``out_channels`` logits.

    Parameter counts (2D, ``in_channels=1``, ``out_channels=3``, the default
    ``channels=(16, 32, 64, 128)``, batch norm, ``merge="concat"``):
    with all skips 482,483; with none 434,099 (each decoder level's first
    convolution loses ``channels[i]`` input maps: 9 * (16^2 + 32^2 + 64^2) =
    48,384 weights). The 3D network with the same arguments has 1,401,299 /
    1,256,147. ``tests/test_model.py`` checks these figures.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        out_channels: classes, background included (logits, no softmax).
        channels: feature maps per level, finest first; ``len(channels)`` is the
            depth (levels including the bottleneck), at least 2.
        skips: long skips on (``True``), off (``False``), or one flag per decoder
            level, finest first (``len(channels) - 1`` flags).
        merge: ``"concat"`` (U-Net) or ``"add"`` (ResNet-style) long-skip merge.
        residual: short residual skips inside every :class:`ConvBlock`.
        norm: ``"batch"``, ``"instance"`` or ``"group"``.
        dropout: dropout probability between the two convolutions of each block.
        pad_to_multiple: pad inputs whose size is not a multiple of
            ``2 ** (len(channels) - 1)`` and crop the output back; with ``False``
            such inputs raise ``ValueError`` naming the required multiple.
        act: ``"relu"`` (the default, and what checkpoints without ``act`` used)
            or ``"leaky_relu"`` (slope 0.01, nnU-Net's choice).
        stage_blocks: conv blocks per encoder level (at least 1). The first changes
            the width as above; the ``stage_blocks - 1`` others keep it
            (``stages[i]``), so with ``residual`` each level is a same-width
            residual stage with identity shortcuts, whose blocks can be deleted
            at test time as in Veit et al. (2016); without normalisation and
            residual it is a plain deep encoder. 1 builds exactly the network of
            checkpoints that predate the argument.

    Shapes: ``forward(x)``: ``(B, in_channels, *S) -> (B, out_channels, *S)``.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 3,
        channels: Sequence[int] = (16, 32, 64, 128),
        skips: bool | Sequence[bool] = True,
        merge: Literal["concat", "add"] = "concat",
        residual: bool = False,
        norm: NormName = "batch",
        dropout: float = 0.0,
        pad_to_multiple: bool = True,
        act: ActName = "relu",
        stage_blocks: int = 1,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if len(channels) < 2:
            raise ValueError(f"channels needs at least 2 levels, got {list(channels)}")
        if stage_blocks < 1:
            raise ValueError(f"stage_blocks must be at least 1, got {stage_blocks}")
        self.spatial_dims = spatial_dims
        self.channels = tuple(int(c) for c in channels)
        self.skips = resolve_skips(skips, len(self.channels) - 1)
        self.pad_to_multiple = pad_to_multiple

        widths = (in_channels, *self.channels)
        self.encoder = nn.ModuleList(
            ConvBlock(spatial_dims, widths[i], widths[i + 1], norm, dropout, residual, act)
            for i in range(len(self.channels))
        )
        if stage_blocks > 1:  # absent at 1: the state dict of older checkpoints
            self.stages = nn.ModuleList(
                nn.Sequential(*(ConvBlock(spatial_dims, c, c, norm, dropout, residual, act) for _ in range(stage_blocks - 1)))
                for c in self.channels
            )
        self.pool = max_pool_layer(spatial_dims)(kernel_size=2, stride=2)
        # decoder[i] produces level i; applied from the coarsest (last) to the finest (0).
        self.decoder = nn.ModuleList(
            UpBlock(
                spatial_dims,
                in_channels=self.channels[i + 1],
                skip_channels=self.channels[i] if self.skips[i] else 0,
                out_channels=self.channels[i],
                merge=merge,
                norm=norm,
                dropout=dropout,
                residual=residual,
                act=act,
            )
            for i in range(len(self.channels) - 1)
        )
        self.head = conv_layer(spatial_dims)(self.channels[0], out_channels, kernel_size=1)

    @property
    def size_multiple(self) -> int:
        """Spatial sizes the network takes without padding are multiples of this."""
        return 2 ** (len(self.channels) - 1)

    def input_padding(self, spatial: Sequence[int]) -> list[int]:
        """Voxels to add at the high end of each spatial axis of an input of size ``spatial`` (the forward pass
        pads with zeros and crops the output back): up to the next multiple of :attr:`size_multiple`, and one
        multiple more along the first axis when the coarsest level would hold a single voxel (instance and group
        norm need more than one value).

        Raises:
            ValueError: padding needed by a network built with ``pad_to_multiple=False``.
        """
        m = self.size_multiple
        pad = [(-s) % m for s in spatial]
        if all((s + p) // m == 1 for s, p in zip(spatial, pad)):
            pad[0] += m
        if any(pad) and not self.pad_to_multiple:
            raise ValueError(
                f"spatial size {tuple(spatial)} is not a multiple of {m}; pad the input "
                f"or build the UNet with pad_to_multiple=True"
            )
        return pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"expected a {self.spatial_dims + 2}D tensor (B, C, *spatial), got shape {tuple(x.shape)}"
            )
        spatial = x.shape[2:]
        pad = self.input_padding(spatial)
        x = pad_high_end(x, pad)

        encoded: list[torch.Tensor] = []
        stages = getattr(self, "stages", None)
        for level, block in enumerate(self.encoder):
            x = block(x if level == 0 else self.pool(x))
            if stages is not None:
                x = stages[level](x)
            encoded.append(x)
        x = encoded[-1]
        for level in reversed(range(len(self.decoder))):
            up = self.decoder[level]
            x = up(x, encoded[level] if up.has_skip else None)
        return crop_to(self.head(x), spatial)

    # ---- test-time lesions (Veit et al. 2016 style ablations) -------------------------

    def lesion_skips(self, levels: Collection[int]) -> None:
        """Zero the long-skip tensor at ``levels`` (finest = 0); ``()`` restores all.

        The trained weights are untouched; a level built without a skip raises.
        """
        for level in levels:
            if not 0 <= level < len(self.decoder) or not self.decoder[level].has_skip:
                raise ValueError(f"level {level} has no long skip; levels with skips: {self.skip_levels()}")
        for level, up in enumerate(self.decoder):
            up.lesion_skip = level in levels

    def skip_levels(self) -> list[int]:
        """Decoder levels that merge a long skip, finest first."""
        return [level for level, up in enumerate(self.decoder) if up.has_skip]

    def residual_blocks(self) -> dict[str, ConvBlock]:
        """Blocks with a short residual skip, by name (``encoder.0``, ``stages.0.1``, ``decoder.2``...)."""
        blocks = {f"encoder.{i}": b for i, b in enumerate(self.encoder)}
        for i, stage in enumerate(getattr(self, "stages", ())):
            blocks.update({f"stages.{i}.{j}": b for j, b in enumerate(stage)})
        blocks.update({f"decoder.{i}": up.block for i, up in enumerate(self.decoder)})
        return {name: b for name, b in blocks.items() if b.residual}

    def lesion_residuals(self, names: Collection[str]) -> None:
        """Drop the residual branch of the named blocks (see :meth:`residual_blocks`)."""
        blocks = self.residual_blocks()
        unknown = set(names) - set(blocks)
        if unknown:
            raise ValueError(f"no residual block named {sorted(unknown)}; have {sorted(blocks)}")
        for name, block in blocks.items():
            block.lesion_residual = name in names
