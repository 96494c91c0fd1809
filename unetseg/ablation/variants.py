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
``model.*`` fields and ``train.seed`` differ, except where an ``extra_variants``
entry sets optimiser fields (``train: {lr: ...}``, a learning-rate sweep).
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, replace
from typing import Any

from unetseg.ablation.study import StudySpec
from unetseg.config import Config, ModelConfig, apply_overrides, config_from_dict, load_config
from unetseg.errors import UnetsegError
from unetseg.model.unet import resolve_skips


@dataclass(frozen=True)
class Variant:
    """One cell of the matrix: a network and what it is compared with.

    Attributes:
        name: folder and table name.
        model: the whole network of the cell: the study's base model with its channels, long skips, merge and
            residual blocks set.
        reference: the variant it is compared with, case by case (``None`` for ``skip``).
        description: one line for the report.
        train: optimiser fields this cell sets over the study's budget (only extra variants: a learning-rate
            sweep, say), as ``(field, value)`` pairs.
    """

    name: str
    model: ModelConfig
    reference: str | None
    description: str
    train: tuple[tuple[str, Any], ...] = ()

    @property
    def depth(self) -> int:
        """Levels including the bottleneck."""
        return len(self.model.channels)

    @property
    def skips(self) -> tuple[bool, ...]:
        """Long-skip flags per decoder level, finest first."""
        return tuple(resolve_skips(self.model.skips, self.depth - 1))


def channels_for_depth(width: int, depth: int) -> list[int]:
    """Feature maps per level: ``width`` doubled at each coarser level, ``depth`` levels."""
    return [width * 2**i for i in range(depth)]


def _network(base: ModelConfig, depth: int, width: int, skips: bool | list[bool], merge: str = "concat",
             residual: bool = False) -> ModelConfig:
    """``base`` with ``depth`` levels of :func:`channels_for_depth` maps and the given long skips, merge and blocks."""
    return replace(base, channels=channels_for_depth(width, depth), skips=skips, merge=merge, residual=residual)


def depth_names(spec: StudySpec, depth: int) -> tuple[str, str]:
    """Names of the (with skips, without skips) variants at ``depth``."""
    return ("skip", "noskip") if depth == spec.depth else (f"depth{depth}_skip", f"depth{depth}_noskip")


def build_variants(spec: StudySpec, base: ModelConfig | None = None) -> list[Variant]:
    """The full matrix for ``spec`` (or the subset ``spec.variants`` names), in report order.

    ``base`` is the model every variant starts from (default: the model of :func:`base_config`)."""
    base = base_config(spec).model if base is None else base
    d, w = spec.depth, spec.width
    levels = d - 1
    out = [
        Variant("skip", _network(base, d, w, True), None, f"all {levels} long skips (concat), depth {d}"),
        Variant("noskip", _network(base, d, w, False), "skip", "no long skips"),
    ]
    for level in range(levels):
        flags = [i != level for i in range(levels)]
        out.append(Variant(f"skip_off_L{level}", _network(base, d, w, flags), "skip",
                           f"long skip of level {level} off ({'finest' if level == 0 else 'coarser'}; "
                           f"{channels_for_depth(w, d)[level]} maps)"))
    out += [
        Variant("add", _network(base, d, w, True, merge="add"), "skip", "long skips merged by addition"),
        Variant("residual", _network(base, d, w, True, residual=True), "skip", "long skips + residual short skips"),
        Variant("residual_noskip", _network(base, d, w, False, residual=True), "residual",
                "residual short skips, no long skips"),
    ]
    for depth in spec.depths:
        if depth == d:
            continue
        with_name, without_name = depth_names(spec, depth)
        out += [
            Variant(with_name, _network(base, depth, w, True), "skip", f"all long skips, depth {depth}"),
            Variant(without_name, _network(base, depth, w, False), with_name, f"no long skips, depth {depth}"),
        ]
    if spec.variants is not None:
        known = {v.name for v in out} | {e.get("name") for e in spec.extra_variants}
        unknown = set(spec.variants) - known
        if unknown:
            raise UnetsegError(f"study {spec.name}: unknown variant(s) {sorted(unknown)}; matrix has {sorted(known)}")
        out = [v for v in out if v.name in spec.variants]
    out += [_extra_variant(spec, base, e, {v.name for v in out}) for e in spec.extra_variants]
    return [v for v in out if v.name not in spec.drop_variants]


# Training fields an extra variant may set: the optimiser, not the budget (epochs, steps, batch) or the data.
VARIANT_TRAIN_FIELDS = frozenset({"lr", "optimizer", "momentum", "weight_decay", "warmup_steps"})


def _extra_variant(spec: StudySpec, base: ModelConfig, entry: dict[str, Any], taken: set[str]) -> Variant:
    """One of ``spec.extra_variants``: the base model with the entry's ``model`` fields set."""
    where = f"study {spec.name}: extra_variants entry {entry.get('name', entry)!r}"
    unknown_keys = set(entry) - {"name", "model", "reference", "description", "train"}
    if "name" not in entry or not isinstance(entry.get("model"), dict) or unknown_keys:
        raise UnetsegError(f"{where}: needs 'name' and a 'model' mapping (and optionally 'reference', 'description', "
                           "'train')" + (f"; unknown key(s) {sorted(unknown_keys)}" if unknown_keys else ""))
    train = entry.get("train", {})
    if not isinstance(train, dict) or set(train) - VARIANT_TRAIN_FIELDS:
        raise UnetsegError(f"{where}: 'train' must map some of {sorted(VARIANT_TRAIN_FIELDS)} to values (the "
                           "budget, data and seed stay the study's)")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    if set(entry["model"]) - fields or entry["name"] in taken:
        raise UnetsegError(f"{where}: " + ("the name is taken" if entry["name"] in taken else
                           f"unknown model field(s) {sorted(set(entry['model']) - fields)}; valid: {sorted(fields)}"))
    model = replace(base, **{"channels": channels_for_depth(spec.width, spec.depth), **entry["model"]})
    description = entry.get("description", str({**entry["model"], **train}))
    return Variant(entry["name"], model, entry.get("reference"), description, tuple(sorted(train.items())))


def check_variant_names(spec: StudySpec, source: str) -> None:
    """Raise :class:`UnetsegError` (naming ``source`` and the field) when ``variants``, ``drop_variants`` or an
    analysis's variant list names a variant the study's matrix does not have (analyses: or drops), so a typo stops
    the study before its first run."""
    matrix = {v.name for v in build_variants(replace(spec, variants=None, drop_variants=[]), ModelConfig())}
    kept = matrix - set(spec.drop_variants)
    fields = {"variants": (spec.variants or [], matrix), "drop_variants": (spec.drop_variants, matrix)}
    fields.update({f"analysis.{k}": (getattr(spec.analysis, k), kept)
                   for k in ("landscape_variants", "lesion_variants", "qualitative_variants", "veit_variants")})
    for name, (listed, known) in fields.items():
        unknown = sorted(set(listed) - known)
        if unknown:
            raise UnetsegError(f"{source}: {name} names unknown variant(s) {unknown}; the matrix has {sorted(known)}")


def base_config(spec: StudySpec) -> Config:
    """The study's training config with its shared budget applied (no variant, seed 0)."""
    return apply_overrides(load_config(spec.config), list(spec.overrides))


def variant_config(spec: StudySpec, variant: Variant, seed: int) -> Config:
    """The resolved config of one run: base config + budget, with the variant's network, optimiser fields and the
    seed (checked like any config)."""
    raw = base_config(spec).to_dict()
    raw["model"] = asdict(variant.model)
    raw["train"].update(dict(variant.train), seed=seed)
    cfg = config_from_dict(raw, source=f"study {spec.name}, variant {variant.name}")
    cfg.name = f"{spec.name}-{variant.name}-seed{seed}"
    return cfg
