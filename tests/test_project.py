"""Project files agree with each other: environment.yml vs pyproject.toml, README commands vs .ci/run."""

from __future__ import annotations

import re
import tomllib

import yaml

from .conftest import REPO


def pyproject():
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_environment_yml_installs_the_project_with_pip():
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    deps = env["dependencies"]
    pythons = [d for d in deps if isinstance(d, str) and d.startswith("python")]
    assert pythons == ["python=3.11"]
    minimum = pyproject()["project"]["requires-python"].removeprefix(">=")
    assert tuple(map(int, "3.11".split("."))) >= tuple(map(int, minimum.split(".")))
    pip_sections = [d["pip"] for d in deps if isinstance(d, dict) and "pip" in d]
    assert pip_sections == [["-e .[test]"]]
    assert "test" in pyproject()["project"]["optional-dependencies"]
    # conda must not pin anything pip would install differently: only python and pip come from conda
    assert {d.split("=")[0] for d in deps if isinstance(d, str)} == {"python", "pip"}


def test_torch_is_bounded_below_2_14():
    torch_req = next(d for d in pyproject()["project"]["dependencies"] if d.startswith("torch"))
    assert "<2.14" in torch_req


def readme_setup_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Set up on a fresh machine", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_second():
    commands = readme_setup_commands()
    assert len(commands) == 2, commands
    assert all("\n" not in c for c in commands)
    assert "unetseg train" in commands[0]
    assert "pytest" in commands[1]
    ci = (REPO / ".ci" / "run").read_text()
    assert commands[1] in ci


def test_console_script_is_declared():
    assert pyproject()["project"]["scripts"]["unetseg"] == "unetseg.cli:main"
