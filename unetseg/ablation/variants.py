"""The study matrix: each variant is the study's base config with a few model fields flipped.

Variants (depth ``D`` = ``spec.depth``, levels finest first):

- ``skip``: every long skip, concat merge, no residual blocks (the reference);
- ``noskip``: no long skips;
- ``skip_off_L<i>``: only level ``i``'s long skip off (per-level ablation);
- ``add``: long skips merged by addition instead of concatenation;
- ``residual`` / ``residual_noskip``: short residual skips in every block, with / without long skips;
- ``depth<d>_skip`` / ``depth<d>_noskip`` for each ``d`` in ``spec.depths``
  (at ``d == D`` these are ``skip`` and ``noskip`` themselves).

Every run of a study shares data, split, schedule and step budget; only
``model.*`` fields and ``train.seed`` differ.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from unetseg.ablation.study import StudySpec
from unetseg.config import Config, apply_overrides, load_config
from unetseg.errors import UnetsegError


@dataclass(frozen=True)
class Variant:
    """One cell of the matrix.

    Attributes:
        name: folder and table name.
        overrides: ``model.*`` overrides on top of the study's base config.
        reference: the variant it is compared with, case by case (``None`` for ``skip``).
        description: one line for the report.
        depth: levels including the bottleneck.
        skips: long-skip flags per decoder level, finest first.
    """

    name: str
    overrides: tuple[str, ...]
    reference: str | None
    description: str
    depth: int
    skips: tuple[bool, ...]


def channels_for_depth(width: int, depth: int) -> list[int]:
    """Feature maps per level: ``width`` doubled at each coarser level, ``depth`` levels."""
    return [width * 2**i for i in range(depth)]


def _model(depth: int, width: int, skips: bool | list[bool], merge: str = "concat", residual: bool = False) -> tuple[str, ...]:
    flags = str(skips).lower() if isinstance(skips, bool) else "[" + ", ".join(str(s).lower() for s in skips) + "]"
    return (
        f"model.channels={channels_for_depth(width, depth)}",
        f"model.skips={flags}",
        f"model.merge={merge}",
        f"model.residual={str(residual).lower()}",
    )


def depth_names(spec: StudySpec, depth: int) -> tuple[str, str]:
    """Names of the (with skips, without skips) variants at ``depth``."""
    return ("skip", "noskip") if depth == spec.depth else (f"depth{depth}_skip", f"depth{depth}_noskip")


def build_variants(spec: StudySpec) -> list[Variant]:
    """The full matrix for ``spec`` (or the subset ``spec.variants`` names), in report order."""
    d, w = spec.depth, spec.width
    levels = d - 1
    out = [
        Variant("skip", _model(d, w, True), None, f"all {levels} long skips (concat), depth {d}", d, (True,) * levels),
        Variant("noskip", _model(d, w, False), "skip", "no long skips", d, (False,) * levels),
    ]
    for level in range(levels):
        flags = [i != level for i in range(levels)]
        out.append(Variant(f"skip_off_L{level}", _model(d, w, flags), "skip",
                           f"long skip of level {level} off ({'finest' if level == 0 else 'coarser'}; "
                           f"{channels_for_depth(w, d)[level]} maps)", d, tuple(flags)))
    out += [
        Variant("add", _model(d, w, True, merge="add"), "skip", "long skips merged by addition", d, (True,) * levels),
        Variant("residual", _model(d, w, True, residual=True), "skip", "long skips + residual short skips", d, (True,) * levels),
        Variant("residual_noskip", _model(d, w, False, residual=True), "residual",
                "residual short skips, no long skips", d, (False,) * levels),
    ]
    for depth in spec.depths:
        if depth == d:
            continue
        with_name, without_name = depth_names(spec, depth)
        out += [
            Variant(with_name, _model(depth, w, True), "skip", f"all long skips, depth {depth}", depth, (True,) * (depth - 1)),
            Variant(without_name, _model(depth, w, False), with_name, f"no long skips, depth {depth}", depth,
                    (False,) * (depth - 1)),
        ]
    if spec.variants is not None:
        known = {v.name for v in out}
        unknown = set(spec.variants) - known
        if unknown:
            raise UnetsegError(f"study {spec.name}: unknown variant(s) {sorted(unknown)}; matrix has {sorted(known)}")
        out = [v for v in out if v.name in spec.variants]
    return out


def check_variant_names(spec: StudySpec, source: str) -> None:
    """Raise :class:`UnetsegError` (naming ``source`` and the field) when ``variants`` or an analysis's variant list
    names a variant the study's matrix does not have, so a typo stops the study before its first run."""
    known = {v.name for v in build_variants(replace(spec, variants=None))}
    fields = {"variants": spec.variants or []}
    fields.update({f"analysis.{k}": getattr(spec.analysis, k)
                   for k in ("landscape_variants", "lesion_variants", "qualitative_variants")})
    for name, listed in fields.items():
        unknown = sorted(set(listed) - known)
        if unknown:
            raise UnetsegError(f"{source}: {name} names unknown variant(s) {unknown}; the matrix has {sorted(known)}")


def base_config(spec: StudySpec) -> Config:
    """The study's training config with its shared budget applied (no variant, seed 0)."""
    return apply_overrides(load_config(spec.config), list(spec.overrides))


def variant_config(spec: StudySpec, variant: Variant, seed: int) -> Config:
    """The resolved config of one run: base config + budget + the variant's model fields + the seed."""
    cfg = apply_overrides(base_config(spec), [*variant.overrides, f"train.seed={seed}"])
    cfg.name = f"{spec.name}-{variant.name}-seed{seed}"
    return cfg
