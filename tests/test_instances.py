"""Nuclei as objects: splitting a mask, the DSB2018 score, and evaluate's instance columns on real DSB cases."""

from __future__ import annotations

import numpy as np
import pytest

from unetseg.instances import average_precision, instance_table, iou_matrix, split_instances


def disc(shape, center, radius):
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    return (rows - center[0]) ** 2 + (cols - center[1]) ** 2 <= radius**2


def test_touching_discs_become_two_objects_and_a_lone_disc_one():
    pair = disc((64, 96), (32, 30), 14) | disc((64, 96), (32, 55), 14)  # overlapping by 3 px: one connected blob
    objects = split_instances(pair)
    assert len(np.unique(objects)) - 1 == 2
    left, right = objects[32, 20], objects[32, 65]
    assert left != right and left > 0 and right > 0
    assert len(np.unique(split_instances(disc((64, 64), (32, 32), 15)))) - 1 == 1
    assert not split_instances(np.zeros((16, 16), bool)).any()
    speck = np.zeros((32, 32), bool)
    speck[3:5, 3:5] = True  # 4 px: below min_size
    assert not split_instances(speck).any()


def test_average_precision_follows_the_challenge_definition():
    truth = np.zeros((40, 80), np.int32)
    truth[disc(truth.shape, (20, 20), 10)] = 1
    truth[disc(truth.shape, (20, 60), 10)] = 2
    assert average_precision(truth, truth) == 1.0
    assert average_precision(np.zeros_like(truth), np.zeros_like(truth)) == 1.0
    assert average_precision(truth, np.zeros_like(truth)) == 0.0
    one = np.where(truth == 1, 7, 0)  # one of two found exactly: TP 1, FN 1 at every threshold
    assert average_precision(truth, one) == pytest.approx(0.5)
    square_t = np.zeros((20, 20), np.int32)
    square_t[0:10, 0:10] = 1
    square_p = np.zeros_like(square_t)
    square_p[0:10, 0:6] = 1  # IoU 0.6: a match at thresholds 0.50 and 0.55 only
    assert iou_matrix(square_t, square_p)[0, 0] == pytest.approx(0.6)
    assert average_precision(square_t, square_p) == pytest.approx(2 / 10)


def test_iou_matrix_equals_brute_force():
    rng = np.random.default_rng(0)
    truth, predicted = rng.integers(0, 4, (30, 30)), rng.integers(0, 5, (30, 30))
    iou = iou_matrix(truth, predicted)
    for i, t in enumerate(range(1, 4)):
        for j, p in enumerate(range(1, 5)):
            a, b = truth == t, predicted == p
            assert iou[i, j] == pytest.approx((a & b).sum() / (a | b).sum())


def test_instance_table_measures_each_object():
    objects = np.zeros((30, 30), np.int32)
    objects[2:6, 3:8] = 1
    objects[20:30, 20:30] = 2
    rows = instance_table(objects, spacing=(0.5, 0.5))
    assert [(r["label"], r["area_px"], r["area"]) for r in rows] == [(1, 20, 5.0), (2, 100, 25.0)]
    assert (rows[1]["centroid_row"], rows[1]["centroid_col"]) == (24.5, 24.5)


def test_evaluate_scores_dsb_nuclei_as_objects(data_root):
    from unetseg.data.datasets import dataset_info, list_cases, load_cases, read_dsb_instances
    from unetseg.evaluate import evaluate_cases, format_summary, summarize
    from unetseg.infer import Segmenter, load_checkpoint

    wanted = load_checkpoint("dsb2018_2d")["split"]["val"][:3]
    refs, info = list_cases(dataset_info("dsb2018"), data_root)
    refs = [r for r in refs if r.case_id in wanted]
    segmenter = Segmenter.from_checkpoint("dsb2018_2d")
    cases = load_cases(refs, info, segmenter.preprocessing.normalization, progress=False, instances=True)
    rows = evaluate_cases(segmenter, cases, progress=False)
    for ref, row in zip(refs, rows):
        assert row["objects_true"] == len(list(ref.label.glob("*.png"))) == read_dsb_instances(ref.label).max()
        assert 0.0 <= row["ap_iou_50_95"] <= 1.0 and row["objects_predicted"] > 0
    summary = summarize(rows, info.class_names)
    assert summary["instances"]["ap_iou_50_95_mean"] == pytest.approx(np.mean([r["ap_iou_50_95"] for r in rows]))
    assert "DSB2018 score" in format_summary(summary)
    plain = load_cases(refs, info, segmenter.preprocessing.normalization, progress=False)
    assert all(c.instances is None for c in plain)  # training never holds the object labels
