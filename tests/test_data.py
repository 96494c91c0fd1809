"""Readers on the real shared files and on tiny synthetic fixtures; splits; preprocessing; augmentation."""

from __future__ import annotations

import gzip
import json

import nibabel as nib
import numpy as np
import pytest
from skimage import io as skio

from unetseg.config import AugmentConfig, apply_overrides, load_config
from unetseg.data import io
from unetseg.data.datasets import (
    DATASETS,
    PatchDataset,
    dataset_info,
    list_cases,
    load_case,
    read_dsb_instances,
    read_dsb_mask,
    split_cases,
    training_samples,
)
from unetseg.data.preprocess import normalize_intensity, pad_to_shape, slices_to_volume, volume_to_slices
from unetseg.data.transforms import augment, build_augmentation, flip_combinations
from unetseg.errors import DataError, UnetsegError

# ---- real data ---------------------------------------------------------------------------


def test_hippocampus_real_case(data_root):
    refs, info = list_cases(dataset_info("hippocampus"), data_root)
    assert len(refs) == 208
    assert info.class_names == ("background", "anterior", "posterior")
    case = load_case(refs[0], info, "percentile")
    assert case.image.ndim == 4 and case.image.shape[0] == 1
    assert case.label.shape == case.image.shape[1:]
    assert set(np.unique(case.label)) == {0, 1, 2}
    assert 0.0 <= case.image.min() and case.image.max() <= 1.0
    raw = nib.load(str(refs[0].image))
    np.testing.assert_allclose(case.meta.affine, raw.affine)
    assert case.meta.spacing == pytest.approx((1.0, 1.0, 1.0))


def test_dsb_real_case_mask_is_union_of_instances(data_root):
    refs, info = list_cases(dataset_info("dsb2018"), data_root)
    assert len(refs) == 600
    ref = refs[0]
    case = load_case(ref, info, "percentile")
    assert case.image.shape[0] == 3 and case.label.shape == case.image.shape[1:]
    instance_files = sorted(ref.label.glob("*.png"))
    union = np.zeros(case.label.shape, bool)
    for f in instance_files:
        union |= skio.imread(str(f)) > 0
    assert (case.label.astype(bool) == union).all()
    assert 0 < case.label.mean() < 1


# ---- synthetic fixtures --------------------------------------------------------------------


def write_msd(root, shapes=((12, 14, 10), (11, 16, 9), (12, 12, 12)), label_values=(0, 1, 2)):
    """A tiny MSD task folder with random images and labels."""
    task = root / "Task04_Hippocampus"
    (task / "imagesTr").mkdir(parents=True)
    (task / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    training = []
    affine = np.diag([1.5, 1.0, 2.0, 1.0])
    for i, shape in enumerate(shapes):
        name = f"hippocampus_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(rng.random(shape).astype(np.float32) * 100, affine), task / "imagesTr" / name)
        nib.save(nib.Nifti1Image(rng.choice(label_values, shape).astype(np.uint8), affine), task / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    (task / "dataset.json").write_text(
        json.dumps({"labels": {"0": "background", "1": "Anterior", "2": "Posterior"}, "training": training, "test": []})
    )
    return task


def test_synthetic_msd_reader_keeps_affine_and_spacing(tmp_path):
    write_msd(tmp_path)
    refs, info = list_cases(dataset_info("hippocampus"), tmp_path)
    assert [r.case_id for r in refs] == ["hippocampus_000", "hippocampus_001", "hippocampus_002"]
    case = load_case(refs[1], info, "zscore")
    assert case.image.shape == (1, 11, 16, 9)
    assert case.meta.spacing == (1.5, 1.0, 2.0)
    assert abs(float(case.image.mean())) < 1e-4 and abs(float(case.image.std()) - 1) < 1e-3


def test_data_set_names_are_one_list():
    from unetseg.data.download import ARCHIVES
    from unetseg.data.names import DATASET_NAMES, PUBLIC_DATASETS

    assert tuple(DATASETS) == DATASET_NAMES and tuple(ARCHIVES) == PUBLIC_DATASETS
    assert all(DATASETS[name].folder for name in PUBLIC_DATASETS)


def test_missing_dataset_json_names_file(tmp_path):
    task = write_msd(tmp_path)
    (task / "dataset.json").unlink()
    with pytest.raises(DataError, match="dataset.json"):
        list_cases(dataset_info("hippocampus"), tmp_path)


def test_missing_data_root_says_how_to_fix(tmp_path):
    with pytest.raises(DataError, match="--data-root"):
        list_cases(dataset_info("hippocampus"), tmp_path / "nowhere")


def test_unknown_label_values_rejected(tmp_path):
    write_msd(tmp_path, label_values=(0, 1, 5))
    refs, info = list_cases(dataset_info("hippocampus"), tmp_path)
    with pytest.raises(DataError, match=r"unknown label values \[5\]"):
        load_case(refs[0], info, "zscore")


def test_shape_mismatch_rejected(tmp_path):
    task = write_msd(tmp_path)
    label_path = task / "labelsTr" / "hippocampus_000.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.uint8), np.eye(4)), label_path)
    refs, info = list_cases(dataset_info("hippocampus"), tmp_path)
    with pytest.raises(DataError, match="does not match image shape"):
        load_case(refs[0], info, "zscore")


def test_truncated_and_empty_nifti_rejected(tmp_path):
    good = tmp_path / "good.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((20, 20, 20), np.float32), np.eye(4)), good)
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(DataError, match="truncated.nii.gz: not a readable NIfTI"):
        io.read_nifti_image(truncated)
    empty = tmp_path / "empty.nii.gz"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        io.read_nifti_image(empty)
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(gzip.compress(b"not a nifti header at all" * 20))
    with pytest.raises(DataError, match="garbage.nii.gz"):
        io.read_nifti_image(garbage)


def test_4d_volume_rejected(tmp_path):
    path = tmp_path / "four.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4, 3), np.float32), np.eye(4)), path)
    with pytest.raises(DataError, match="expected a 3D volume"):
        io.read_nifti_image(path)


def test_2d_readers_channels(tmp_path):
    grey = tmp_path / "grey.png"
    skio.imsave(grey, (np.arange(64, dtype=np.uint8).reshape(8, 8)), check_contrast=False)
    rgba = tmp_path / "rgba.png"
    skio.imsave(rgba, np.full((8, 8, 4), 200, np.uint8), check_contrast=False)
    assert io.read_image_2d(grey)[0].shape == (1, 8, 8)
    assert io.read_image_2d(rgba)[0].shape == (3, 8, 8)
    two = tmp_path / "two.tif"
    skio.imsave(two, np.zeros((8, 8, 2), np.uint8), check_contrast=False)
    with pytest.raises(DataError, match="grey, RGB or RGBA"):
        io.read_image_2d(two)
    broken = tmp_path / "broken.png"
    broken.write_bytes(grey.read_bytes()[:30])
    with pytest.raises(DataError, match="broken.png: not a readable image"):
        io.read_image_2d(broken)


def test_folder_pairs_and_dsb_union(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    img = np.zeros((10, 12, 3), np.uint8)
    img[2:5, 3:7] = 255
    skio.imsave(tmp_path / "images" / "a.png", img, check_contrast=False)
    skio.imsave(tmp_path / "masks" / "a.png", (img[..., 0] > 0).astype(np.uint8) * 255, check_contrast=False)
    refs, info = list_cases(dataset_info("folder"), tmp_path)
    case = load_case(refs[0], info, "percentile")
    assert case.label.sum() == 12 and case.image.shape == (3, 10, 12)

    masks = tmp_path / "dsb" / "masks"
    masks.mkdir(parents=True)
    for k, (r, c) in enumerate([(1, 1), (6, 6)]):
        m = np.zeros((9, 9), np.uint8)
        m[r : r + 2, c : c + 2] = 255
        skio.imsave(masks / f"{k}.png", m, check_contrast=False)
    assert read_dsb_mask(masks).sum() == 8


# ---- preprocessing, splits, samples, augmentation -------------------------------------------


def test_normalisation_methods():
    rng = np.random.default_rng(0)
    image = rng.normal(50, 10, (2, 30, 30)).astype(np.float32)
    image[0, 0, 0] = 1e6  # one outlier
    p = normalize_intensity(image, "percentile")
    assert p.min() == 0.0 and p.max() == 1.0
    assert np.median(p[0]) > 0.3  # the outlier was clipped, not used as the maximum
    z = normalize_intensity(image, "zscore")
    np.testing.assert_allclose(z[1].mean(), 0, atol=1e-5)
    assert (normalize_intensity(np.ones((1, 4, 4)), "zscore") == 0).all()


def test_slices_round_trip_and_padding():
    vol = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    for axis in range(3):
        s = volume_to_slices(vol, axis)
        assert s.shape[0] == vol.shape[axis + 1]
        assert (slices_to_volume(s, axis) == vol).all()
    assert pad_to_shape(np.ones((1, 3, 5)), (4, 8)).shape == (1, 4, 8)
    assert pad_to_shape(np.ones((6, 5)), (4, 8)).shape == (6, 8)


@pytest.mark.parametrize("num_folds", [0, 5])
def test_split_is_case_level_reproducible_and_disjoint(num_folds):
    ids = [f"case_{i:03d}" for i in range(23)]
    a = split_cases(ids, 0.2, seed=3, num_folds=num_folds, fold=1)
    b = split_cases(list(reversed(ids)), 0.2, seed=3, num_folds=num_folds, fold=1)
    assert a == b
    assert not set(a["train"]) & set(a["val"])
    assert sorted(a["train"] + a["val"]) == ids
    assert split_cases(ids, 0.2, seed=4, num_folds=num_folds, fold=1) != a
    if num_folds:
        folds = [set(split_cases(ids, seed=3, num_folds=5, fold=f)["val"]) for f in range(5)]
        assert set().union(*folds) == set(ids) and sum(map(len, folds)) == len(ids)


def blocky_pair(rng, size=(48, 64)):
    mask = np.zeros(size, np.int64)
    mask[10:30, 12:40] = 1
    mask[32:44, 40:60] = 2
    image = (mask.astype(np.float32) / 2)[None] + rng.normal(0, 0.01, (1, *size)).astype(np.float32)
    return np.clip(image, 0, 1), mask


def fired_2d(augmenter, image, mask) -> set[str]:
    """Names of the albumentations transforms that fired on one call."""
    augmenter.pipeline.save_applied_params = True
    out = augmenter.pipeline(image=np.moveaxis(image, 0, -1), mask=mask.astype(np.uint8))
    return {name for name, _ in out["applied_transforms"]}


def test_2d_transforms_fire_at_their_own_rates_independently():
    """Flips, affine and brightness/contrast each fire at p = 0.5 and every pair fires together a quarter of
    the time (albumentations' per-transform seeding used to make them all fire together)."""
    rng = np.random.default_rng(0)
    image, mask = blocky_pair(rng)
    augmenter = build_augmentation(AugmentConfig(intensity=True), "zscore", spatial_dims=2, seed=3)
    names = ["VerticalFlip", "HorizontalFlip", "Affine", "RandomBrightnessContrast"]
    n = 800
    draws = np.array([[name in fired for name in names] for fired in (fired_2d(augmenter, image, mask) for _ in range(n))])
    sd = 0.5 / np.sqrt(n)  # binomial standard deviation of a rate of 0.5
    np.testing.assert_allclose(draws.mean(axis=0), 0.5, atol=4 * sd)
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            assert abs((draws[:, i] & draws[:, j]).mean() - 0.25) < 4 * np.sqrt(0.25 * 0.75 / n), (names[i], names[j])


def test_colour_and_inversion_fire_at_their_rates_and_keep_intensities_in_range():
    rng = np.random.default_rng(1)
    image = rng.random((3, 64, 64)).astype(np.float32)
    mask = (image[0] > 0.5).astype(np.int64)
    cfg = AugmentConfig(flip=False, affine=False, intensity=False, color=True, invert=True)
    augmenter = build_augmentation(cfg, "percentile", spatial_dims=2, seed=0)
    names = ["HueSaturationValue", "ChannelShuffle", "ToGray", "InvertImg"]
    assert augmenter.names == names
    n = 600
    draws = np.array([[name in fired for name in names] for fired in (fired_2d(augmenter, image, mask) for _ in range(n))])
    for rate, expected in zip(draws.mean(axis=0), (0.5, 0.2, 0.2, 0.25)):
        assert abs(rate - expected) < 4 * np.sqrt(expected * (1 - expected) / n), (names, draws.mean(axis=0))
    inverted = build_augmentation(AugmentConfig(flip=False, affine=False, intensity=False, invert=True, strength=4.0),
                                  "percentile", spatial_dims=2, seed=0)
    out, out_mask = inverted(image, mask)  # strength 4: p = 1
    np.testing.assert_allclose(out, 1 - image, atol=1e-6)
    np.testing.assert_array_equal(out_mask, mask)  # intensity only: the mask is untouched
    for _ in range(20):
        out, _ = augmenter(image, mask)
        assert out.shape == image.shape and out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("zoom", [0.6, 1.6])
def test_augment_scale_zooms_a_2d_image_by_the_range_given(zoom):
    """``augment.scale`` = [z, z]: a centred disk grows by z along both axes, whatever the rotation."""
    grid = np.indices((64, 64)) - 31.5
    mask = ((grid ** 2).sum(0) <= 7.5 ** 2).astype(np.int64)
    cfg = AugmentConfig(flip=False, intensity=False, scale=[zoom, zoom], strength=2.0)  # strength 2: the affine always fires
    augmenter = build_augmentation(cfg, "zscore", spatial_dims=2, seed=0)
    for _ in range(5):
        _, out = augmenter(mask[None].astype(np.float32), mask)
        assert abs(out.sum() / mask.sum() - zoom ** 2) < 0.15 * zoom ** 2


def test_augment_scale_draws_one_zoom_for_both_axes():
    """Over a wide range the disk changes size from draw to draw but stays round (x and y zoomed alike)."""
    grid = np.indices((96, 96)) - 47.5
    mask = ((grid ** 2).sum(0) <= 7.5 ** 2).astype(np.int64)
    cfg = AugmentConfig(flip=False, intensity=False, scale=[0.5, 2.0], strength=2.0)
    augmenter = build_augmentation(cfg, "zscore", spatial_dims=2, seed=1)
    areas = []
    for _ in range(12):
        _, out = augmenter(mask[None].astype(np.float32), mask)
        extents = [np.ptp(np.nonzero(out)[axis]) + 1 for axis in range(2)]
        assert abs(extents[0] - extents[1]) <= 3, extents
        areas.append(out.sum())
    assert max(areas) > 2 * min(areas)  # the range was used


def test_augment_scale_is_refused_unless_an_increasing_positive_range_on_a_2d_affine():
    for bad in ("[1.5,0.7]", "[0,1.2]", "[0.8]"):
        with pytest.raises(UnetsegError, match="augment.scale must be"):
            apply_overrides(load_config("dsb2018_2d"), [f"augment.scale={bad}"])
    assert apply_overrides(load_config("dsb2018_2d"), ["augment.scale=[7e-1,1.5e0]"]).augment.scale == [0.7, 1.5]
    with pytest.raises(UnetsegError, match="augment.scale is a 2D setting"):
        apply_overrides(load_config("hippocampus_3d"), ["augment.scale=[0.8,1.2]"])
    with pytest.raises(UnetsegError, match="needs augment.affine=true"):
        apply_overrides(load_config("dsb2018_2d"), ["augment.scale=[0.8,1.2]", "augment.affine=false"])


def test_colour_and_inversion_are_refused_where_they_cannot_apply():
    with pytest.raises(UnetsegError, match="augment.color varies the colour of RGB images"):
        apply_overrides(load_config("hippocampus_2d"), ["augment.color=true"])
    with pytest.raises(UnetsegError, match="2D augmentations"):
        apply_overrides(load_config("hippocampus_3d"), ["augment.invert=true"])
    assert apply_overrides(load_config("dsb2018_2d"), ["augment.color=true", "augment.invert=true"]).augment.color


def test_2d_flips_come_in_all_four_combinations():
    """Seen from the output: unflipped, each single mirror and both, each about a quarter of the draws."""
    image = np.arange(48 * 64, dtype=np.float32).reshape(1, 48, 64)
    mask = np.zeros((48, 64), np.int64)
    augmenter = build_augmentation(AugmentConfig(affine=False, intensity=False), "zscore", spatial_dims=2, seed=0)
    counts = dict.fromkeys(flip_combinations([0, 1]), 0)
    for _ in range(400):
        out, _ = augmenter(image, mask)
        match = [f for f in counts if np.array_equal(out[0], np.flip(image[0], f) if f else image[0])]
        assert len(match) == 1
        counts[match[0]] += 1
    assert all(60 <= c <= 140 for c in counts.values()), counts


def test_3d_augmentation_flips_only_the_configured_axes_and_moves_mask_with_image():
    mask = np.zeros((40, 48, 32), np.int64)
    mask[6:24, 8:36, 4:18] = 1
    mask[24:36, 12:40, 16:28] = 2
    image = (mask / 2.0).astype(np.float32)[None]
    flips_only = build_augmentation(AugmentConfig(flip_axes=[0], affine=False, intensity=False), "percentile", 3, seed=1)
    seen = set()
    for _ in range(40):
        out_image, out_mask = flips_only(image, mask)
        flipped = np.array_equal(out_mask, mask[::-1])
        assert flipped or np.array_equal(out_mask, mask)  # never along axis 1 or 2
        np.testing.assert_array_equal(out_image[0], mask[::-1] / 2.0 if flipped else mask / 2.0)
        seen.add(flipped)
    assert seen == {True, False}
    full = build_augmentation(AugmentConfig(intensity=False), "percentile", 3, seed=2)
    moved = 0
    for _ in range(20):
        out_image, out_mask = full(image, mask)
        assert out_image.shape == image.shape and out_mask.shape == mask.shape and out_mask.dtype == np.int64
        assert (np.rint(out_image[0] * 2).astype(int) == out_mask).mean() > 0.97
        moved += int(not any(np.array_equal(out_mask, np.flip(mask, f) if f else mask) for f in flip_combinations([0, 1, 2])))
    assert 4 <= moved <= 16  # the affine fires about half the time


def test_flip_axes_outside_the_network_are_refused():
    with pytest.raises(ValueError, match="flip_axes"):
        build_augmentation(AugmentConfig(flip_axes=[2]), "percentile", spatial_dims=2)
    assert flip_combinations([1, 0]) == [(), (0,), (1,), (0, 1)]


def test_augmentation_keeps_image_and_mask_aligned():
    rng = np.random.default_rng(0)
    transform = build_augmentation(AugmentConfig(strength=1.0, elastic=True, intensity=False), "percentile", seed=1)
    moved = 0
    for _ in range(20):
        image, mask = blocky_pair(rng)
        aug_image, aug_mask = augment(transform, image, mask)
        assert aug_image.shape == image.shape and aug_mask.shape == mask.shape
        recovered = np.rint(aug_image[0] * 2).astype(int)  # class encoded in intensity
        assert (recovered == aug_mask).mean() > 0.97
        moved += int((aug_mask != mask).any())
    assert moved >= 10  # the transforms really did move things


def test_augmentation_off_and_intensity_only():
    assert build_augmentation(AugmentConfig(strength=0), "percentile") is None
    t = build_augmentation(AugmentConfig(flip=False, affine=False, intensity=True, strength=2.0), "zscore", seed=0)
    assert t.names == ["RandomBrightnessContrast"]  # no gamma on z-scored data
    assert build_augmentation(AugmentConfig(flip=False, affine=False, intensity=False), "zscore") is None


def test_patch_dataset_pads_crops_and_is_reproducible():
    rng = np.random.default_rng(0)
    images = [rng.random((1, 40, 70)).astype(np.float32), rng.random((1, 20, 30)).astype(np.float32)]
    labels = [np.ones((40, 70), np.int64), np.ones((20, 30), np.int64)]
    ds = PatchDataset(images, labels, (32, 64), transform=None, seed=5)
    x, y = ds[1]
    assert x.shape == (1, 32, 64) and y.shape == (32, 64)
    assert y[:20, :30].all() and not y[20:].any()  # padded with background
    ds.set_epoch(3)
    first = ds[0][0]
    ds.set_epoch(3)
    assert (ds[0][0] == first).all()


def test_training_samples_slices_volumes(tmp_path):
    write_msd(tmp_path)
    refs, info = list_cases(dataset_info("hippocampus"), tmp_path)
    cases = [load_case(r, info, "zscore") for r in refs]
    images, labels = training_samples(cases, spatial_dims=2, slice_axis=2)
    assert len(images) == 10 + 9 + 12
    assert images[0].shape == (1, 12, 14) and labels[0].shape == (12, 14)
    images3d, _ = training_samples(cases, spatial_dims=3, slice_axis=2)
    assert len(images3d) == 3 and images3d[0].ndim == 4


def test_dsb_masks_are_decoded_once_then_read_from_the_cache_until_a_mask_changes(data_root, tmp_path, monkeypatch):
    import shutil

    from unetseg.data import cache

    case = next(p for p in sorted((data_root / "dsb2018_stage1_train").iterdir()) if p.is_dir())
    masks = shutil.copytree(case / "masks", tmp_path / "case" / "masks")
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    decoded = []
    real_read = io.read_mask_2d
    monkeypatch.setattr(io, "read_mask_2d", lambda path: decoded.append(path) or real_read(path))

    first = read_dsb_instances(masks)
    assert len(decoded) == len(list(masks.glob("*.png"))) > 1 and first.dtype == np.int32 and first.max() == len(decoded)
    entries = list((tmp_path / "cache" / "dsb_instances").glob("*.npz"))
    assert len(entries) == 1
    decoded.clear()
    assert np.array_equal(read_dsb_instances(masks), first) and decoded == []  # from the cache: no PNG read

    entries[0].write_bytes(b"damaged")  # an unreadable entry is decoded again and rewritten
    assert np.array_equal(read_dsb_instances(masks), first) and decoded
    decoded.clear()
    assert np.array_equal(read_dsb_instances(masks), first) and decoded == []

    extra = np.zeros_like(first, dtype=np.uint8)
    extra[:3, :3] = 255
    skio.imsave(masks / "zzz_new.png", extra, check_contrast=False)  # a new nucleus: a new key, decoded again
    changed = read_dsb_instances(masks)
    assert decoded and changed.max() == first.max() + 1 and (changed[:3, :3] == changed.max()).all()

    monkeypatch.setenv(cache.CACHE_ENV, "off")
    shutil.rmtree(tmp_path / "cache")
    assert np.array_equal(read_dsb_instances(masks), changed) and not (tmp_path / "cache").exists()
