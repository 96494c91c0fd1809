"""Data: readers (``io``), numpy preprocessing, augmentation and datasets."""
