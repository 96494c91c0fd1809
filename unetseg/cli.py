"""Command line: ``unetseg train | cv | predict | evaluate | quantize | download | export | ablate | models``.

Each subcommand only parses arguments and calls a plain importable function.
User errors print one ``error:`` line and exit with status 2, no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from unetseg.data.names import DATASET_NAMES, PUBLIC_DATASETS
from unetseg.errors import UnetsegError

EPILOG = "Data root: --data-root, else $UNETSEG_DATA_ROOT, else data/ in the repository."


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a U-Net from a config",
        description="Train a U-Net. A shipped config name or YAML path sets the run; flags and --set override it. "
        "The run folder gets config.yaml, split.json, metrics.jsonl, best.pt, last.pt and curves.png.",
        epilog=EPILOG,
    )
    _add_config_options(p)
    p.add_argument("--out", help="run folder (default: runs/<config name>)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its last.pt, with its saved config.yaml (no other settings)")
    p.add_argument("--init-from", metavar="CHECKPOINT",
                   help="fine-tune: start from these weights (a .pt, a run folder or a shipped model name) instead of a "
                   "random initialisation; the network, input settings and classes must match, and the run's "
                   "validation cases must not be among the ones it was trained on (sets train.init_from)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_config_options(p: argparse.ArgumentParser) -> None:
    """Options shared by train and cv: the config, its overrides, the data and the device."""
    p.add_argument("--config", help="shipped config name or YAML path (default: hippocampus_2d)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override any config field, e.g. --set train.lr=0.001 (repeatable)")
    p.add_argument("--epochs", type=int, help="number of epochs (with train --resume: extend the run to this many)")
    p.add_argument("--no-skip", action="store_true", help="switch every long skip connection off")
    p.add_argument("--seed", type=int, help="training seed (the split has its own: data.split_seed)")
    p.add_argument("--data-root", help="folder holding the data set folders")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to train (default from config: auto)")


def _add_cv(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cv",
        help="k-fold cross-validation: train every fold, score the held-out cases",
        description="Train one model per fold (data.num_folds / data.fold), each on the other folds' cases, into "
        "OUT/fold_<k>/; score each on the cases it held out; write the pooled out-of-fold per_case.csv and "
        "summary.json into OUT. Running the same command again continues (finished folds are kept, an "
        "interrupted one resumes). OUT then predicts as an ensemble of its folds: unetseg predict --checkpoint OUT.",
        epilog=EPILOG,
    )
    p.add_argument("--folds", type=int, default=5, help="number of folds (default: %(default)s)")
    _add_config_options(p)
    p.add_argument("--out", help="cross-validation folder (default: runs/cv_<config name>)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="segment images or volumes",
        description="Segment files. NIfTI in -> NIfTI label map out (same shape, affine, header); "
        "PNG/JPG/TIF in -> PNG mask out; DICOM (a .dcm file, a folder of one series' slices, or a .zip of one series) "
        "-> NIfTI label map in the series' space, named after the file, folder or zip. Folders are searched for "
        "supported files (not subfolders); a folder's DICOM files are one series. A folder or zip that holds several "
        "series (a whole study) is refused: segmenting every series would run the model on scans it was not made "
        "for; pass the series to segment.",
    )
    p.add_argument("inputs", nargs="+", help="image files, DICOM series folders or zips, or folders of images")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--largest-component", action="store_true", help="keep each class's largest connected component")
    p.add_argument("--overwrite", action="store_true", help="replace predictions already in --out (default: refuse)")
    p.add_argument("--save-probabilities", action="store_true",
                   help="also write the class probabilities: <name>_probabilities.nii.gz (4D, one volume per class) "
                   "for a volume, <name>_probabilities.npz for a 2D image")
    p.add_argument("--dicom-seg", action="store_true",
                   help="also write a DICOM Segmentation <name>_seg.dcm of each DICOM input, referencing its series "
                   "(needs pip install 'unetseg[dicom-seg]')")
    p.add_argument("--max-pixels", type=int, metavar="N",
                   help="refuse files whose header declares more than N pixels or voxels, before decoding "
                   "(default: $UNETSEG_MAX_PIXELS, else 2**27 = 134217728)")
    _add_inference_options(p)


def _add_inference_options(p: argparse.ArgumentParser) -> None:
    """Options shared by predict and evaluate: which model, TTA, device, progress."""
    p.add_argument("--checkpoint", required=True, action="append",
                   help="checkpoint .pt, run folder, or shipped model name; give it more than once for an ensemble "
                   "that averages the models' probabilities (same classes, normalisation and kind of input)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--tta", action="store_true", help="flip test-time augmentation: average the unflipped image with each mirroring the model was "
                   "trained with (stored in the checkpoint); costs one forward pass per member")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: %(default)s")
    p.add_argument("--int8", action="store_true",
                   help="run 2D networks in int8 on the CPU with the calibration beside each checkpoint (shipped "
                   "DSB models have one; make one with unetseg quantize): faster where the CPU has int8 instructions, "
                   "labels differ from float32 on a small fraction of pixels (the calibration file records both "
                   "validation Dice scores); needs --device cpu or auto on a machine without CUDA")


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="Dice and HD95 of a checkpoint on labelled data",
        description="Evaluate a checkpoint on labelled cases: writes per_case.csv and summary.json, prints the summary.",
        epilog=EPILOG,
    )
    _add_inference_options(p)
    p.add_argument("--dataset", choices=DATASET_NAMES,
                   help="data set to score on (default: the one the checkpoint was trained on)")
    p.add_argument("--data-root", help="folder holding the data set folders")
    p.add_argument("--split", default="val", choices=["val", "all"],
                   help="val: the checkpoint's validation cases; all: every labelled case (default: %(default)s)")
    p.add_argument("--out", help="output folder (default: evaluation/ inside the checkpoint's run folder; "
                   "for a shipped model, evaluation/<name> in the working directory)")
    p.add_argument("--overwrite", action="store_true", help="replace per_case.csv / summary.json already in --out "
                   "(default: refuse)")


def _add_quantize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize",
        help="calibrate int8 inference of a 2D model (predict/evaluate --int8, the viewer's int8 switch)",
        description="Calibrate int8 CPU inference of a 2D model: the activation ranges are taken on --cases of its "
        "training images, then the float32 and int8 networks segment its validation images. Writes <checkpoint "
        "stem>.int8.json beside the checkpoint (ranges, calibration cases, both validation Dice scores) and prints "
        "the scores. The file is tied to the checkpoint's bytes: retrain or replace the checkpoint, and calibrate "
        "again.",
        epilog=EPILOG,
    )
    p.add_argument("checkpoint", help="checkpoint .pt, run folder, or shipped model name")
    p.add_argument("--data-root", help="folder holding the data set the model was trained on")
    p.add_argument("--cases", type=int, default=32, help="training cases whose images set the ranges "
                   "(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="which training cases (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_download(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "download",
        help="download an original data set archive",
        description="Download and extract the original public archive with MONAI's helpers (MD5-checked where published).",
    )
    p.add_argument("dataset", choices=PUBLIC_DATASETS)
    p.add_argument("--data-root", "--root", dest="data_root",
                   help="where to extract, the same folder the other commands read (default: $UNETSEG_DATA_ROOT, "
                   "else data/); a data set already there is kept and not downloaded again")


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="ship a finished run as a named model, or write a model file (ONNX, TorchScript)",
        description="unetseg export RUN_DIR --name NAME: copy a run's best.pt (weights only) into "
        "unetseg/pretrained/NAME with its config, and evaluate it on the run's validation split into metrics.json. "
        "unetseg export --format onnx|torchscript --checkpoint CKPT --out FILE: write the network (logits out) as one "
        "model file with its preprocessing and class names in FILE.json (docs/model_export.md).",
        epilog=EPILOG,
    )
    p.add_argument("run_dir", nargs="?", help="run folder made by unetseg train (to ship it with --name)")
    p.add_argument("--name", help="model name, e.g. hippocampus_2d (letters, digits, '_', '-', '.')")
    p.add_argument("--format", choices=["onnx", "torchscript"], dest="model_format",
                   help="write a model file instead: onnx (needs pip install 'unetseg[onnx]') or torchscript")
    p.add_argument("--checkpoint", help="with --format: checkpoint .pt, run folder, or shipped model name")
    p.add_argument("--out", help="with --format: the model file to write, e.g. model.onnx")
    p.add_argument("--dest", help="with --name: the folder the model goes into, as DEST/NAME (default: the package's "
                   "unetseg/pretrained, where the viewer and --checkpoint NAME find shipped models; elsewhere, use "
                   "--checkpoint DEST/NAME)")
    p.add_argument("--overwrite", action="store_true", help="replace a shipped model of that name, or --out "
                   "(default: refuse)")
    p.add_argument("--data-root", help="folder holding the data set folders")


def _add_ablate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ablate",
        help="run a skip-connection study and write its report",
        description="Train every variant x seed of a skip-connection study (long skips on/off, per level, concat/add, "
        "residual, depth), resuming where a killed study stopped, then analyse (gradient flow, loss landscape, "
        "lesions) and write report.md with figures from the saved run folders.",
        epilog=EPILOG,
    )
    p.add_argument("--config", required=True, help="shipped study name (hippocampus_2d, dsb2018_2d) or study YAML path")
    p.add_argument("--quick", action="store_true", help="the whole pipeline on a small subset in minutes")
    p.add_argument("--out", help="study folder with checkpoints (default: runs/ablation/<name>[-quick])")
    p.add_argument("--report-dir", help="folder for artefacts and report (default: docs/ablation/<name>; "
                   "with --quick: <out>/report)")
    p.add_argument("--data-root", help="folder holding the data set folders")
    p.add_argument("--report-only", action="store_true", help="redraw figures and report from the report folder only")
    p.add_argument("--jobs", type=int, default=1, help="runs trained in parallel processes (default: %(default)s)")
    p.add_argument("--shard", metavar="K/N",
                   help="train only every N-th run, starting with the K-th, into the shared --out folder, and stop: "
                   "N machines (a scheduler's job array) share the matrix; then run the same command without --shard "
                   "to analyse and report (finished runs are kept)")
    p.add_argument("--reuse", action="append", default=[], metavar="STUDY_DIR",
                   help="another study's --out folder: a run not yet trained here whose exact training config "
                   "(data, model, budget, seed; the name aside) a finished run there has is copied, not retrained "
                   "(CPU training repeats bit for bit); logged as 'reused' with its source (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unetseg",
        description="U-Net segmentation of medical images with switchable long skip connections.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_cv(sub)
    _add_predict(sub)
    _add_evaluate(sub)
    _add_quantize(sub)
    _add_download(sub)
    _add_export(sub)
    _add_ablate(sub)
    sub.add_parser("models", help="list the trained models shipped with the package",
                   description="List the shipped models: data set, input kind, long skips, classes and validation Dice "
                   "(recorded by unetseg export in each model's metrics.json).")
    return parser


def config_from_args(args: argparse.Namespace):
    """The config that ``--config``, ``--set``, ``--epochs``, ``--no-skip``, ``--seed``, ``--device`` and (train)
    ``--init-from`` describe."""
    from unetseg.config import apply_overrides, load_config

    overrides = list(args.overrides)
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
    if args.no_skip:
        overrides.append("model.skips=false")
    if args.seed is not None:
        overrides.append(f"train.seed={args.seed}")
    if args.device:
        overrides.append(f"train.device={args.device}")
    if getattr(args, "init_from", None):
        overrides.append(f"train.init_from={json.dumps(args.init_from)}")  # quoted: a path is never read as YAML
    return apply_overrides(load_config(args.config or "hippocampus_2d"), overrides)


def run_cv(args: argparse.Namespace, argv: Sequence[str]) -> None:
    from unetseg.cv import cross_validate, format_cv_summary

    cfg = config_from_args(args)
    out = Path(args.out or f"runs/cv_{cfg.name}")
    if not args.quiet:
        print(f"cross-validation folder: {out}", flush=True)
    try:
        summary = cross_validate(cfg, args.folds, out, data_root=args.data_root, command=["unetseg", *argv],
                                 progress=not args.quiet)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"interrupted; continue with the same command: unetseg {' '.join(argv)}") from None
    print(format_cv_summary(summary))
    print(f"wrote {out / 'per_case.csv'} and {out / 'summary.json'}; predict with the fold models as an ensemble: "
          f"unetseg predict --checkpoint {out} ...")


def run_train(args: argparse.Namespace, argv: Sequence[str]) -> None:
    from unetseg.config import load_config
    from unetseg.train import extend_run, fit

    if args.resume:
        given = [flag for flag, value in (("--config", args.config), ("--set", args.overrides), ("--no-skip", args.no_skip),
                                          ("--seed", args.seed), ("--out", args.out), ("--device", args.device),
                                          ("--init-from", args.init_from))
                 if value not in (None, False, [])]
        if given:
            raise UnetsegError(
                f"--resume continues {args.resume} with its saved config.yaml, so {', '.join(given)} would be ignored; "
                "to change settings, start a new run with --config and --out (--epochs N extends the run to N epochs)"
            )
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise UnetsegError(f"{run_dir}: no config.yaml; --resume needs a run folder made by unetseg train")
        if args.epochs is not None:
            cfg = extend_run(run_dir, args.epochs)
            if not args.quiet:
                print(f"extending {run_dir} to {args.epochs} epochs: the learning-rate schedule now spans "
                      f"{args.epochs} epochs (it rises again, then decays to 0 at the new end)", flush=True)
        else:
            cfg = load_config(str(run_dir / "config.yaml"))
        out = run_dir
    else:
        cfg = config_from_args(args)
        out = Path(args.out or f"runs/{cfg.name}")
    if not args.quiet:
        print(f"{'resuming' if args.resume else 'run folder:'} {out}", flush=True)
    try:
        run = fit(cfg, out, data_root=args.data_root, resume=bool(args.resume),
                  command=["unetseg", *argv], progress=not args.quiet)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"interrupted; continue the run with: unetseg train --resume {out}") from None
    print(f"run folder: {run}")


def collect_inputs(inputs: Sequence[str]) -> list[Path]:
    """Expand folders into their supported image files (zips of DICOM series among them); a folder holding DICOM
    files is itself one input (a series, read as one volume); missing paths raise."""
    from unetseg.data.dicom import dicom_files
    from unetseg.data.io import IMAGE_2D_SUFFIXES, NIFTI_SUFFIXES

    suffixes = NIFTI_SUFFIXES + IMAGE_2D_SUFFIXES + (".zip",)  # a zip: a DICOM series, as the viewer takes it
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.name.lower().endswith(suffixes))
            series = [item] if dicom_files(item) else []
            if not found and not series:
                raise UnetsegError(f"{item}: no NIfTI, DICOM or image files directly in this folder"
                                   f"{_subfolder_hint(item, suffixes)}")
            files.extend(series + found)
        elif item.is_file():
            files.append(item)
        else:
            raise UnetsegError(f"{item}: no such file or folder")
    return files


def _subfolder_hint(folder: Path, suffixes: tuple[str, ...]) -> str:
    """How to pass what lies in ``folder``'s subfolders: the series folders of DICOM files, else the image files."""
    from itertools import islice

    from unetseg.data.dicom import is_dicom_file

    image = None
    for p in islice(folder.rglob("*"), 10_000):  # a look, not a crawl of a whole archive
        if is_dicom_file(p):
            return (f"; subfolders are not searched: pass the DICOM series folders themselves, e.g. {folder}/*/ "
                    f"(found {p.relative_to(folder)})")
        image = image or (p if p.name.lower().endswith(suffixes) else None)
    return (f"; subfolders are not searched: pass the files themselves, e.g. {folder}/*/images/*.png (found "
            f"{image.relative_to(folder)})" if image else "")


def run_predict(args: argparse.Namespace) -> None:
    from unetseg.batch import BatchOptions, BatchPrediction
    from unetseg.data.io import pixel_budget
    from unetseg.ensemble import load_predictor
    from unetseg.outputs import check_label_descriptions, check_prediction_paths

    segmenter = load_predictor(args.checkpoint, device=args.device, int8=args.int8)
    segmenter.progress = not args.quiet  # a bar over the windows of an image too big for one pass
    sources = collect_inputs(args.inputs)
    # before any prediction: nothing half-written, no input and no earlier file overwritten without --overwrite
    check_prediction_paths(sources, args.out, overwrite=args.overwrite, probabilities=args.save_probabilities,
                           dicom_seg=args.dicom_seg)
    check_label_descriptions(args.out, segmenter.class_names, overwrite=args.overwrite)
    options = BatchOptions(Path(args.out), "+".join(Path(c).name for c in args.checkpoint), tta=args.tta,
                           largest_component=args.largest_component, save_probabilities=args.save_probabilities,
                           dicom_seg=args.dicom_seg, quiet=args.quiet)
    with pixel_budget(args.max_pixels):
        BatchPrediction(segmenter, sources, options).run()


def run_quantize(args: argparse.Namespace) -> None:
    from unetseg.quantize import quantize

    record = quantize(args.checkpoint, args.data_root, args.cases, args.seed, progress=not args.quiet)
    val = record["validation"]
    print(f"validation ({val['cases']} cases): mean Dice float32 {val['mean_dice_float32']:.4f}, int8 "
          f"{val['mean_dice_int8']:.4f}; labels equal on {100 * val['label_agreement_mean']:.2f} % of pixels "
          f"(lowest case {100 * val['label_agreement_min']:.2f} %)")
    print(f"wrote {record['path']}")


def run_evaluate(args: argparse.Namespace) -> None:
    from unetseg.evaluate import EVALUATION_FILES, evaluate, format_summary

    out = Path(args.out) if args.out else default_evaluation_dir(args.checkpoint)
    earlier = [out / name for name in EVALUATION_FILES if (out / name).exists()]
    if earlier and not args.overwrite:
        raise UnetsegError(f"{earlier[0]} already exists (an earlier evaluation); pass --overwrite to replace it or "
                           "choose another --out")
    summary = evaluate(args.checkpoint, args.data_root, args.dataset, args.split, out, args.tta, args.device,
                       progress=not args.quiet, int8=args.int8)
    print(format_summary(summary))
    print(f"wrote {' and '.join(str(out / name) for name in EVALUATION_FILES)}")


def default_evaluation_dir(checkpoints: list[str]) -> Path:
    """``RUN/evaluation`` for a run folder or a checkpoint file inside one; ``evaluation/<name>`` for a shipped model;
    ``evaluation/<name1>+<name2>...`` for an ensemble."""
    if len(checkpoints) > 1:
        return Path("evaluation") / "+".join(Path(c).name for c in checkpoints)
    path = Path(checkpoints[0])
    if path.is_dir():
        return path / "evaluation"
    if path.is_file():
        return path.parent / "evaluation"
    return Path("evaluation") / path.name


def run_download(args: argparse.Namespace) -> None:
    from unetseg.data.download import download

    from unetseg.data.datasets import resolve_data_root

    print(f"data set ready at {download(args.dataset, resolve_data_root(args.data_root))}")


def run_export(args: argparse.Namespace) -> None:
    from unetseg.evaluate import format_summary
    from unetseg.export import export_run

    if args.model_format:
        from unetseg.model_export import export_model

        if args.checkpoint is None or args.out is None or args.run_dir is not None or args.name is not None:
            raise UnetsegError("--format needs --checkpoint CKPT and --out FILE (not a run folder or --name), e.g. "
                               "unetseg export --format onnx --checkpoint hippocampus_2d --out model.onnx")
        out = export_model(args.checkpoint, args.out, args.model_format, overwrite=args.overwrite)
        print(f"{args.model_format} model written to {out} (logits; preprocessing and classes in {out}.json)")
        return
    if args.run_dir is None or args.name is None or args.checkpoint is not None or args.out is not None or (
            args.dest is not None and args.model_format):
        raise UnetsegError("export needs RUN_DIR and --name NAME to ship a run (e.g. unetseg export runs/hippocampus_2d "
                           "--name my_model), or --format onnx|torchscript --checkpoint CKPT --out FILE for a model file")
    target = export_run(args.run_dir, args.name, args.data_root, overwrite=args.overwrite,
                        **({"dest": args.dest} if args.dest else {}))
    summary = json.loads((target / "metrics.json").read_text())
    print(format_summary(summary))
    print(f"shipped model written to {target}")


def _read_mapping(path: Path, parse) -> dict:
    """A JSON/YAML file's mapping; {} when it is missing, unreadable or not a mapping (a listing must not stop)."""
    try:
        value = parse(path.read_text()) if path.is_file() else {}
    except Exception:  # noqa: BLE001 - damaged metadata shows as "?" / "not recorded", never a traceback
        return {}
    return value if isinstance(value, dict) else {}


def run_models() -> None:
    """One line per shipped model from its config.yaml and metrics.json (no torch import: instant)."""
    import yaml

    folder = Path(__file__).parent / "pretrained"
    names = sorted(p.name for p in folder.iterdir() if (p / "model.pt").is_file() and not p.name.startswith(".")) \
        if folder.is_dir() else []
    print(f"{'model':<24} {'data set':<12} {'input':<16} {'long skips':<10} {'foreground classes':<30} validation Dice (with TTA)")
    for name in names:
        cfg, metrics = _read_mapping(folder / name / "config.yaml", yaml.safe_load), _read_mapping(folder / name / "metrics.json", json.loads)
        model, data = (v if isinstance(v, dict) else {} for v in (cfg.get("model"), cfg.get("data")))
        dims = model.get("spatial_dims", 2)
        kind = "volume, 3D net" if dims == 3 else ("volume, 2D net" if data.get("dataset") == "hippocampus" else "2D image")
        skips = model.get("skips", True)
        skips = ("on" if skips else "off") if isinstance(skips, bool) else "".join("1" if s else "0" for s in skips)
        classes = ", ".join(metrics.get("classes", {}) if isinstance(metrics.get("classes"), dict) else []) or "?"
        dice = metrics.get("mean_dice")
        tta = metrics.get("with_tta").get("mean_dice") if isinstance(metrics.get("with_tta"), dict) else None
        number = (int, float)
        score = f"{dice:.4f}" + (f" ({tta:.4f})" if isinstance(tta, number) else "") if isinstance(dice, number) \
            else "not recorded"
        print(f"{name:<24} {data.get('dataset', '?'):<12} {kind:<16} {skips:<10} {classes:<30} {score}")
    print("Use a name with --checkpoint (predict, evaluate) or pick it in the viewer.")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            run_train(args, argv)
        elif args.command == "cv":
            run_cv(args, argv)
        elif args.command == "predict":
            run_predict(args)
        elif args.command == "evaluate":
            run_evaluate(args)
        elif args.command == "download":
            run_download(args)
        elif args.command == "export":
            run_export(args)
        elif args.command == "models":
            run_models()
        elif args.command == "quantize":
            run_quantize(args)
        elif args.command == "ablate":
            from unetseg.ablation.runner import ablate

            report = ablate(args.config, args.quick, args.out, args.report_dir, args.data_root,
                            args.report_only, args.jobs, progress=not args.quiet, command=["unetseg", *argv],
                            shard=args.shard, reuse=args.reuse)
            if report is None:
                print(f"shard {args.shard} trained; once every shard is done, run the same command without --shard "
                      "to analyse and report")
            else:
                print(f"report: {report}")
    except UnetsegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into a reader that stopped (`unetseg models | head`): end quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:  # a folder that cannot be made, a read-only or full disk: the system's reason, one line
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}; check the path exists, is writable and the disk has room",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(str(exc) or "interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
