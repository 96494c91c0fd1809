"""Study specifications: which training config, budget, seeds and analyses a skip-connection study uses.

A study YAML (shipped: ``unetseg/ablation/<name>.yaml``) names a training config
(``unetseg/configs``), the budget every run shares (``section.field=value``
overrides), the seeds, the depths, and the analysis settings. Its ``quick``
section holds the changes that make the pipeline run in minutes. A study may
``extends: <study>``: it starts from that study's fields, by the rules of
:func:`merge_study_fields`, so a twin study (say, the same arms under SGD) is a
few lines, not a copy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from unetseg.config import (
    apply_overrides,
    check_fields,
    check_known_fields,
    load_config,
    mapping_field,
    read_named_yaml,
)
from unetseg.errors import UnetsegError

STUDY_DIR = Path(__file__).parent


@dataclass
class AnalysisSpec:
    """What is computed from trained runs after training (each once, then cached)."""

    landscape_variants: list[str] = field(default_factory=lambda: ["skip", "noskip"])  # runs sliced (seed below)
    landscape_seed: int = 0
    landscape_points_1d: int = 41  # points along one filter-normalised direction
    landscape_points_2d: int = 21  # points per axis of the 2D grid
    landscape_span: float = 1.0  # the slices cover alpha in [-span, span]
    landscape_samples: int = 64  # fixed training patches the loss is averaged over
    landscape_batch_size: int = 32
    landscape_spread_seeds: list[int] = field(default_factory=list)  # runs also sliced along several directions
    landscape_directions: int = 3  # random directions per run of landscape_spread_seeds (1D slices)
    lesion_variants: list[str] = field(default_factory=lambda: ["skip", "residual"])  # every seed of these
    qualitative_variants: list[str] = field(default_factory=lambda: ["skip", "noskip"])  # seed 0 of these
    qualitative_cases: int = 4  # first validation cases shown
    qualitative_crop: int = 256  # 2D images larger than this are centre-cropped to it for the figure
    veit_variants: list[str] = field(default_factory=list)  # every seed: Dice against same-width blocks deleted
    veit_subsets: int = 10  # at most this many sets of k deleted blocks per k
    gradient_pairs: list[list[str]] = field(
        default_factory=lambda: [["skip", "noskip"], ["residual", "residual_noskip"]]
    )  # (with, without) pairs drawn in the gradient-flow figure; the deepest depth pair is added


@dataclass
class StudySpec:
    """One study: a base training config, a shared budget, the variant matrix's knobs and the analyses.

    Attributes:
        name: study name (folder names and titles).
        config: shipped training config name or YAML path the runs start from.
        overrides: ``section.field=value`` budget shared by every run (epochs,
            steps per epoch, cases, ...); variants only add model fields and the seed.
        seeds: training seeds; every variant runs each.
        width: feature maps at the finest level; each coarser level doubles them.
        depth: levels (bottleneck included) of the reference network.
        depths: levels of the depth sweep, each with and without long skips.
        variants: names to run (``None``: the whole matrix of :func:`build_variants`).
        extra_variants: more cells, each ``{name, model: {ModelConfig field: value}, reference, description}``
            (``reference`` and ``description`` optional): the base model with those fields set (channels default
            to the study's width and depth). Listed cells run whether or not ``variants`` names them.
        drop_variants: cells of the matrix or of ``extra_variants`` left out (a study that extends another
            runs a subset of its cells).
        analysis: see :class:`AnalysisSpec`.
        quick: whether the ``quick`` section was applied.
    """

    name: str
    config: str
    overrides: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    width: int = 8
    depth: int = 4
    depths: list[int] = field(default_factory=lambda: [3, 4, 5])
    variants: list[str] | None = None
    extra_variants: list[dict] = field(default_factory=list)
    drop_variants: list[str] = field(default_factory=list)
    analysis: AnalysisSpec = field(default_factory=AnalysisSpec)
    quick: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Sign rules of the numeric fields, as unetseg.config.check_fields takes them; depths also need 2 levels (below).
STUDY_RULES = {"positive": {"width", "depth", "depths"}, "non_negative": {"seeds"}, "seeds": {"seeds"}}
ANALYSIS_RULES = {"positive": {"landscape_points_1d", "landscape_points_2d", "landscape_span", "landscape_samples",
                               "landscape_batch_size", "qualitative_crop", "landscape_directions", "veit_subsets"},
                  "non_negative": {"landscape_seed", "qualitative_cases", "landscape_spread_seeds"},
                  "seeds": {"landscape_seed", "landscape_spread_seeds"}}


def _study_section(raw: dict[str, Any], source: str, prefix: str = "") -> tuple[dict[str, Any], dict[str, Any]]:
    """The study fields of ``raw`` (the top level, or its ``quick`` section with ``prefix`` ``"quick."``) and their
    ``analysis`` mapping, each checked for unknown names, types and signs."""
    fields = dict(raw)
    analysis = mapping_field(fields, "analysis", source, prefix)
    fields.pop("analysis", None)
    check_known_fields(fields, StudySpec, source, f" in '{prefix.rstrip('.')}'" if prefix else "")
    check_fields(StudySpec, fields, source, prefix, **STUDY_RULES)
    check_known_fields(analysis, AnalysisSpec, source, f" in '{prefix}analysis'")
    check_fields(AnalysisSpec, analysis, source, f"{prefix}analysis.", **ANALYSIS_RULES)
    return fields, analysis


def study_from_dict(raw: dict[str, Any], quick: bool = False, source: str = "study") -> StudySpec:
    """Build a :class:`StudySpec`; with ``quick`` the ``quick`` section's fields replace or extend the main ones.

    In the ``quick`` section, ``overrides`` are appended to the main overrides
    (later ones win) and ``analysis`` fields replace single analysis fields;
    every other field replaces the main one. Every field's type and sign is
    checked, in both sections, and the training config with the overrides
    resolved: a mistake is one :class:`UnetsegError` naming ``source`` and the field.
    """
    quick_raw = mapping_field(raw, "quick", source)
    raw, analysis_raw = _study_section({k: v for k, v in raw.items() if k != "quick"}, source)
    quick_raw, quick_analysis = _study_section({k: v for k, v in quick_raw.items() if k != "quick"}, source, "quick.")
    if quick:
        raw["overrides"] = list(raw.get("overrides", [])) + list(quick_raw.pop("overrides", []))
        analysis_raw.update(quick_analysis)
        raw.update(quick_raw)
    if "name" not in raw or "config" not in raw:
        raise UnetsegError(f"{source}: a study needs 'name' and 'config' (the training config it starts from)")
    spec = StudySpec(**{**raw, "analysis": AnalysisSpec(**analysis_raw), "quick": quick})
    if not spec.seeds:
        raise UnetsegError(f"{source}: seeds=[] needs at least one seed")
    for name, depths in (("depth", [spec.depth]), ("depths", spec.depths)):
        if min(depths, default=2) < 2:
            raise UnetsegError(f"{source}: {name}={getattr(spec, name)} must be at least 2 levels (the bottleneck and "
                               "one with a long skip)")
    if spec.variants == [] and not spec.extra_variants:
        raise UnetsegError(f"{source}: variants=[] names no run; leave it out to run the whole matrix")
    try:
        base = load_config(spec.config)
    except UnetsegError as exc:
        raise UnetsegError(f"{source}: {exc}") from None
    apply_overrides(base, spec.overrides, source=f"{source}: overrides")
    return spec


def merge_study_fields(parent: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """``child``'s study fields laid over ``parent``'s: ``overrides`` are appended (later ones win), ``analysis``
    and ``quick`` are merged field by field (a ``quick`` section by these same rules), every other field replaces
    the parent's."""
    merged = dict(parent)
    for key, value in child.items():
        if key == "overrides":
            merged[key] = list(parent.get(key) or []) + list(value or [])
        elif key == "analysis" and isinstance(value, dict) and isinstance(parent.get(key), dict):
            merged[key] = {**parent[key], **value}
        elif key == "quick" and isinstance(value, dict) and isinstance(parent.get(key), dict):
            merged[key] = merge_study_fields(parent[key], value)
        else:
            merged[key] = value
    return merged


def read_study_fields(name_or_path: str, children: tuple[Path, ...] = ()) -> tuple[dict[str, Any], Path]:
    """The raw fields of a study YAML with its ``extends`` chain resolved (shipped names or paths), and its path.

    A chain that comes back to a file it started from, or an ``extends`` that is not one study name, is a
    :class:`UnetsegError` naming the file."""
    raw, path = read_named_yaml(name_or_path, STUDY_DIR, "study")
    if "extends" not in raw:
        return raw, path
    parent_name = raw.pop("extends")
    if not isinstance(parent_name, str) or not parent_name:
        raise UnetsegError(f"{path}: extends={parent_name!r} must name one study (a shipped name or a YAML path)")
    if path.resolve() in children:
        raise UnetsegError(f"{path}: 'extends' comes back to this file; a study cannot extend itself")
    if "name" not in raw:  # else it would share the folders of the study it extends
        raise UnetsegError(f"{path}: a study that extends {parent_name!r} needs its own 'name'")
    beside = path.parent / parent_name  # a YAML path is read beside the file that names it, where there is one
    parent_ref = str(beside) if Path(parent_name).suffix and beside.is_file() else parent_name
    parent, _ = read_study_fields(parent_ref, children + (path.resolve(),))
    return merge_study_fields(parent, raw), path


def resolved_study(raw: dict[str, Any]) -> StudySpec:
    """Rebuild a :class:`StudySpec` from :meth:`StudySpec.to_dict` output (a saved ``study.yaml``)."""
    return StudySpec(**{**raw, "analysis": AnalysisSpec(**raw["analysis"])})


def load_study(name_or_path: str, quick: bool = False) -> StudySpec:
    """Load a shipped study by name (``hippocampus_2d``) or a study YAML by path."""
    from unetseg.ablation.variants import check_variant_names  # variants builds on this module's StudySpec

    raw, path = read_study_fields(name_or_path)
    spec = study_from_dict(raw, quick=quick, source=str(path))
    check_variant_names(spec, str(path))
    return spec


def save_study(spec: StudySpec, path: str | Path) -> None:
    """Write the resolved study (after ``quick``) as YAML."""
    Path(path).write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
