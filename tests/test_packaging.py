"""Tests that pyproject.toml, environment.yml and the package data agree."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
import zipfile
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import yaml  # PyYAML, installed with jupyterlab from the notebooks extra
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

try:
    import tomllib  # standard library from Python 3.11
except ModuleNotFoundError:
    try:
        # tomli is the package that became tomllib. pytest itself needs it on
        # Python 3.10, so it is usually installed there.
        import tomli as tomllib
    except ModuleNotFoundError:
        tomllib = None

ROOT = Path(__file__).resolve().parents[1]
DATA_FILE = "data/mnist_5k.npz"

# conda-forge names that differ from the PyPI names.
CONDA_TO_PYPI = {"pytorch": "torch"}
CONDA_SPEC = re.compile(r"^([A-Za-z0-9_.-]+)\s*(.*)$")


def read_pyproject() -> dict:
    """Parse pyproject.toml, or skip the calling test where no TOML parser exists."""
    if tomllib is None:
        pytest.skip("reading pyproject.toml needs Python 3.11+ or the tomli package")
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


@pytest.fixture(scope="module")
def project() -> dict:
    return read_pyproject()["project"]


@pytest.fixture(scope="module")
def environment() -> dict:
    with open(ROOT / "environment.yml", encoding="utf-8") as f:
        return yaml.safe_load(f)


def pyproject_requirements(project: dict) -> dict[str, SpecifierSet]:
    """Return the runtime and dev requirements, with self-references expanded."""
    extras = project["optional-dependencies"]
    pending = list(project["dependencies"]) + list(extras["dev"])
    found: dict[str, SpecifierSet] = {}
    while pending:
        requirement = Requirement(pending.pop())
        if requirement.name == project["name"]:
            for extra in requirement.extras:
                pending.extend(extras[extra])
            continue
        found[requirement.name] = requirement.specifier
    return found


def conda_requirements(environment: dict) -> dict[str, SpecifierSet]:
    """Return the conda packages by PyPI name, without python and pip."""
    found: dict[str, SpecifierSet] = {}
    for entry in environment["dependencies"]:
        if not isinstance(entry, str):
            continue
        name, spec = CONDA_SPEC.match(entry).groups()
        if name in ("python", "pip"):
            continue
        found[CONDA_TO_PYPI.get(name, name)] = SpecifierSet(spec.replace(" ", ""))
    return found


def test_dev_extra_includes_notebooks_and_grading(project):
    dev = [Requirement(text) for text in project["optional-dependencies"]["dev"]]
    own = [r for r in dev if r.name == project["name"]]

    assert len(own) == 1
    assert own[0].extras == {"notebooks", "grading"}


def test_environment_same_packages(project, environment):
    assert set(conda_requirements(environment)) == set(pyproject_requirements(project))


def test_environment_same_bounds(project, environment):
    conda = conda_requirements(environment)

    for name, specifier in pyproject_requirements(project).items():
        assert conda[name] == specifier, name


def test_environment_python_version(project, environment):
    specs = [e for e in environment["dependencies"] if isinstance(e, str)]
    python = [e for e in specs if CONDA_SPEC.match(e).group(1) == "python"]

    assert python == [f"python{project['requires-python']}"]


def test_environment_installs_package(environment):
    pip_sections = [e["pip"] for e in environment["dependencies"] if isinstance(e, dict)]

    assert pip_sections == [["-e ."]]


@pytest.mark.parametrize("name", ["torch", "torchvision"])
def test_torch_lower_bound_only(project, name):
    requirements = [Requirement(text) for text in project["dependencies"]]
    specifier = next(r.specifier for r in requirements if r.name == name)

    assert len(specifier) == 1
    assert [s.operator for s in specifier] == [">="]


@pytest.mark.parametrize("name", ["pytorch", "torchvision"])
def test_conda_torch_lower_bound_only(environment, name):
    entries = [e for e in environment["dependencies"] if isinstance(e, str)]
    spec = next(CONDA_SPEC.match(e).group(2) for e in entries if e.startswith(name))

    assert re.fullmatch(r">=[\d.]+", spec), spec


def test_package_data_readable():
    data = resources.files("course_lib").joinpath(DATA_FILE).read_bytes()
    archive = np.load(io.BytesIO(data))

    assert archive["images"].shape == (5000, 28, 28)
    assert archive["images"].dtype == np.uint8
    assert archive["labels"].shape == (5000,)


def test_package_data_declared():
    patterns = read_pyproject()["tool"]["setuptools"]["package-data"]["course_lib"]

    assert any(Path(DATA_FILE).match(pattern) for pattern in patterns)


def test_wheel_contains_data(tmp_path):
    # Build from a copy, so the build folders stay out of the repository.
    source = tmp_path / "source"
    source.mkdir()
    shutil.copy(ROOT / "pyproject.toml", source)
    if (ROOT / "README.md").exists():
        shutil.copy(ROOT / "README.md", source)
    shutil.copytree(
        ROOT / "course_lib",
        source / "course_lib",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    build = (
        "import setuptools.build_meta as backend; "
        f"print(backend.build_wheel({str(tmp_path / 'dist')!r}))"
    )

    done = subprocess.run(
        [sys.executable, "-c", build],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=source,
    )
    assert done.returncode == 0, done.stderr
    wheel = tmp_path / "dist" / done.stdout.strip().splitlines()[-1]
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()

    assert f"course_lib/{DATA_FILE}" in names
    assert "course_lib/__main__.py" in names
