"""Networks: :class:`UNet` and its building blocks. Depends on torch only."""

from unetseg.model.unet import UNet, resolve_skips

__all__ = ["UNet", "resolve_skips"]
