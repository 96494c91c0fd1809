"""Kinds of microscopy image (fluorescence, histology, brightfield) and the sampling weights built on them."""

from __future__ import annotations

import numpy as np
import pytest

from unetseg.data import io
from unetseg.data.datasets import dataset_info, list_cases, load_case
from unetseg.data.kinds import BRIGHTFIELD, FLUORESCENCE, HISTOLOGY, image_kind, kind_balanced_weights

# One DSB2018 stage-1 image of each kind, and its kind as docs/dsb_worst.md reads it from the pictures.
KNOWN = {
    "00071198d059ba7f5914a526d124d28e6d010c92466da21d4a04cd5413362552": FLUORESCENCE,
    "00ae65c1c6631ae6f2be1a449902976e6eb8483bf6b0740d00530220832c6d3e": HISTOLOGY,
    "1a11552569160f0b1ea10bedbd628ce6c14f29edec5092034c2309c556df833e": BRIGHTFIELD,
    "08275a5b1c2dfcd739e8c4888a5ee2d29f83eccfa75185404ced1dc0866ea992": BRIGHTFIELD,
}


def test_synthetic_images_of_each_kind():
    rng = np.random.default_rng(0)
    dark = np.zeros((3, 64, 64)) + rng.random((1, 64, 64)) * 20
    dark[:, 20:30, 20:30] = 200  # a bright nucleus on a dark background, the same in every channel
    bright = 255 - dark
    colour = np.stack([rng.random((64, 64)) * 255, rng.random((64, 64)) * 128, rng.random((64, 64)) * 64])
    assert image_kind(dark) == FLUORESCENCE
    assert image_kind(bright) == BRIGHTFIELD
    assert image_kind(colour) == HISTOLOGY
    assert image_kind(dark[:1]) == FLUORESCENCE  # one channel
    assert image_kind(np.stack([bright[0]] * 4)[:, None]) == BRIGHTFIELD  # 3D: (C, D, H, W)
    assert image_kind(np.stack([dark[0], dark[0] * 0.5])) == FLUORESCENCE  # two channels are not colour
    with pytest.raises(ValueError, match="channel axis"):
        image_kind(dark[0])


def test_real_images_raw_and_normalised_give_the_same_kind(data_root):
    refs, info = list_cases(dataset_info("dsb2018"), data_root)
    by_id = {r.case_id: r for r in refs}
    for case_id, kind in KNOWN.items():
        raw, _ = io.read_image(by_id[case_id].image)
        assert image_kind(raw) == kind, case_id
        assert image_kind(load_case(by_id[case_id], info, "percentile").image) == kind, case_id


def test_kind_balanced_weights():
    kinds = ["a"] * 8 + ["b"] * 2
    np.testing.assert_allclose(kind_balanced_weights(kinds, 0.0), np.full(10, 0.1))
    even = kind_balanced_weights(kinds, 1.0)
    assert even[:8].sum() == pytest.approx(0.5) and even[8:].sum() == pytest.approx(0.5)
    half = kind_balanced_weights(kinds, 0.5)  # kinds drawn in proportion to the square roots of their counts
    assert half[8:].sum() / half[:8].sum() == pytest.approx(np.sqrt(2) / np.sqrt(8))
    with pytest.raises(ValueError):
        kind_balanced_weights([], 1.0)
