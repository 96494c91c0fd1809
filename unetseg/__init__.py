"""unetseg: U-Net segmentation of medical images with switchable long skip connections."""

__version__ = "0.1.0"
