"""The import rules of shared/STYLE.md ("A layout that keeps the arrows pointing one way"), enforced.

Every module of ``unetseg/`` and every app in ``apps/`` is parsed with ``ast``; all its imports count, those
inside functions too (a lazy import is still a dependency). The rules:

- ``unetseg.model`` imports nothing of the package but itself (torch only; it never reads config files).
- ``unetseg.data`` imports only itself, ``unetseg.errors``, ``unetseg.limits``, ``unetseg.progress``,
  ``unetseg.runlog`` (leaves, like errors) and ``unetseg.config``: the
  augmentation is built from the typed :class:`~unetseg.config.AugmentConfig` (``data.transforms``), which is
  the config layer's job to define, so config sits below data, not above it as STYLE.md's list suggests.
- ``unetseg.train`` does not import ``unetseg.infer``: it builds and saves networks through
  ``unetseg.checkpoint`` and validates through ``unetseg.evaluate``.
- Nothing in ``unetseg/`` imports streamlit.
- ``apps/`` import only the package's public face (:data:`PUBLIC_FACE`).

A violation that is someone else's to fix is listed, with its reason, in :data:`KNOWN_VIOLATIONS`; an entry that
no longer occurs fails too, so the list only shrinks.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "unetseg"

# What apps may import: inference (Segmenter, model cards, shipped models), the checkpoint contract, what the
# viewer draws (display) and reads from uploads (uploads), which model serves an input (choice), and the errors.
PUBLIC_FACE = frozenset({
    "unetseg", "unetseg.infer", "unetseg.checkpoint", "unetseg.display", "unetseg.uploads", "unetseg.errors",
    "unetseg.choice",
})

# (importing file or module, imported module, imported name) -> why it is allowed for now.
KNOWN_VIOLATIONS: dict[tuple[str, str, str | None], str] = {}


@dataclass(frozen=True)
class Import:
    """One imported name: ``import a.b`` -> module ``a.b``, name None; ``from a import b`` -> module ``a``, name
    ``b``, or module ``a.b`` (name None) when ``a.b`` is a module of the package."""

    importer: str  # the importing module (unetseg.x.y) or app file (apps/x.py)
    line: int
    module: str
    name: str | None

    def __str__(self) -> str:
        return f"{self.importer}:{self.line} imports {self.module}" + (f".{self.name}" if self.name else "")


def module_name(path: Path, root: Path) -> str:
    """``root/unetseg/data/io.py`` -> ``unetseg.data.io``; a package's ``__init__.py`` -> the package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package_module(name: str, root: Path) -> bool:
    """Whether ``name`` (``unetseg.display``) is a module or package under ``root``."""
    base = root.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imports_in(path: Path, importer: str, root: Path, is_package: bool = False) -> list[Import]:
    """Every import in ``path`` (at any depth: in functions, classes, ``if`` and ``try`` blocks), with relative
    imports made absolute (``importer`` is the module's dotted name; ``is_package`` for an ``__init__.py``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [Import(importer, node.lineno, alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = importer.split(".") if is_package else importer.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if is_package_module(sub, root):
                    found.append(Import(importer, node.lineno, sub, None))
                else:
                    found.append(Import(importer, node.lineno, base, alias.name))
    return found


def package_imports(root: Path = REPO) -> list[Import]:
    """The imports of every module of ``root/unetseg``."""
    found = []
    for path in sorted((root / PACKAGE).rglob("*.py")):
        found += imports_in(path, module_name(path, root), root, is_package=path.name == "__init__.py")
    return found


def app_imports(root: Path = REPO) -> list[Import]:
    """The imports of every app in ``root/apps`` (the importer is the file, ``apps/viewer.py``)."""
    return [imp for path in sorted((root / "apps").glob("*.py"))
            for imp in imports_in(path, path.relative_to(root).as_posix(), root)]


def within(module: str, prefixes: Iterable[str]) -> bool:
    """Whether ``module`` is one of ``prefixes`` or inside one of them."""
    return any(module == p or module.startswith(p + ".") for p in prefixes)


@dataclass(frozen=True)
class Rule:
    """Imports by modules under ``importers`` that ``allowed`` refuses are violations."""

    text: str
    importers: str  # a module prefix (unetseg.data) or a folder of apps (apps/)
    allowed: Callable[[Import], bool]

    def applies(self, imp: Import) -> bool:
        return imp.importer.startswith(self.importers) if self.importers.endswith("/") else within(
            imp.importer, [self.importers])

    def violations(self, imports: Iterable[Import]) -> list[Import]:
        return [imp for imp in imports if self.applies(imp) and not self.allowed(imp)]


def only(*prefixes: str) -> Callable[[Import], bool]:
    """Allows imports from outside the package, and from the package only under ``prefixes``."""
    return lambda imp: not within(imp.module, [PACKAGE]) or within(imp.module, prefixes)


def never(*prefixes: str) -> Callable[[Import], bool]:
    return lambda imp: not within(imp.module, prefixes)


RULES = [
    Rule("the model imports nothing else of unetseg", "unetseg.model", only("unetseg.model")),
    Rule("data imports only data, errors, limits, progress, runlog and config", "unetseg.data",
         only("unetseg.data", "unetseg.errors", "unetseg.limits", "unetseg.progress", "unetseg.runlog",
              "unetseg.config")),
    Rule("training does not import inference", "unetseg.train", never("unetseg.infer")),
    Rule("unetseg never imports streamlit", "unetseg", never("streamlit")),
    Rule("apps import only the public face", "apps/",
         lambda imp: not within(imp.module, [PACKAGE]) or imp.module in PUBLIC_FACE),
]


def unexplained(violations: Iterable[Import]) -> list[Import]:
    return [v for v in violations if (v.importer, v.module, v.name) not in KNOWN_VIOLATIONS]


def assert_holds(rule: Rule, imports: list[Import]) -> None:
    found = unexplained(rule.violations(imports))
    assert not found, f"{rule.text}, but:\n" + "\n".join(map(str, found))


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.text)
def test_import_rule_holds(rule):
    assert_holds(rule, package_imports() + app_imports())


def test_every_known_violation_still_occurs():
    """A fixed violation leaves the list (so it cannot come back unnoticed)."""
    every = {(v.importer, v.module, v.name) for rule in RULES for v in rule.violations(package_imports() + app_imports())}
    stale = sorted(set(KNOWN_VIOLATIONS) - every, key=str)
    assert not stale, f"no longer violated; remove from KNOWN_VIOLATIONS in {Path(__file__).name}: {stale}"


def test_the_scan_sees_the_whole_package():
    modules = {imp.importer for imp in package_imports()}
    assert {"unetseg.train", "unetseg.infer", "unetseg.checkpoint", "unetseg.model.unet", "unetseg.data.io",
            "unetseg.ablation.runner"} <= modules
    assert {imp.importer for imp in app_imports()} >= {"apps/viewer.py"}


# --------------------------------------------------------------------------- the checker on synthetic code
def make_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


SYNTHETIC = {
    "unetseg/__init__.py": "",
    "unetseg/errors.py": "",
    "unetseg/config.py": "",
    "unetseg/infer.py": "",
    "unetseg/evaluate.py": "",
    "unetseg/model/__init__.py": "from .unet import UNet\n",
    "unetseg/model/unet.py": "import torch\nfrom unetseg.model import blocks\n\ndef f():\n    from ..config import X\n",
    "unetseg/model/blocks.py": "",
    "unetseg/data/__init__.py": "",
    "unetseg/data/io.py": "from unetseg.errors import DataError\nfrom . import preprocess\n",
    "unetseg/data/preprocess.py": "class C:\n    def m(self):\n        import unetseg.infer\n",
    "unetseg/train.py": "try:\n    from unetseg import infer\nexcept ImportError:\n    pass\n",
    "unetseg/display.py": "if False:\n    import streamlit as st\n",
    "apps/synthetic.py": "from unetseg import errors\nfrom unetseg.evaluate import score_case\nfrom unetseg import __version__\n",
}


def test_the_checker_finds_each_kind_of_violation(tmp_path):
    """Lazy, relative, ``from package import module``, nested and aliased imports are all caught."""
    root = make_tree(tmp_path, SYNTHETIC)
    imports = package_imports(root) + app_imports(root)
    found = {rule.text: [str(v) for v in rule.violations(imports)] for rule in RULES}
    assert found == {
        "the model imports nothing else of unetseg": ["unetseg.model.unet:5 imports unetseg.config.X"],
        "data imports only data, errors, limits, progress, runlog and config": [
            "unetseg.data.preprocess:3 imports unetseg.infer"],
        "training does not import inference": ["unetseg.train:2 imports unetseg.infer"],
        "unetseg never imports streamlit": ["unetseg.display:2 imports streamlit"],
        "apps import only the public face": ["apps/synthetic.py:2 imports unetseg.evaluate.score_case"],
    }


def test_a_violation_fails_the_rule_test(tmp_path):
    root = make_tree(tmp_path, SYNTHETIC)
    for rule in RULES:
        with pytest.raises(AssertionError, match=f"{rule.text}, but:\n"):
            assert_holds(rule, package_imports(root) + app_imports(root))


def test_relative_imports_are_made_absolute(tmp_path):
    root = make_tree(tmp_path, SYNTHETIC)
    io = [str(i) for i in imports_in(root / "unetseg/data/io.py", "unetseg.data.io", root)]
    assert io == ["unetseg.data.io:1 imports unetseg.errors.DataError", "unetseg.data.io:2 imports unetseg.data.preprocess"]
    init = [str(i) for i in imports_in(root / "unetseg/model/__init__.py", "unetseg.model", root, is_package=True)]
    assert init == ["unetseg.model:1 imports unetseg.model.unet.UNet"]
