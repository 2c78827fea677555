"""The wheel ships every recipe and every module, and an installed slmify finds its recipes
as package data, with no source tree beside it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of the tree: an in-tree build would leave build/ and
    egg-info in the checkout. No build isolation, so it builds offline (~2 s)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("slmify", "recipes"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*cmd, "--no-index", str(src), "-w", str(out)], check=True, cwd=src)
    (built,) = out.glob("slmify-*.whl")
    return built


def test_wheel_holds_every_recipe_and_module(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    recipes = {str(p.relative_to(ROOT / "recipes")) for p in (ROOT / "recipes").rglob("*.yaml")}
    assert "cpu-smollm2-135m.yaml" in recipes and "cluster/default.yaml" in recipes
    missing = {r for r in recipes if f"slmify/recipe_files/{r}" not in names}
    assert not missing, f"recipes left out of the wheel: {sorted(missing)}"
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "slmify").rglob("*.py")}
    missing = modules - names
    assert not missing, (
        f"modules left out of the wheel: {sorted(missing)}; "
        "a new subpackage goes in pyproject's [tool.setuptools] packages"
    )
    assert "slmify/manifest.schema.json" in names


def test_unpacked_wheel_loads_its_recipes_as_package_data(wheel: Path, tmp_path: Path) -> None:
    # The wheel's files as pip lays them out, with no recipes/ folder above them, first on
    # sys.path (ahead of the editable checkout): the lookup must find the package data.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "import slmify.recipes as r\n"
        "from slmify.cluster import load_cluster_config\n"
        "print(r.__file__); print(r.RECIPES_DIR)\n"
        "print(r.load_recipe('cpu-smollm2-135m').model.base)\n"
        "print(load_cluster_config('default').algorithm)\n"
        "print(','.join(p.stem for p in r.shipped_recipes()))\n"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-c", probe, str(site)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    module, folder, base, algorithm, names = done.stdout.splitlines()
    assert module == str(site / "slmify" / "recipes.py")
    assert folder == str(site / "slmify" / "recipe_files")
    assert base == "smollm2-135m" and algorithm == "kmeans"
    shipped = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))
    assert names.split(",") == shipped
