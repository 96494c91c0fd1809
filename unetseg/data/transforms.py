"""Training augmentation, applied identically to image and mask: albumentations for 2D, MONAI for 3D.

Every random transform of an :class:`Augmenter` draws from one shared random
stream, so each fires at its own configured rate, independently of the others.
(albumentations' ``Compose(seed=...)`` / ``set_random_seed`` instead gives every
transform its own generator started from the same seed: two transforms with
the same probability then fire together, and horizontal and vertical flips
only ever come as a 180-degree rotation.)
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence

import albumentations as A
import cv2
import numpy as np

from unetseg.config import AugmentConfig


def resolve_flip_axes(cfg: AugmentConfig, spatial_dims: int) -> tuple[int, ...]:
    """Spatial axes the augmentation mirrors: ``cfg.flip_axes`` (every axis when None), none when flips are off."""
    if not cfg.flip or cfg.strength <= 0:
        return ()
    axes = range(spatial_dims) if cfg.flip_axes is None else cfg.flip_axes
    bad = [a for a in axes if not 0 <= a < spatial_dims]
    if bad:
        raise ValueError(f"augment.flip_axes {list(axes)}: a {spatial_dims}D network has spatial axes 0..{spatial_dims - 1}")
    return tuple(sorted(set(axes)))


def check_augmentation(cfg: AugmentConfig, spatial_dims: int) -> None:
    """Raise ``ValueError`` for augmentation a ``spatial_dims``-D network cannot take: flip axes it lacks, the
    2D-only colour, inversion and zoom-range settings on a 3D network, or a zoom range without the affine."""
    resolve_flip_axes(cfg, spatial_dims)
    affine_scale(cfg)
    if spatial_dims == 3 and (cfg.color or cfg.invert):
        raise ValueError("augment.color and augment.invert are 2D augmentations; set them false for a 3D network")
    if cfg.scale is not None and spatial_dims == 3:  # MONAI's RandAffine draws each axis's factor on its own
        raise ValueError("augment.scale is a 2D setting (an isotropic zoom); leave it null for a 3D network")
    if cfg.scale is not None and not cfg.affine:
        raise ValueError("augment.scale sets the affine augmentation's zoom; it needs augment.affine=true")


def affine_scale(cfg: AugmentConfig) -> tuple[float, float]:
    """The ``(min, max)`` zoom factor the affine transform draws from: ``cfg.scale`` as given (a zoom range does
    not scale with strength), else ``1 -+ 0.15 * strength``. Raises ``ValueError`` for a range that is not
    ``0 < min <= max``."""
    if cfg.scale is None:
        return 1 - 0.15 * float(cfg.strength), 1 + 0.15 * float(cfg.strength)
    if len(cfg.scale) != 2 or not 0 < float(cfg.scale[0]) <= float(cfg.scale[1]):
        raise ValueError(f"augment.scale must be [min, max] zoom factors with 0 < min <= max, got {cfg.scale}")
    return float(cfg.scale[0]), float(cfg.scale[1])


def flip_combinations(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of ``axes``, the empty one (no flip) first: the mirrorings a model trained with
    independent flips along ``axes`` has seen, and so the members of its flip test-time augmentation."""
    axes = sorted(set(int(a) for a in axes))
    return [c for n in range(len(axes) + 1) for c in itertools.combinations(axes, n)]


class Augmenter:
    """Random augmentation of one training sample.

    Args:
        cfg: what to apply and how strongly.
        normalization: gamma is used only with ``"percentile"`` (intensities in
            ``[0, 1]``); z-scored data has negative values.
        spatial_dims: 2 (albumentations) or 3 (MONAI).
        seed: start of the shared random stream; :meth:`reseed` restarts it.

    Call with ``image (C, *S)`` float32 and ``mask (*S)`` integer labels;
    returns ``(C, *S)`` float32 and ``(*S)`` int64. Geometric transforms move
    both (nearest-neighbour for the mask).
    """

    def __init__(self, cfg: AugmentConfig, normalization: str, spatial_dims: int = 2, seed: int = 0) -> None:
        check_augmentation(cfg, spatial_dims)
        self.spatial_dims = spatial_dims
        self.flip_axes = resolve_flip_axes(cfg, spatial_dims)
        builder = _albumentations_2d if spatial_dims == 2 else _monai_3d
        self.pipeline, self.names = builder(cfg, normalization, self.flip_axes)
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        """Restart the shared random stream at ``seed`` (for reproducible epochs)."""
        if self.spatial_dims == 2:
            self.pipeline.set_random_state(np.random.default_rng(seed), random.Random(seed))
        else:
            self.pipeline.set_random_state(seed=int(seed) % 2**32)

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.spatial_dims == 2:
            out = self.pipeline(image=np.ascontiguousarray(np.moveaxis(image, 0, -1)), mask=mask.astype(np.uint8))
            aug_image = out["image"][..., None] if out["image"].ndim == 2 else out["image"]
            aug_image, aug_mask = np.moveaxis(aug_image, -1, 0), out["mask"]
        else:
            out = self.pipeline({"image": image, "label": mask[None].astype(np.float32)})
            aug_image, aug_mask = np.asarray(out["image"]), np.rint(np.asarray(out["label"])[0])
        return np.ascontiguousarray(aug_image, dtype=np.float32), np.ascontiguousarray(aug_mask, dtype=np.int64)


def _albumentations_2d(cfg: AugmentConfig, normalization: str, flip_axes: tuple[int, ...]) -> tuple[A.Compose, list[str]]:
    s = float(cfg.strength)
    flips = {0: A.VerticalFlip(p=0.5), 1: A.HorizontalFlip(p=0.5)}  # axis 0 = rows (H), axis 1 = columns (W)
    transforms: list[A.BasicTransform] = [flips[a] for a in flip_axes]
    if cfg.affine:
        transforms.append(
            A.Affine(
                rotate=(-15 * s, 15 * s),
                scale=affine_scale(cfg),
                keep_ratio=cfg.scale is not None,  # a zoom range given is isotropic; the default draws x and y apart
                translate_percent=(-0.05 * s, 0.05 * s),
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
                border_mode=cv2.BORDER_CONSTANT,
                p=min(1.0, 0.5 * s),
            )
        )
    if cfg.elastic:
        transforms.append(A.ElasticTransform(alpha=20 * s, sigma=5, p=min(1.0, 0.2 * s)))
    if cfg.intensity:
        transforms.append(
            A.RandomBrightnessContrast(brightness_limit=0.1 * s, contrast_limit=0.2 * s, p=min(1.0, 0.5 * s))
        )
        if normalization == "percentile":
            transforms.append(A.RandomGamma(gamma_limit=(100 - 30 * s, 100 + 30 * s), p=min(1.0, 0.3 * s)))
    if cfg.color:  # stain and colour variation of RGB microscopy; intensities stay in [0, 1]
        transforms += [
            A.HueSaturationValue(hue_shift_limit=20 * s, sat_shift_limit=30 * s, val_shift_limit=0, p=min(1.0, 0.5 * s)),
            A.ChannelShuffle(p=min(1.0, 0.2 * s)),
            A.ToGray(num_output_channels=3, p=min(1.0, 0.2 * s)),
        ]
    if cfg.invert:  # dark objects on a bright background (brightfield) from bright ones on a dark one
        transforms.append(A.InvertImg(p=min(1.0, 0.25 * s)))
    return A.Compose(transforms), [type(t).__name__ for t in transforms]


def _monai_3d(cfg: AugmentConfig, normalization: str, flip_axes: tuple[int, ...]):
    from monai.transforms import (
        Compose,
        Rand3DElasticd,
        RandAdjustContrastd,
        RandAffined,
        RandFlipd,
        RandScaleIntensityd,
        RandShiftIntensityd,
    )

    s = float(cfg.strength)
    both = ("image", "label")
    transforms: list = [RandFlipd(both, prob=0.5, spatial_axis=a) for a in flip_axes]
    if cfg.affine:
        angle = math.radians(15 * s)
        transforms.append(  # MONAI's scale_range: a grid factor 1 + U(-r, r) per axis (zooms by its inverse)
            RandAffined(both, prob=min(1.0, 0.5 * s), rotate_range=(angle,) * 3, scale_range=(0.15 * s,) * 3,
                        mode=("bilinear", "nearest"), padding_mode="zeros")
        )
    if cfg.elastic:
        transforms.append(
            Rand3DElasticd(both, sigma_range=(5, 7), magnitude_range=(50 * s, 150 * s), prob=min(1.0, 0.2 * s),
                           mode=("bilinear", "nearest"), padding_mode="zeros")
        )
    if cfg.intensity:
        transforms += [
            RandScaleIntensityd("image", factors=0.2 * s, prob=min(1.0, 0.5 * s)),
            RandShiftIntensityd("image", offsets=0.1 * s, prob=min(1.0, 0.5 * s)),
        ]
        if normalization == "percentile":
            transforms.append(RandAdjustContrastd("image", gamma=(1 - 0.3 * s, 1 + 0.3 * s), prob=min(1.0, 0.3 * s)))
    return Compose(transforms), [type(t).__name__ for t in transforms]


def build_augmentation(cfg: AugmentConfig, normalization: str, spatial_dims: int = 2, seed: int = 0) -> Augmenter | None:
    """The training augmentation described by ``cfg``, or ``None`` when it is off (strength 0 or nothing chosen)."""
    if cfg.strength <= 0:
        return None
    augmenter = Augmenter(cfg, normalization, spatial_dims, seed)
    return augmenter if augmenter.names else None


def augment(augmenter: Augmenter | None, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``augmenter(image, mask)``, or the pair unchanged (mask as int64) when there is no augmentation."""
    if augmenter is None:
        return image, mask.astype(np.int64)
    return augmenter(image, mask)
