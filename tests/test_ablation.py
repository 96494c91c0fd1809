"""Skip-connection study: the variant matrix, the quick study end to end on real data, its report's numbers
recomputed independently from the run folders, resuming a killed study, and the analysis primitives."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from scipy.stats import ttest_1samp, wilcoxon

from unetseg.ablation.compare import collapsed_classes, compare, healthy_mean_dice
from unetseg.ablation.gradients import same_layer_comparison
from unetseg.ablation.landscape import filter_normalized_direction, loss_slices
from unetseg.ablation.report import write_report
from unetseg.ablation.runs import finished_twin, run_dir
from unetseg.ablation.stats import (
    bootstrap_ci,
    exact_p_floor,
    hierarchical_bootstrap_ci,
    holm,
    paired_comparison,
    rate_difference_p,
    t_interval,
)
from unetseg.ablation.tables import ms, p_text, seed_diffs_text
from unetseg.ablation.weights import weight_change
from unetseg.ablation.study import STUDY_DIR, load_study
from unetseg.ablation.variants import base_config, build_variants, variant_config
from unetseg.cli import main
from unetseg.config import ModelConfig
from unetseg.errors import UnetsegError
from unetseg.model import UNet
from unetseg.runlog import read_jsonl
from unetseg.train import fit

from .conftest import REPO, tiny_config

FULL_VARIANTS = [
    "skip", "noskip", "skip_off_L0", "skip_off_L1", "skip_off_L2", "add", "residual", "residual_noskip",
    "depth3_skip", "depth3_noskip", "depth5_skip", "depth5_noskip",
]
VARIED = {"channels", "skips", "merge", "residual"}  # the model fields a variant sets; the rest are the base config's


# ---- the matrix (no data) -------------------------------------------------------------------


@pytest.mark.parametrize("study", ["hippocampus_2d", "dsb2018_2d"])
def test_full_matrix_flips_only_model_fields(study):
    spec = load_study(study)
    variants = build_variants(spec)
    assert [v.name for v in variants] == FULL_VARIANTS
    assert len(spec.seeds) >= 3
    base = base_config(spec).to_dict()
    for v in variants:
        for seed in spec.seeds:
            cfg = variant_config(spec, v, seed).to_dict()
            assert cfg["data"] == base["data"] and cfg["augment"] == base["augment"]
            assert {k: x for k, x in cfg["train"].items() if k != "seed"} == {k: x for k, x in base["train"].items() if k != "seed"}
            assert cfg["train"]["seed"] == seed
            assert cfg["model"]["channels"] == [spec.width * 2**i for i in range(v.depth)]
            assert isinstance(v.model, ModelConfig) and cfg["model"] == asdict(v.model)
            assert {k: x for k, x in cfg["model"].items() if k not in VARIED} == \
                {k: x for k, x in base["model"].items() if k not in VARIED}
            model = UNet(channels=cfg["model"]["channels"], skips=cfg["model"]["skips"], merge=cfg["model"]["merge"],
                         residual=cfg["model"]["residual"])
            assert model.skip_levels() == [i for i, on in enumerate(v.skips) if on], v.name
            assert bool(model.residual_blocks()) == (v.name.startswith("residual"))
    by_name = {v.name: v for v in variants}
    assert by_name["skip_off_L1"].skips == (True, False, True)
    assert by_name["depth5_noskip"].reference == "depth5_skip" and by_name["residual_noskip"].reference == "residual"
    # every run of a study has a fixed step budget, so variants compare at equal cost
    assert base["train"]["steps_per_epoch"] and base["train"]["grad_log_every"] > 0


@pytest.mark.parametrize("core_name", ["hippocampus_2d", "dsb2018_2d"])
def test_seed_study_is_the_core_matrix_of_its_study_with_more_seeds(core_name):
    """<study>_seeds (issue 11: seeds as the unit) trains the same networks on the same budget as <study>, so its
    runs are comparable, cell by cell, with the same training code."""
    core, seeds = load_study(core_name), load_study(f"{core_name}_seeds")
    assert len(seeds.seeds) >= 8 and seeds.overrides == core.overrides
    by_name = {v.name: v for v in build_variants(core)}
    assert [v.name for v in build_variants(seeds)] == ["skip", "noskip", "residual", "residual_noskip"]
    for v in build_variants(seeds):
        assert variant_config(seeds, v, 5).to_dict() == {**variant_config(core, by_name[v.name], 5).to_dict(),
                                                         "name": f"{core_name}_seeds-{v.name}-seed5"}


def test_quick_section_and_bad_study_files(tmp_path):
    quick = load_study("hippocampus_2d", quick=True)
    assert quick.quick and quick.depth == 3 and "data.max_cases=10" in quick.overrides
    assert [v.name for v in build_variants(quick)][-2:] == ["depth4_skip", "depth4_noskip"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nconfig: hippocampus_2d\nepochs: 3\n")
    with pytest.raises(UnetsegError, match="unknown field.*epochs"):
        load_study(str(bad))
    with pytest.raises(UnetsegError, match="not found"):
        load_study("no_such_study")


# ---- analysis primitives (no data) ----------------------------------------------------------


def test_filter_normalised_direction_matches_filter_norms():
    torch.manual_seed(0)
    model = UNet(channels=(4, 8, 16), residual=True)
    d = filter_normalized_direction(model, torch.Generator().manual_seed(1))
    for name, w in model.named_parameters():
        if w.ndim <= 1:
            assert not d[name].any(), name  # biases and norm parameters are not perturbed
        else:
            assert torch.allclose(d[name].flatten(1).norm(dim=1), w.detach().flatten(1).norm(dim=1), rtol=1e-4), name
            assert not torch.allclose(d[name], w.detach())
    d2 = filter_normalized_direction(model, torch.Generator().manual_seed(1))
    assert all(torch.equal(d[k], d2[k]) for k in d)  # reproducible from the seed


def test_loss_slices_centre_and_weights_restored():
    torch.manual_seed(0)
    model = UNet(channels=(4, 8), out_channels=2).eval()
    x = torch.rand(6, 1, 16, 16)
    y = (x[:, :1] > 0.5).long()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    s = loss_slices(model, x, y, points_1d=5, points_2d=3, span=1.0, batch_size=4)
    assert s["loss_1d"].shape == (5,) and s["loss_2d"].shape == (3, 3)
    assert s["loss_1d"][2] == pytest.approx(float(s["loss_center"]), abs=1e-6)  # alpha = 0 is the trained point
    assert s["loss_2d"][1, 1] == pytest.approx(float(s["loss_center"]), abs=1e-6)
    assert s["loss_1d"][0] != pytest.approx(s["loss_1d"][2])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_paired_statistics():
    rng = np.random.default_rng(0)
    ref = rng.uniform(0.6, 0.9, 40)
    better = ref + 0.05 + rng.normal(0, 0.01, 40)
    c = paired_comparison(better, ref)
    assert c["cases"] == 40 and c["ci_low"] < c["mean_diff"] < c["ci_high"]
    assert 0.04 < c["ci_low"] and c["ci_high"] < 0.06
    assert c["wilcoxon_p"] == pytest.approx(wilcoxon(better - ref).pvalue) and c["wilcoxon_p"] < 1e-6
    same = paired_comparison(ref, ref)
    assert same["wilcoxon_p"] == 1.0 and same["ci_low"] == same["ci_high"] == 0.0
    lo, hi = bootstrap_ci(rng.normal(0, 1, 30))
    assert lo < 0 < hi
    with pytest.raises(ValueError):
        paired_comparison([1.0, 2.0], [1.0])


def test_collapsed_runs_are_flagged_and_left_out_of_the_healthy_mean():
    def per_case(b_scores):
        return {"class_names": ["background", "a", "b"],
                "cases": [{"case_id": f"c{i}", "dice_a": 0.8, "dice_b": d} for i, d in enumerate(b_scores)]}

    collapsed, healthy = per_case([0.0, 0.15, float("nan")]), per_case([0.6, 0.7, 0.8])
    assert collapsed_classes(collapsed) == ["b"]  # mean 0.075 over the finite cases
    assert collapsed_classes(healthy) == [] and collapsed_classes(per_case([float("nan")] * 3)) == []
    h = healthy_mean_dice({0: collapsed, 1: healthy})
    assert h["seeds"] == [1] and h["mean"] == pytest.approx((0.8 + 0.7) / 2)
    assert rate_difference_p(0, 10, 10, 10) < 1e-4 and rate_difference_p(1, 2, 1, 2) == 1.0


def test_holm_t_interval_and_the_exact_test_floor_on_known_values():
    # Holm by hand: sorted 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, then max(0.06, 0.04*1) = 0.06
    assert holm([0.01, 0.04, 0.03, 0.005, float("nan")])[:4] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert np.isnan(holm([0.01, float("nan")])[1]) and holm([0.01, float("nan")])[0] == pytest.approx(0.01)
    assert holm([0.01, 0.011, 0.5]) == pytest.approx([0.03, 0.03, 0.5])  # 0.011*2 = 0.022 raised to keep the order
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    # t-interval of 1..4: mean 2.5, s = 1.2910, t(0.975, 3 dof) = 3.182446
    t = t_interval([1.0, 2.0, 3.0, 4.0])
    half = 3.182446305284263 * np.std([1, 2, 3, 4], ddof=1) / 2
    assert (t["mean"], t["low"], t["high"], t["dof"]) == pytest.approx((2.5, 2.5 - half, 2.5 + half, 3))
    assert t["t_p"] == pytest.approx(ttest_1samp([1.0, 2.0, 3.0, 4.0], 0.0).pvalue)  # t = 3.873 on 3 dof
    assert np.isnan(t_interval([0.3])["low"]) and t_interval([0.2, 0.2])["low"] == pytest.approx(0.2)
    # the seed-level DSB no-skip gap, from the three committed per-seed differences
    dsb = t_interval([-0.01330268904566767, -0.026670708553865552, -0.007758928090333961])
    assert (round(dsb["low"], 3), round(dsb["high"], 3)) == (-0.040, 0.008)
    # every one of 42 differences the same sign: the exact test's floor 2/2^42, and it is marked as a floor
    rng = np.random.default_rng(1)
    ref = rng.uniform(0.5, 0.9, 42)
    c = paired_comparison(ref + rng.uniform(0.01, 0.02, 42), ref)
    assert c["wilcoxon_p"] == pytest.approx(exact_p_floor(42)) == pytest.approx(4.547e-13, rel=1e-3) and c["at_floor"]
    assert p_text(c, long=True) == "4.5e-13 (floor of the exact test with n=42: 2/2^42)"
    mixed = paired_comparison(ref + np.r_[-0.015, rng.uniform(0.01, 0.02, 41)], ref)
    assert not mixed["at_floor"] and mixed["wilcoxon_p"] > exact_p_floor(42) and "floor" not in p_text(mixed)


def test_hierarchical_bootstrap_counts_the_seed_spread_and_is_reproducible():
    rng = np.random.default_rng(0)
    # three seeds that disagree (+0.05, 0, -0.03) with tight cases inside each seed
    diffs = np.array([0.05, 0.0, -0.03])[:, None] + rng.normal(0, 0.002, (3, 40))
    lo, hi = hierarchical_bootstrap_ci(diffs, seed=3)
    assert (lo, hi) == hierarchical_bootstrap_ci(diffs, seed=3) and (lo, hi) != hierarchical_bootstrap_ci(diffs, seed=4)
    assert lo < -0.015 and hi > 0.035  # spans most of the seeds' spread
    case_lo, case_hi = bootstrap_ci(diffs.mean(axis=0))  # seeds averaged first: the spread is gone
    assert case_hi - case_lo < 0.1 * (hi - lo)
    diffs[1, :5] = np.nan  # an undefined case in one seed is left out, not propagated
    assert np.isfinite(hierarchical_bootstrap_ci(diffs)).all()
    assert np.isnan(hierarchical_bootstrap_ci(np.full((2, 3), np.nan))).all()
    with pytest.raises(ValueError, match="seeds, cases"):
        hierarchical_bootstrap_ci(np.zeros(5))


def _per_case(dice_a, dice_b=None):
    """A two-class per_case.json with the given per-case Dice of class a (class b fixed at 0.8 unless given)."""
    b = dice_b if dice_b is not None else [0.8] * len(dice_a)
    return {"class_names": ["background", "a", "b"],
            "cases": [{"case_id": f"c{i}", "dice_a": x, "dice_b": y, "hd95_a": float("nan") if x < 0.1 else 2.0,
                       "hd95_b": 3.0} for i, (x, y) in enumerate(zip(dice_a, b))]}


def test_seed_level_comparison_flags_collapsed_seeds_in_its_cells():
    variant = {0: _per_case([0.8, 0.7, 0.9]), 1: _per_case([0.0, 0.0, 0.05]), 2: _per_case([0.85, 0.75, 0.9])}
    reference = {s: _per_case([0.8, 0.8, 0.8]) for s in range(3)}
    c = compare(variant, reference, "mean_dice")
    per_seed = [(np.mean([0.8, 0.7, 0.9]) - 0.8) / 2, (np.mean([0.0, 0.0, 0.05]) - 0.8) / 2,
                (np.mean([0.85, 0.75, 0.9]) - 0.8) / 2]
    assert c["seeds"] == [0, 1, 2] and c["seed_diffs"] == pytest.approx(per_seed)
    assert c["seed_level"]["mean"] == pytest.approx(np.mean(per_seed)) and c["seed_level"]["dof"] == 2
    assert c["seed_level"]["low"] < c["ci_low"]  # the collapsed seed widens the seed-level interval
    assert c["collapsed"] == {"variant": [1], "reference": []}
    assert seed_diffs_text(c).split() == [f"{per_seed[0]:+.3f}", f"{per_seed[1]:+.3f}†", f"{per_seed[2]:+.3f}"]
    hd95 = compare(variant, reference, "hd95_a")  # seed 1 has no HD95 of class a: left out, and the cell says so
    assert hd95["seed_diffs"][0] == 0.0 and np.isnan(hd95["seed_diffs"][1])
    assert ms({"mean": 2.0, "std": 0.0, "per_seed": [2.0, float("nan"), 2.0]}, 2) == "2.00 ± 0.00 [2/3 seeds]"
    assert ms({"mean": 2.0, "std": 0.0, "per_seed": [2.0, None, 2.0]}, 2).endswith("[2/3 seeds]")  # as read from JSON


def test_same_layer_gradients_are_compared_per_element_and_seed_by_seed():
    def rows(grads, norms0, norms1):
        layer = lambda names, g, w: [{"layer": n, "grad_norm": a, "weight_norm": b, "ratio": a / b}
                                     for n, a, b in zip(names, g, w)]
        names = ["encoder.0.conv1.weight", "decoder.0.up.weight"]
        return [{"step": 0, "layers": layer(names, grads, norms0)}, {"step": 90, "layers": layer(names, grads, norms1)}]

    names = ["encoder.0.conv1.weight", "decoder.0.up.weight"]
    sizes = {"with": {names[0]: 4, names[1]: 100}, "without": {names[0]: 4, names[1]: 25}}
    with_logs = {0: rows([2.0, 1.0], [1.0, 2.0], [1.5, 2.0]), 1: rows([2.0, 0.5], [1.0, 2.0], [1.0, 3.0])}
    without_logs = {0: rows([1.0, 1.0], [1.0, 2.0], [1.2, 2.2]), 1: rows([1.0, 2.0], [1.0, 2.0], [1.0, 1.0]),
                    5: rows([9.0, 9.0], [1.0, 1.0], [1.0, 1.0])}  # a seed only one side ran is left out
    g = same_layer_comparison(with_logs, without_logs, names, sizes, total_steps=100)
    assert g["seeds"] == [0, 1] and g["layers"] == ["enc0.c1", "dec0.up"]
    # per element: dec0.up with = 1.0/10 and 0.5/10, without = 1.0/5 and 2.0/5 -> ratios 2 and 8
    np.testing.assert_allclose(g["early_without_over_with"]["per_seed"], [[0.5, 2.0], [0.5, 8.0]])
    assert g["early_without_over_with"]["geo_mean"] == pytest.approx([0.5, 4.0])
    assert g["focus"] == 1  # dec0.up gets least gradient per element in the network with the feature
    np.testing.assert_allclose(g["norm_change"]["with"], [[0.5, 0.0], [0.0, 0.5]])
    assert g["norm_change"]["without"][1] == pytest.approx([0.0, -0.5]) and g["norm_change_step"]["with"] == [90, 90]


def test_weight_change_rebuilds_the_initial_weights_of_a_tiny_run(tmp_path, data_root):
    run = tmp_path / "run"
    fit(tiny_config(["train.grad_log_every=1", "train.seed=7"]), run, data_root=data_root, progress=False)
    moved = weight_change(run, "last.pt", seed=7)
    assert moved["init_check"] < 1e-5  # rebuilt norms == the norms fit logged at step 0, before any update
    logged = {r["layer"]: r["weight_norm"] for r in read_jsonl(run / "gradients.jsonl")[0]["layers"]}
    assert {r["layer"] for r in moved["layers"]} == set(logged)
    for r in moved["layers"]:
        assert r["init_norm"] == pytest.approx(logged[r["layer"]], rel=1e-5)
        assert r["relative_distance"] == pytest.approx(r["distance"] / r["init_norm"])
        # 3 AdamW steps moved every kernel, and at least as far as its norm changed (triangle inequality)
        assert r["relative_distance"] > 0
        assert r["relative_distance"] >= abs(r["final_norm"] - r["init_norm"]) / r["init_norm"] - 1e-7
    with pytest.raises(UnetsegError, match="do not match the logged step-0 norms"):
        weight_change(run, "last.pt", seed=8)


# ---- the quick study on real data -----------------------------------------------------------


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory, data_root):
    """``unetseg ablate --quick`` into a temporary study folder and report folder, trained as a job array would:
    ``--shard 1/2`` and ``--shard 2/2`` into the shared folder, then the same command without ``--shard``."""
    tmp = tmp_path_factory.mktemp("ablation")
    study, report = tmp / "study", tmp / "report"
    args = ["ablate", "--config", "hippocampus_2d", "--quick", "--out", str(study), "--report-dir", str(report),
            "--data-root", str(data_root), "--quiet"]
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        for shard in ("1/2", "2/2"):
            assert main([*args, "--shard", shard]) == 0
            assert not (report / "report.md").exists()  # a shard trains and stops
        assert main(args) == 0
    return {"study": study, "report": report, "args": args, "spec": load_study("hippocampus_2d", quick=True),
            "stderr": stderr.getvalue()}


def test_shards_share_the_runs_and_the_last_call_only_analyses(quick_study):
    spec = quick_study["spec"]
    tasks = [(v.name, seed) for v in build_variants(spec) for seed in spec.seeds]
    log = read_jsonl(quick_study["study"] / "log.jsonl")
    shards = [i for i, row in enumerate(log) if row["event"] == "shard"]
    assert [log[i]["shard"] for i in shards] == ["1/2", "2/2"]
    trained = [[(r["variant"], r["seed"]) for r in log[start:end] if r["event"] == "run"]
               for start, end in zip([0, shards[0]], shards)]
    assert trained == [tasks[0::2], tasks[1::2]]  # each run once, by the shard that owns it
    assert all(r["action"] == "trained" for r in log[: shards[1]] if r["event"] == "run")
    last = [r for r in log[shards[1]:] if r["event"] == "run"]
    assert len(last) == len(tasks) and {r["action"] for r in last} == {"skipped"}


@pytest.mark.parametrize("shard", ["0/2", "3/2", "a/b", "2"])
def test_a_bad_shard_is_one_line(shard, tmp_path, capsys):
    assert main(["ablate", "--config", "hippocampus_2d", "--quick", "--out", str(tmp_path / "s"),
                 "--shard", shard]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "expected K/N with 1 <= K <= N" in err
    assert not (tmp_path / "s").exists()


def test_quiet_study_draws_no_progress_bars(quick_study):
    """--quiet silences every bar: data loading, epochs, scoring and the analyses."""
    assert "it/s" not in quick_study["stderr"] and "case/s" not in quick_study["stderr"], quick_study["stderr"][-500:]


def test_quick_study_writes_every_run_with_shared_split_and_budget(quick_study):
    spec, report = quick_study["spec"], quick_study["report"]
    variants = build_variants(spec)
    splits = set()
    for v in variants:
        for seed in spec.seeds:
            run = run_dir(report, v.name, seed)
            cfg = yaml.safe_load((run / "config.yaml").read_text())
            assert cfg == variant_config(spec, v, seed).to_dict()
            splits.add((run / "split.json").read_text())
            rows = read_jsonl(run / "metrics.jsonl")
            assert [r["epoch"] for r in rows] == [1, 2] and rows[-1]["step"] == 6
            grads = read_jsonl(run / "gradients.jsonl")
            assert [g["step"] for g in grads] == [0, 2, 4]
            per_case = json.loads((run / "per_case.json").read_text())
            assert [r["case_id"] for r in per_case["cases"]] == json.loads((run / "split.json").read_text())["val"]
            # the per-case scores reproduce the training loop's own final validation
            for name in per_case["class_names"][1:]:
                assert per_case["summary"]["classes"][name]["dice_mean"] == pytest.approx(rows[-1][f"val_dice_{name}"], abs=1e-6, nan_ok=True)
    assert len(splits) == 1  # one split for the whole study
    assert not list(report.rglob("*.pt")), "checkpoints must not reach the report folder"
    assert (run_dir(quick_study["study"], "skip", 0) / "last.pt").is_file()
    for fig in ("dice_per_variant", "training_curves", "gradient_flow", "depth", "lesions", "landscape_1d",
                "landscape_2d", "qualitative"):
        assert (report / "figures" / f"{fig}.png").stat().st_size > 5000, fig


def _cell(text: str) -> tuple[float, float]:
    mean, std = re.match(r"(-?[\d.]+) ± ([\d.]+)", text).groups()
    return float(mean), float(std)


def test_report_numbers_match_run_folders(quick_study):
    """Every table cell is recomputed here from per_case.json with plain numpy, independently of report.py."""
    spec, report = quick_study["spec"], quick_study["report"]
    text = (report / "report.md").read_text()
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| variant"))
    header = lines[start].strip("| ").split(" | ")
    rows = []  # the results table: the rows after its header and rule, up to the first line that is not a row
    for line in lines[start + 2:]:
        if not line.startswith("| `"):
            break
        rows.append(line.split(" | "))
    table = {r[0].strip("| `"): dict(zip(header, (c.strip(" |") for c in r))) for r in rows}
    assert list(table) == [v.name for v in build_variants(spec)]

    def seed_values(variant, key):
        out = []
        for seed in spec.seeds:
            pc = json.loads((run_dir(report, variant, seed) / "per_case.json").read_text())
            classes = pc["class_names"][1:]
            if key == "mean":
                out.append(np.mean([np.nanmean([r[f"dice_{c}"] for r in pc["cases"]]) for c in classes]))
            else:
                out.append(np.nanmean([r[key] for r in pc["cases"]]))
        return np.array(out)

    def case_means(variant):
        per_seed = []
        for seed in spec.seeds:
            pc = json.loads((run_dir(report, variant, seed) / "per_case.json").read_text())
            classes = pc["class_names"][1:]
            per_seed.append([np.nanmean([r[f"dice_{c}"] for c in classes]) for r in pc["cases"]])
        return np.nanmean(np.array(per_seed), axis=0)

    checked = 0
    for v in build_variants(spec):
        row = table[v.name]
        for cls in ("anterior", "posterior"):
            values = seed_values(v.name, f"dice_{cls}")
            mean, std = _cell(row[f"Dice {cls}"])
            assert mean == pytest.approx(values.mean(), abs=6e-4) and std == pytest.approx(values.std(ddof=1), abs=6e-4)
            checked += 1
        values = seed_values(v.name, "mean")
        assert _cell(row["mean Dice"])[0] == pytest.approx(values.mean(), abs=6e-4)
        if v.reference:
            diff = float(np.mean(case_means(v.name) - case_means(v.reference)))
            shown = float(row["Δ mean Dice vs reference [95 % CI]"].split(" [")[0])
            assert shown == pytest.approx(diff, abs=6e-4), v.name
            per_seed = [float(x.rstrip("†")) for x in row["Δ per seed"].split()]
            assert per_seed == pytest.approx(list(seed_values(v.name, "mean") - seed_values(v.reference, "mean")), abs=6e-4)
            checked += 1
    assert checked >= 2 * len(table) + len(table) - 1
    summary = json.loads((report / "summary.json").read_text())
    assert summary["runs_found"] == summary["runs_expected"] == len(build_variants(spec)) * len(spec.seeds)
    assert summary["budget"]["total_steps"] == 6 and "Quick mode" in text
    assert f"{summary['budget']['epochs']} epochs x {summary['budget']['steps_per_epoch']} steps" in text


def test_lesion_and_landscape_artefacts(quick_study):
    spec, report = quick_study["spec"], quick_study["report"]
    for variant, blocks in (("skip", 0), ("residual", 5)):  # depth 3: 3 encoder + 2 decoder blocks
        for seed in spec.seeds:
            lesion = json.loads((report / "analysis" / f"lesion_{variant}_seed{seed}.json").read_text())
            per_case = json.loads((run_dir(report, variant, seed) / "per_case.json").read_text())
            assert lesion["intact"]["mean_dice"] == pytest.approx(per_case["summary"]["mean_dice"], abs=1e-6, nan_ok=True)
            assert sorted(lesion["skips"]) == ["0", "1"] and len(lesion["residuals"]) == blocks
            assert lesion["case_ids"] == [r["case_id"] for r in per_case["cases"]]
    for variant in ("skip", "noskip"):
        z = np.load(report / "analysis" / f"landscape_{variant}_seed0.npz")
        meta = json.loads((report / "analysis" / f"landscape_{variant}_seed0.json").read_text())
        assert z["loss_2d"].shape == (3, 3) and z["loss_1d"].shape == (5,)
        assert z["loss_1d"][2] == pytest.approx(meta["loss_center"], abs=1e-6)
        assert z["loss_2d"][1, 1] == pytest.approx(meta["loss_center"], abs=1e-6)
        assert meta["samples"] == 8
        for seed in spec.seeds:  # every seed, along 2 directions of its own (issue 11: the spread over seeds)
            spread = json.loads((report / "analysis" / f"landscape1d_{variant}_seed{seed}.json").read_text())
            losses = np.array(spread["losses"])
            assert losses.shape == (2, 5) and np.allclose(losses[:, 2], spread["loss_center"], atol=1e-6)
            assert not np.allclose(losses[0], losses[1])  # two different directions
            assert spread["sharpness_0.5"] == pytest.approx([(c[1] + c[3]) / 2 - spread["loss_center"] for c in losses])
    summary = json.loads((report / "summary.json").read_text())
    assert set(summary["landscape_spread"]) == {"skip", "noskip"}
    pair = summary["landscape_spread_pairs"][0]
    rise = {v: [np.mean(json.loads((report / "analysis" / f"landscape1d_{v}_seed{s}.json").read_text())["sharpness_0.5"])
                for s in spec.seeds] for v in ("skip", "noskip")}
    assert (pair["with"], pair["without"]) == ("skip", "noskip")
    assert pair["differences"] == pytest.approx(np.subtract(rise["noskip"], rise["skip"]).tolist())
    assert "figures/landscape_spread.png" in (report / "report.md").read_text()
    q = np.load(report / "analysis" / "qualitative.npz")
    assert list(q["variants"]) == ["skip", "noskip", "residual_noskip"] and len(q["case_ids"]) == 2
    assert q["pred_skip_0"].shape == q["truth_0"].shape == q["image_0"].shape[:2]


def test_report_only_redraws_from_artefacts_alone(quick_study, tmp_path, data_root):
    copy = tmp_path / "copy"
    shutil.copytree(quick_study["report"], copy)
    original = (copy / "report.md").read_text()
    reproduce = next(line for line in original.splitlines() if line.startswith("- Reproduce:"))
    assert str(data_root) not in reproduce and "<folder with the data sets>" in reproduce  # no path of this machine
    for name in ("report.md", "summary.json"):
        (copy / name).unlink()
    shutil.rmtree(copy / "figures")
    assert main(["ablate", "--config", "hippocampus_2d", "--quick", "--report-only", "--report-dir", str(copy)]) == 0
    assert (copy / "report.md").read_text() == original
    assert (copy / "figures" / "gradient_flow.png").is_file()


def test_rerun_skips_finished_runs_and_resumes_a_killed_one(quick_study, data_root, monkeypatch, capfd):
    spec, study = quick_study["spec"], quick_study["study"]
    variant = next(v for v in build_variants(spec) if v.name == "noskip")
    killed = run_dir(study, "noskip", 1)
    before = json.loads((killed / "per_case.json").read_text())
    untouched = run_dir(study, "skip", 0) / "last.pt"
    mtime = untouched.stat().st_mtime_ns

    shutil.rmtree(killed)  # the study is killed after this run's first epoch:
    fit(variant_config(spec, variant, 1), killed, data_root=data_root, progress=False, stop_after_epoch=0)
    assert len(read_jsonl(killed / "metrics.jsonl")) == 1 and not (killed / "per_case.json").exists()

    logged = len(read_jsonl(study / "log.jsonl"))
    # resumed through the process pool; same thread count per run as the uninterrupted study had
    monkeypatch.setenv("OMP_NUM_THREADS", str(os.cpu_count()))
    parallel = [a for a in quick_study["args"] if a != "--quiet"] + ["--jobs", "2"]
    assert main(parallel) == 0
    shown = capfd.readouterr()
    assert "runs: 100%" in shown.err and "noskip seed 1: resumed" in shown.out
    assert "epoch 2/2" not in shown.err  # parallel runs draw no epoch bars over each other
    last = read_jsonl(study / "log.jsonl")[logged:]
    actions = {(r["variant"], r["seed"]): r["action"] for r in last if r["event"] == "run"}
    assert actions.pop(("noskip", 1)) == "resumed"
    assert set(actions.values()) == {"skipped"} and len(actions) == len(build_variants(spec)) * len(spec.seeds) - 1
    assert not [r for r in last if r["event"] == "analysis"]  # analyses are cached too
    assert untouched.stat().st_mtime_ns == mtime
    after = json.loads((killed / "per_case.json").read_text())
    for a, b in zip(before["cases"], after["cases"]):  # resumed run == uninterrupted run (CPU)
        assert a == pytest.approx(b, abs=1e-6, nan_ok=True)
    assert [r["epoch"] for r in read_jsonl(killed / "metrics.jsonl")] == [1, 2]


def test_changed_study_settings_are_refused(quick_study, tmp_path, capsys):
    raw = yaml.safe_load((STUDY_DIR / "hippocampus_2d.yaml").read_text())
    raw["quick"]["seeds"] = [0, 1, 2]
    other = tmp_path / "hippocampus_2d.yaml"
    other.write_text(yaml.safe_dump(raw))
    args = ["ablate", "--config", str(other), "--quick", "--out", str(quick_study["study"]), "--report-dir",
            str(tmp_path / "r")]
    assert main(args) == 2
    assert "other settings" in capsys.readouterr().err


def test_reuse_copies_identical_finished_runs_of_another_study_and_only_those(quick_study, tmp_path, capsys,
                                                                            data_root):
    """--reuse: a study under another name whose runs have the quick study's training configs copies them (logged
    with their source, scores unchanged, config under its own name, command.txt saying so), and a second call keeps
    them; a run whose budget or split differs, or that is not finished, is not a twin."""
    raw = yaml.safe_load((STUDY_DIR / "hippocampus_2d.yaml").read_text())
    raw["name"] = "twin_study"
    twin_file = tmp_path / "twin_study.yaml"
    twin_file.write_text(yaml.safe_dump(raw))
    out = tmp_path / "twin"
    args = ["ablate", "--config", str(twin_file), "--quick", "--out", str(out), "--report-dir", str(tmp_path / "r"),
            "--data-root", str(data_root), "--quiet", "--reuse", str(quick_study["study"]), "--shard", "1/1"]
    assert main(args) == 0 and main(args) == 0
    spec = load_study(str(twin_file), quick=True)
    rows = [r for r in read_jsonl(out / "log.jsonl") if r["event"] == "run"]
    tasks = len(build_variants(spec)) * len(spec.seeds)
    assert len(rows) == 2 * tasks and {r["action"] for r in rows[tasks:]} == {"skipped"}
    for row in rows[:tasks]:
        assert row["action"] == "reused" and row["from_study"] == "hippocampus_2d"
        assert row["from"] == str(run_dir(quick_study["study"], row["variant"], row["seed"]))
        copied, source = run_dir(out, row["variant"], row["seed"]), Path(row["from"])
        assert (copied / "per_case.json").read_bytes() == (source / "per_case.json").read_bytes()
        assert (copied / "last.pt").read_bytes() == (source / "last.pt").read_bytes()
        assert yaml.safe_load((copied / "config.yaml").read_text())["name"].startswith("twin_study")
        assert f"copied by unetseg ablate --reuse from {source}" in (copied / "command.txt").read_text()
    assert not list((out / "runs").glob("*/.*"))  # no staging folder left behind

    variant = next(v for v in build_variants(spec) if v.name == "skip")
    seed = spec.seeds[0]
    cfg = variant_config(spec, variant, seed)
    donor = run_dir(quick_study["study"], "skip", seed)
    split = json.loads((donor / "split.json").read_text())
    assert finished_twin([quick_study["study"]], seed, cfg, split) == donor
    assert finished_twin([quick_study["study"]], seed, replace(cfg, train=replace(cfg.train, lr=0.5)), split) is None
    assert finished_twin([quick_study["study"]], seed, cfg, {**split, "val": split["val"][1:]}) is None
    unscored = tmp_path / "unscored"
    shutil.copytree(donor, run_dir(unscored, "skip", seed))
    (run_dir(unscored, "skip", seed) / "per_case.json").unlink()
    assert finished_twin([unscored], seed, cfg, split) is None
    assert main(["ablate", "--config", "hippocampus_2d", "--quick", "--out", str(tmp_path / "x"),
                 "--reuse", str(tmp_path / "nowhere")]) == 2
    assert "not a study folder" in capsys.readouterr().err
    assert main(["ablate", "--config", "hippocampus_2d", "--quick", "--report-only", "--report-dir",
                 str(quick_study["report"]), "--reuse", str(quick_study["study"])]) == 2
    assert "--reuse is about training runs" in capsys.readouterr().err


def test_a_study_saved_before_an_analysis_field_existed_is_the_same_study(tmp_path):
    """A study folder's study.yaml from older code lacks fields added since; they take their defaults, so the
    folder is not refused as 'other settings' (a real seed or budget change still is)."""
    from unetseg.ablation.runner import _check_study_file

    spec = load_study("hippocampus_2d", quick=True)
    raw = spec.to_dict()
    del raw["analysis"]["landscape_span"]  # written before the field existed (its value is the default)
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(raw))
    _check_study_file(load_study("hippocampus_2d", quick=True), tmp_path)  # same study: no error
    raw["seeds"] = [0, 1, 2]
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(UnetsegError, match="other settings"):
        _check_study_file(spec, tmp_path)


# ---- the committed full studies -------------------------------------------------------------

DOCS = REPO / "docs"


def assert_redrawn_from_artefacts(name: str, tmp_path) -> dict:
    """Redraw docs/ablation/<name> from its artefacts alone (a copy without figures, report and summary) and
    check report.md and summary.json come out byte for byte as committed; returns the summary."""
    committed = DOCS / "ablation" / name
    copy = tmp_path / name
    shutil.copytree(committed, copy, ignore=shutil.ignore_patterns("figures", "report.md", "summary.json"))
    write_report(copy)
    assert (copy / "report.md").read_text() == (committed / "report.md").read_text()
    assert (copy / "summary.json").read_text() == (committed / "summary.json").read_text()
    return json.loads((committed / "summary.json").read_text())


@pytest.mark.parametrize("name", ["hippocampus_2d", "dsb2018_2d", "hippocampus_2d_round1", "dsb2018_2d_round1"])
def test_committed_study_report_is_redrawn_from_its_artefacts(name, tmp_path):
    """The committed report.md and summary.json are exactly what --report-only makes from the committed runs
    (today's recipe, and the round-1 studies trained under the old one, kept for docs/collapse.md)."""
    summary = assert_redrawn_from_artefacts(name, tmp_path)
    assert summary["runs_found"] == summary["runs_expected"] == 36 and not summary["quick"]


def test_report_only_refuses_another_study_s_folder(capsys):
    folder = DOCS / "ablation" / "hippocampus_2d"
    assert main(["ablate", "--config", "dsb2018_2d", "--report-only", "--report-dir", str(folder)]) == 2
    assert "holds the study 'hippocampus_2d', not 'dsb2018_2d'" in capsys.readouterr().err


def _signed(x: float) -> str:
    """How the docs write a difference: +0.005, −0.052 (typographic minus)."""
    return f"{x:+.3f}".replace("-", "−")


def _quoted_figures(summary: dict) -> list[str]:
    """The summary.json figures docs/ablation.md quotes for every study, formatted as the docs write them."""
    v = summary["variants"]

    def ms(entry):
        return f"{entry['mean']:.3f} ± {entry['std']:.3f}"

    vs_skip = v["noskip"]["vs_reference"]["mean_dice"]
    quoted = [ms(v["skip"]["mean_dice"]), ms(v["noskip"]["mean_dice"]), _signed(vs_skip["mean_diff"]),
              f"p = {vs_skip['wilcoxon_p']:.2g}", f"{summary['timing']['wall_seconds'] / 60:.1f} min"]
    quoted += [_signed(v[f"skip_off_L{level}"]["vs_reference"]["mean_dice"]["mean_diff"]) for level in range(3)]
    quoted += [_signed(v["residual"]["vs_reference"]["mean_dice"]["mean_diff"])]
    quoted += [_signed(r["gap_without_collapsed"]) for r in summary["depth"]]
    (a, na), (b, nb) = summary["collapse"]["with_long_skips"], summary["collapse"]["without_long_skips"]
    quoted += [f"{a} of {na} runs with long skips and {b} of {nb} without"]
    if a + b:
        quoted += [f"p = {summary['collapse']['fisher_p']:.2g}"]
    # a variant with a collapsed run is also quoted by its mean over the healthy seeds
    quoted += [f"{v[r['variant']]['mean_dice_without_collapsed']['mean']:.3f}" for r in summary["collapse"]["runs"]]
    # seeds as the unit: the no-skip and residual comparisons and every depth gap, with their t-intervals
    for c in (vs_skip, v["residual"]["vs_reference"]["mean_dice"], *(r["gap"] for r in summary["depth"])):
        level = c["seed_level"]
        quoted += [f"{_signed(level['mean'])} [{_signed(level['low'])}, {_signed(level['high'])}]"]
    quoted += [f"Holm {vs_skip['holm_p']:.2g}"]
    # gradients compared at the same layer, per element: the first upsampling out of the bottleneck
    same = next(g for g in summary["same_layer_gradients"] if g["pair"] == "skip vs noskip")
    up = same["layers"].index("dec2.up")
    quoted += [f"{same['early_without_over_with']['geo_mean'][up]:.1f} times `skip`'s gradient at `dec2.up`"]
    quoted += [", ".join(f"{r[up]:.1f}" for r in same["early_without_over_with"]["per_seed"])]
    return quoted


@pytest.mark.parametrize("name", ["hippocampus_2d", "dsb2018_2d"])
def test_figures_quoted_in_the_docs_are_the_committed_study_s(name):
    s = json.loads((DOCS / "ablation" / name / "summary.json").read_text())
    reading = (DOCS / "ablation.md").read_text()
    section = reading.split(f"<!-- reading: {name} -->", 1)[1].split("<!-- reading:", 1)[0]
    missing = [q for q in _quoted_figures(s) if q not in section]
    assert not missing, f"docs/ablation.md's {name} reading does not quote these summary.json figures: {missing}"
    readme = (REPO / "README.md").read_text()
    v = s["variants"]
    for q in (f"{v['skip']['mean_dice']['mean']:.3f} ± {v['skip']['mean_dice']['std']:.3f}",
              f"{v['noskip']['mean_dice']['mean']:.3f} ± {v['noskip']['mean_dice']['std']:.3f}",
              f"{s['timing']['wall_seconds'] / 60:.1f} min"):
        assert q in readme, q


def test_lesions_are_undone_even_when_scoring_fails():
    from unetseg.ablation.lesion import lesioned
    from unetseg.model import UNet

    model = UNet(2, 1, 3, (4, 8, 16), residual=True).eval()
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        intact = model(x)
        with pytest.raises(RuntimeError, match="scoring failed"):
            with lesioned(model, skips=model.skip_levels(), residuals=list(model.residual_blocks())[:1]):
                assert not torch.allclose(model(x), intact)
                raise RuntimeError("scoring failed")
        assert torch.equal(model(x), intact)


def test_signal_profile_sees_the_gradient_vanish_in_a_plain_deep_network_and_not_with_batch_norm():
    """Glorot & Bengio's measurement: Var(dL/dz) at the first convolution over the head's, at initialisation."""
    import torch

    from unetseg.ablation.signal import shrinkage, signal_profile
    from unetseg.losses import make_loss
    from unetseg.model import UNet

    torch.manual_seed(0)
    x, y = torch.randn(4, 1, 64, 64), torch.randint(0, 3, (4, 64, 64))
    ratio = {}
    for norm in ("batch", "none"):
        for skips in (True, False):
            torch.manual_seed(1)
            model = UNet(2, 1, 3, channels=(8,) * 5, norm=norm, skips=skips)
            rows = signal_profile(model, x, y, make_loss())
            assert len(rows) == 4 * 5 + 4 + 1 - 2  # 2 per encoder level, 3 per decoder level, the head
            assert all(r["grad_var"] > 0 and r["pre_var"] > 0 for r in rows)
            assert all(p.grad is None for p in model.parameters())  # left as it was found
            ratio[norm, skips] = shrinkage(rows)
    assert ratio["none", False] < 1e-8 < ratio["none", True]  # vanishes without skips; skips keep it alive
    assert ratio["batch", False] > 1e-2 and ratio["batch", True] > 1e-2  # batch norm: nothing vanishes


def test_signal_profile_walks_the_same_width_stage_blocks_in_path_order():
    """A deep encoder (model.stage_blocks) has every stage convolution on its path, after its level's block."""
    from unetseg.ablation.signal import signal_profile
    from unetseg.losses import make_loss

    model = UNet(2, 1, 3, channels=(4,) * 3, stage_blocks=3, norm="none", skips=False)
    rows = signal_profile(model, torch.rand(2, 1, 16, 16), torch.randint(0, 3, (2, 16, 16)), make_loss())
    names = [r["layer"] for r in rows]
    assert len(names) == 3 * 3 * 2 + 2 * 3 + 1  # 3 blocks of 2 convolutions per level, 3 per decoder level, head
    assert names[:6] == ["encoder.0.conv1", "encoder.0.conv2", "stages.0.0.conv1", "stages.0.0.conv2",
                         "stages.0.1.conv1", "stages.0.1.conv2"]
    assert names[6] == "encoder.1.conv1" and names[-1] == "head"


def test_signal_figures_quoted_in_the_docs_are_the_committed_measurement():
    import json
    import re
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "benchmarks"))
    try:
        from signal_propagation import report
    finally:
        sys.path.pop(0)
    folder = root / "docs" / "ablation" / "signal"
    summary = json.loads((folder / "signal.json").read_text())["summary"]
    committed = (folder / "report.md").read_text()
    assert report(summary) == committed  # the report is redrawn from the committed numbers
    section = (root / "docs" / "ablation.md").read_text().split("### Vanishing gradients, measured")[1].split("###")[0]
    quoted = re.findall(r"\b\d+(?:\.\d+)?(?:e[+-]\d+)?\b", section.split("Ratios are")[1])
    figures = [q for q in quoted if "e" in q or "." in q] + ["155", "458", "370", "299", "969"]  # and whole ratios
    assert len(figures) >= 20 and all(f in section for f in figures)
    for figure in figures:
        assert figure in committed, f"{figure} is quoted in docs/ablation.md but not in {folder / 'report.md'}"


def test_quick_report_says_n_a_where_a_figure_is_undefined(quick_study):
    """Two-epoch runs collapse: the gap without collapsed runs is undefined, and the report says so (not "+nan")."""
    text = (quick_study["report"] / "report.md").read_text()
    assert "+nan" not in text and " nan" not in text
    assert "collapsed runs left out: depth" in text


def test_extra_variants_are_the_base_model_with_their_fields_and_bad_entries_are_one_line(tmp_path):
    spec = load_study("hippocampus_2d_plain")
    by_name = {v.name: v for v in build_variants(spec)}
    deep = variant_config(spec, by_name["deep_noskip"], 1)
    assert deep.model.channels == [8] * 5 and deep.model.stage_blocks == 4 and deep.model.norm == "none"
    assert by_name["deep_noskip"].skips == (False,) * 4 and by_name["deep_noskip"].reference == "deep_skip"
    assert variant_config(spec, by_name["plain5_skip"], 1).model.channels == [8, 16, 32, 64, 128]
    assert {k: v for k, v in deep.to_dict().items() if k != "model"} == {
        k: v for k, v in variant_config(spec, by_name["skip"], 1).to_dict().items() if k not in ("model", "name")} | {
        "name": "hippocampus_2d_plain-deep_noskip-seed1"}
    raw = yaml.safe_load((STUDY_DIR / "hippocampus_2d_plain.yaml").read_text())
    for entry, message in (({"name": "x", "model": {"depth": 3}}, "unknown model field"),
                           ({"name": "skip", "model": {}}, "the name is taken"),
                           ({"model": {}}, "needs 'name'")):
        raw["extra_variants"] = [entry]
        path = tmp_path / "s.yaml"
        path.write_text(yaml.safe_dump(raw))
        with pytest.raises(UnetsegError, match=message):
            load_study(str(path))


def _without(mapping: dict, *keys: str) -> dict:
    """``mapping`` less ``keys``: what two configs must share when they differ only in those."""
    return {k: v for k, v in mapping.items() if k not in keys}


def _parameter_count(model: ModelConfig) -> int:
    """Trainable parameters of a hippocampus network (1 input channel, 3 classes) built from ``model``."""
    from unetseg.checkpoint import build_model, model_arguments

    return sum(p.numel() for p in build_model(model_arguments(model, 1, 3)).parameters())


def test_sgd_twin_extends_the_plain_study_and_differs_only_by_the_optimiser():
    """hippocampus_2d_plain_sgd (issue 11 item 3) is hippocampus_2d_plain's plain arms with SGD: the same runs but
    for train.optimizer / momentum / lr, and the analyses of the cells it keeps."""
    adamw, sgd = load_study("hippocampus_2d_plain"), load_study("hippocampus_2d_plain_sgd")
    assert sgd.overrides[:len(adamw.overrides)] == adamw.overrides  # extends: overrides appended
    by_name = {v.name: v for v in build_variants(adamw)}
    kept = [v.name for v in build_variants(sgd)]
    assert kept == ["plain5_skip", "plain5_noskip", "deep_skip", "deep_noskip"] and sgd.seeds == adamw.seeds
    assert sgd.analysis.landscape_variants == adamw.analysis.landscape_variants and sgd.analysis.veit_variants == []
    for v in build_variants(sgd):
        twin, own = variant_config(adamw, by_name[v.name], 2).to_dict(), variant_config(sgd, v, 2).to_dict()
        changed = {k for k in own["train"] if own["train"][k] != twin["train"][k]}
        assert changed == {"optimizer", "momentum", "lr"} and own["train"]["optimizer"] == "sgd"
        assert _without(own, "train", "name") == _without(twin, "train", "name")


def test_controls_study_matches_parameters_and_sweeps_the_rate_per_arm():
    """hippocampus_2d_controls (issue 11 item 4): the widened no-skip network has the skip network's parameter
    count within 0.5 %, and each arm runs at three learning rates with everything else the seeds study's."""
    seeds, controls = load_study("hippocampus_2d_seeds"), load_study("hippocampus_2d_controls")
    by_name = {v.name: v for v in build_variants(controls)}

    def parameters(name: str) -> int:
        return _parameter_count(by_name[name].model)

    assert parameters("noskip") < 0.92 * parameters("skip")
    assert parameters("noskip_wide") == pytest.approx(parameters("skip"), rel=0.005)
    core = {v.name: v for v in build_variants(seeds)}
    for arm in ("skip", "noskip"):
        base = variant_config(seeds, core[arm], 1).to_dict()
        assert variant_config(controls, by_name[arm], 1).to_dict() == {**base, "name": f"hippocampus_2d_controls-{arm}-seed1"}
        for rate, lr in (("1e-3", 0.001), ("1e-2", 0.01)):
            own = variant_config(controls, by_name[f"{arm}_lr{rate}"], 1).to_dict()
            assert own["train"] == {**base["train"], "lr": lr} and own["model"] == base["model"]
    assert by_name["noskip_lr1e-2"].reference == "skip_lr1e-2"


def test_depth_study_holds_the_width_constant_and_everything_else_to_the_seeds_study():
    """hippocampus_2d_depth (issue 11 item 4, depth at constant width): every level of every network has 16 maps,
    parameters grow linearly with depth (not x4 per level), each no-skip cell is compared with its own depth's skip
    cell, and the data, budget and loss are hippocampus_2d_seeds'."""
    seeds, depth = load_study("hippocampus_2d_seeds"), load_study("hippocampus_2d_depth")
    core = variant_config(seeds, build_variants(seeds)[0], 2).to_dict()
    counts = {}
    for v in build_variants(depth):
        own = variant_config(depth, v, 2).to_dict()
        levels = int(v.name[len("const")])
        assert own["model"]["channels"] == [16] * levels and own["model"]["skips"] == v.name.endswith("_skip")
        assert _without(own, "model", "name") == _without(core, "model", "name")
        assert _without(own["model"], "channels", "skips") == _without(core["model"], "channels", "skips")
        if not v.name.endswith("_skip"):
            assert v.reference == v.name.replace("_noskip", "_skip")
        counts[v.name] = _parameter_count(v.model)
    added = [counts[f"const{d + 1}_skip"] - counts[f"const{d}_skip"] for d in (3, 4)]
    assert added[0] == added[1] and sorted(counts) == sorted(f"const{d}_{a}" for d in (3, 4, 5)
                                                             for a in ("skip", "noskip"))


def test_extends_drop_and_variant_training_fields_are_checked(tmp_path):
    """A study that extends another lays its fields over the parent's; a cycle, a dropped name the matrix lacks
    and a training field outside the optimiser are one-line errors naming the file."""
    child = tmp_path / "child.yaml"
    child.write_text("name: child\nextends: hippocampus_2d\nvariants: [skip]\noverrides: [train.lr=0.01]\n"
                     "analysis: {lesion_variants: []}\nquick: {seeds: [3]}\n")
    spec = load_study(str(child))
    parent = load_study("hippocampus_2d")
    assert spec.overrides == parent.overrides + ["train.lr=0.01"] and spec.seeds == parent.seeds
    assert spec.analysis.lesion_variants == [] and spec.analysis.landscape_points_1d == 31
    quick = load_study(str(child), quick=True)
    assert quick.seeds == [3] and quick.width == 4 and "data.max_cases=10" in quick.overrides
    cases = {"extends: loop.yaml\n": "comes back to this file",
             "extends: hippocampus_2d\ndrop_variants: [nope]\n": "drop_variants names unknown variant",
             "extends: hippocampus_2d\ndrop_variants: [skip]\n":
                 r"analysis\.landscape_variants names unknown variant\(s\) \[.skip.\]",
             "extends: hippocampus_2d\nextra_variants: [{name: x, model: {}, train: {epochs: 3}}]\n":
                 "'train' must map some of",
             "extends: [a, b]\n": "must name one study"}
    for text, message in cases.items():
        path = tmp_path / "loop.yaml"
        path.write_text("name: loop\n" + text)
        with pytest.raises(UnetsegError, match=message):
            load_study(str(path))
    path.write_text("extends: hippocampus_2d\nseeds: [4]\n")
    with pytest.raises(UnetsegError, match="needs its own 'name'"):
        load_study(str(path))


def test_veit_deletion_curve_of_a_same_width_residual_stage(tmp_path, data_root):
    """The quick plain study: a residual network with 2 blocks per level (3 same-width blocks in all), trained a
    few steps, has its same-width blocks deleted k = 0..3 at a time; k = 0 is the intact network."""
    out, report = tmp_path / "study", tmp_path / "report"
    assert main(["ablate", "--config", "hippocampus_2d_plain", "--quick", "--out", str(out), "--report-dir",
                 str(report), "--data-root", str(data_root), "--quiet"]) == 0
    curve = json.loads((report / "analysis" / "veit_deep_residual_seed0.json").read_text())
    assert curve["blocks"] == ["stages.0.0", "stages.1.0", "stages.2.0"]
    assert [p["k"] for p in curve["curve"]] == [0, 1, 2, 3]
    assert [len(p["deleted"]) for p in curve["curve"]] == [1, 2, 2, 1]  # at most veit_subsets=2 sets per k
    assert all(len(set(map(tuple, p["deleted"]))) == len(p["deleted"]) for p in curve["curve"])
    per_case = json.loads((run_dir(report, "deep_residual", 0) / "per_case.json").read_text())
    assert curve["curve"][0]["mean"] == pytest.approx(per_case["summary"]["mean_dice"], abs=1e-6, nan_ok=True)
    summary = json.loads((report / "summary.json").read_text())
    assert [p["k"] for p in summary["veit"]["deep_residual"]["curve"]] == [0, 1, 2, 3]
    text = (report / "report.md").read_text()
    assert "Deleting same-width residual blocks of `deep_residual`" in text and "figures/deletion.png" in text


def _round2_quoted(s: dict) -> list[str]:
    """What a round-2 reading quotes from its study's summary.json: every variant's mean Dice ± std over seeds, every
    comparison with its reference with seeds as the unit (t-interval), the landscape-spread pairs, the collapse
    counts and the wall time, formatted as the docs write them."""
    v = s["variants"]
    quoted = [f"`{n}` {v[n]['mean_dice']['mean']:.3f} ± {v[n]['mean_dice']['std']:.3f}" for n in v]
    for n in v:
        level = (v[n].get("vs_reference") or {}).get("mean_dice", {}).get("seed_level")
        if level:
            quoted.append(f"{_signed(level['mean'])} [{_signed(level['low'])}, {_signed(level['high'])}]")
    quoted += [f"{_signed(p['mean'])} [{_signed(p['low'])}, {_signed(p['high'])}]" for p in s["landscape_spread_pairs"]]
    (a, na), (b, nb) = s["collapse"]["with_long_skips"], s["collapse"]["without_long_skips"]
    return quoted + [f"{a} of {na} runs with long skips and {b} of {nb} without",
                     f"{s['timing']['wall_seconds'] / 60:.1f} min"]


@pytest.mark.parametrize("name, runs", [("hippocampus_2d_seeds", 32), ("hippocampus_2d_plain", 21),
                                        ("hippocampus_2d_plain_sgd", 12), ("hippocampus_2d_controls", 21),
                                        ("dsb2018_2d_seeds", 32), ("hippocampus_2d_depth", 18)])
def test_round2_study_report_is_redrawn_and_its_figures_are_quoted(name, runs, tmp_path):
    """The round-2 studies (issue 11): each committed report is what --report-only makes from its artefacts, every
    run is in it, and docs/ablation.md's reading of it quotes its figures."""
    s = assert_redrawn_from_artefacts(name, tmp_path)
    assert s["runs_found"] == s["runs_expected"] == runs and not s["quick"]
    section = (DOCS / "ablation.md").read_text().split(f"<!-- reading: {name} -->", 1)[1]
    section = " ".join(section.split("<!-- reading:", 1)[0].split())
    missing = [q for q in _round2_quoted(s) if q not in section]
    assert not missing, missing


@pytest.mark.parametrize("study", ["hippocampus_2d_controls", "hippocampus_2d"])
def test_a_study_that_repeats_runs_of_another_reproduces_them_exactly(study):
    """hippocampus_2d_controls and the rerun hippocampus_2d train `skip` and `noskip` seeds 0-2 with the configs of
    hippocampus_2d_seeds (tests above hold them equal); trained days later in other processes, every validation case
    scores the same. That is what lets `ablate --reuse` copy such runs instead of training them again."""
    for variant in ("skip", "noskip"):
        for seed in range(3):
            runs = [json.loads((run_dir(DOCS / "ablation" / name, variant, seed) / "per_case.json").read_text())
                    for name in ("hippocampus_2d_seeds", study)]
            assert runs[0]["cases"] == runs[1]["cases"] and runs[0]["summary"] == runs[1]["summary"]
    reused = [r for r in read_jsonl(DOCS / "ablation" / study / "log.jsonl") if r.get("action") == "reused"]
    assert not {(r["variant"], r["seed"]) for r in reused} & {(v, k) for v in ("skip", "noskip") for k in range(3)}


def test_claims_table_names_an_arm_and_a_traceable_interval_for_every_verdict():
    """docs/ablation.md's claim-by-claim table (issue 11 item 8): every row that says a claim is supported or
    contradicted names the study it was measured in, and every interval or figure it quotes is in that study's
    committed report (the report's hyphen-minus read as the docs' minus sign)."""
    import re

    text = (DOCS / "ablation.md").read_text().split("<!-- claims -->", 1)[1].split("<!-- reading:", 1)[0]
    rows = [line.replace("\\|", "¦").split("|")[1:-1] for line in text.splitlines()
            if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) >= 20
    figure = re.compile(r"[+−-]?\d+\.\d+(?:e[+-]\d+)? \[[+−-]?\d+\.\d+(?:e[+-]\d+)?, [+−-]?\d+\.\d+(?:e[+-]\d+)?\]")
    for claim, arm, measured, interval, verdict in (r + [""] * (5 - len(r)) for r in rows):
        studies = re.findall(r"`((?:hippocampus|dsb)[a-z0-9_]*|signal)`", arm)
        if verdict.strip().startswith(("supported", "contradicted")):
            assert studies, f"no study named for a verdict: {arm}"
        reports = " ".join((DOCS / "ablation" / s / "report.md").read_text() for s in studies).replace("-", "−")
        for quoted in figure.findall(interval):  # the report may write "mean +x, 95 % t-interval [a, b]"
            mean, bracket = quoted.replace("-", "−").split(" ", 1)
            assert mean in reports and bracket in reports, f"{quoted} is not in the report of {studies}"


def test_the_depth_trend_is_read_only_over_several_depths():
    """A study with one depth has no depth trend: its report must not say the gap grows (it did, for one depth)."""
    from unetseg.ablation.findings import _depth_findings

    rows = json.loads((DOCS / "ablation" / "dsb2018_2d" / "summary.json").read_text())["depth"]
    assert [r["depth"] for r in rows] == [3, 4, 5]
    assert "grow with depth, as the degradation story predicts" in _depth_findings(rows)[0]
    shrinking = [rows[2], rows[1], rows[0]]  # gaps +0.044, +0.016, +0.009 at made-up depths 3, 4, 5
    assert "do **not** grow" in _depth_findings([{**r, "depth": d} for r, d in zip(shrinking, (3, 4, 5))])[0]
    single = _depth_findings(rows[1:2])[0]
    assert "One depth only" in single and "grow" not in single
