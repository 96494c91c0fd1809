"""albumentations augmentation for 2D training, applied identically to image and mask."""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np

from unetseg.config import AugmentConfig


def build_augmentation(cfg: AugmentConfig, normalization: str, seed: int = 0) -> A.Compose | None:
    """The training augmentation described by ``cfg``, or ``None`` when it is off.

    Geometric transforms move image and mask together (nearest-neighbour for
    the mask). Gamma is only used with ``"percentile"`` normalisation, whose
    intensities lie in ``[0, 1]``; z-scored data has negative values.

    Call :func:`augment` with ``(H, W, C)`` float32 images and ``(H, W)`` uint8 masks.
    """
    s = float(cfg.strength)
    if s <= 0:
        return None
    transforms: list[A.BasicTransform] = []
    if cfg.flip:
        transforms += [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]
    if cfg.affine:
        transforms.append(
            A.Affine(
                rotate=(-15 * s, 15 * s),
                scale=(1 - 0.15 * s, 1 + 0.15 * s),
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
            A.RandomBrightnessContrast(
                brightness_limit=0.1 * s, contrast_limit=0.2 * s, p=min(1.0, 0.5 * s)
            )
        )
        if normalization == "percentile":
            transforms.append(A.RandomGamma(gamma_limit=(100 - 30 * s, 100 + 30 * s), p=min(1.0, 0.3 * s)))
    if not transforms:
        return None
    return A.Compose(transforms, seed=seed)


def augment(transform: A.Compose | None, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Apply ``transform`` to a channel-first pair.

    Args:
        image: ``(C, H, W)`` float32.
        mask: ``(H, W)`` integer labels.

    Returns:
        ``(C, H, W)`` float32 image and ``(H, W)`` int64 mask.
    """
    if transform is None:
        return image, mask.astype(np.int64)
    out = transform(image=np.ascontiguousarray(np.moveaxis(image, 0, -1)), mask=mask.astype(np.uint8))
    aug_image = out["image"]
    if aug_image.ndim == 2:
        aug_image = aug_image[..., None]
    return np.ascontiguousarray(np.moveaxis(aug_image, -1, 0), dtype=np.float32), out["mask"].astype(np.int64)
