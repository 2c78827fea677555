"""The config of `slmify run` (slmify.yaml): where the logs are and how each stage runs,
validated with every error naming the file and the key; and the sources and recipes it
names, resolved relative to the config's folder. Reads the config and the recipes it names;
writes nothing.
"""

from __future__ import annotations

import glob
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from slmify.cluster import ClusterConfig
from slmify.drift import DriftConfig
from slmify.errors import EXIT_BAD_CONFIG, SlmifyError
from slmify.recipes import DEFAULT_RECIPE, Recipe, describe_errors


class RunConfigError(SlmifyError, ValueError):
    """A config that cannot be run; the message names the file and the key."""

    exit_code = EXIT_BAD_CONFIG


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CurateRunConfig(_Section):
    keep_raw: bool = Field(False, description="Also keep each call's unscrubbed record.")


class ClusterRunConfig(_Section):
    recipe: str = Field("default", description="recipes/cluster/NAME.yaml or a YAML path.")
    overrides: list[str] = Field(
        default_factory=list, description="`key=value` overrides, like `slmify cluster --set`."
    )


class TrainRunConfig(_Section):
    recipe: str = Field(DEFAULT_RECIPE, description="A shipped recipe name or a YAML path.")
    overrides: list[str] = Field(
        default_factory=list, description="`key.sub=value` recipe overrides, like --set."
    )


class EvalRunConfig(_Section):
    limit: int | None = Field(None, ge=1, description="At most N test calls per task.")


class RunConfig(_Section):
    """slmify.yaml: where the logs are, and how each stage runs."""

    sources: list[str] = Field(min_length=1, description="Log files or globs.")
    curate: CurateRunConfig = Field(default_factory=CurateRunConfig)
    cluster: ClusterRunConfig = Field(default_factory=ClusterRunConfig)
    train: TrainRunConfig = Field(default_factory=TrainRunConfig)
    eval: EvalRunConfig = Field(default_factory=EvalRunConfig)
    drift: DriftConfig = Field(default_factory=DriftConfig)


def load_config(path: Path) -> RunConfig:
    """Read and validate slmify.yaml; RunConfigError names the file and the key."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise RunConfigError(f"{path}: cannot read the config: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise RunConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise RunConfigError(f"{path}: a config is a mapping (sources:, train:, ...)")
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise RunConfigError(f"{path}: {describe_errors(e)}") from None


def resolve_sources(patterns: list[str], base: Path) -> list[Path]:
    """Every file the sources name, relative paths from the config's folder, sorted."""
    paths: list[Path] = []
    for pattern in patterns:
        full = pattern if Path(pattern).is_absolute() else str(base / pattern)
        found = sorted(Path(p) for p in glob.glob(full, recursive=True) if Path(p).is_file())
        if not found:
            raise RunConfigError(f"sources: {pattern!r} matches no file (looked in {base})")
        paths += [p for p in found if p not in paths]
    return paths


def resolve_cluster_recipe(
    cfg: ClusterRunConfig, base: Path, recipe: Recipe | None = None
) -> ClusterConfig:
    """The cluster recipe with its overrides. With the train `recipe`, the router holds out
    at least the sessions its test and calibration splits take, so that eval never replays
    a session the router was fitted on."""
    from slmify.cluster import ClusterError, load_cluster_config

    try:
        config = load_cluster_config(_relative_recipe(cfg.recipe, base), cfg.overrides)
    except ClusterError as e:
        raise RunConfigError(f"cluster.recipe: {e}") from None
    if recipe is None:
        return config
    held_out = recipe.dataset.test_fraction + recipe.dataset.calibration_fraction
    return config.model_copy(update={"holdout_share": max(config.holdout_share, held_out)})


def resolve_recipe(cfg: TrainRunConfig, base: Path) -> Recipe:
    """The training recipe with its overrides."""
    from slmify.recipes import RecipeError, load_recipe

    try:
        return load_recipe(_relative_recipe(cfg.recipe, base), cfg.overrides)
    except RecipeError as e:
        raise RunConfigError(f"train.recipe: {e}") from None


def _relative_recipe(name: str, base: Path) -> str:
    """A recipe given as a relative YAML path is read from the config's folder."""
    if name.endswith((".yaml", ".yml")) and not Path(name).is_absolute():
        return str(base / name)
    return name
