"""One error base: every slmify error is a SlmifyError, and the CLI prints it as one line
with its exit code (1: a stage or its input failed; 2: bad config), never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from slmify.cli import app
from slmify.cluster import ClusterError
from slmify.embed import EmbeddingError
from slmify.errors import SlmifyError
from slmify.evaluate import EvalError
from slmify.manifest import ManifestError
from slmify.models import ModelError
from slmify.recipes import RecipeError
from slmify.runconfig import RunConfigError
from slmify.serve import ServeError
from slmify.store import StoreError
from slmify.train import TrainError

ERRORS = {
    ClusterError: (ValueError, 1),
    EmbeddingError: (RuntimeError, 1),
    EvalError: (RuntimeError, 1),
    ManifestError: (ValueError, 1),
    ModelError: (RuntimeError, 1),
    RecipeError: (ValueError, 2),
    RunConfigError: (ValueError, 2),
    ServeError: (RuntimeError, 1),
    StoreError: (RuntimeError, 1),
    TrainError: (RuntimeError, 1),
}


@pytest.mark.parametrize("cls", list(ERRORS), ids=lambda c: c.__name__)
def test_every_error_keeps_its_base_and_gains_slmify_error(cls: type[Exception]) -> None:
    base, code = ERRORS[cls]
    # Callers that catch ValueError / RuntimeError keep working.
    assert issubclass(cls, SlmifyError) and issubclass(cls, base)
    assert cls("x").exit_code == code


def test_unreachable_postgres_is_one_redacted_line_exit_1() -> None:
    # Port 1 on loopback refuses at once: no server, no network needed.
    url = "postgresql://u:s3cret@127.0.0.1:1/db"
    result = CliRunner().invoke(app, ["collect", "stats", "--store", url])
    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(
        "error: cannot connect to PostgreSQL store postgresql://u:***@127.0.0.1:1/db: "
    )
    assert "s3cret" not in result.output and "Traceback" not in result.output
    # The exception did not escape to the runner (that is what a traceback would be).
    assert isinstance(result.exception, SystemExit)


def test_bad_postgres_url_parameter_is_a_store_error() -> None:
    # psycopg raises ProgrammingError (not OperationalError) for an unknown URI parameter.
    url = "postgresql://u:s3cret@127.0.0.1:1/db?colour=blue"
    result = CliRunner().invoke(app, ["collect", "stats", "--store", url])
    assert result.exit_code == 1
    assert result.stderr == (
        "error: cannot connect to PostgreSQL store postgresql://u:***@127.0.0.1:1/db?colour=blue:"
        ' invalid URI query parameter: "colour"\n'
    )


def test_unknown_recipe_is_bad_config_exit_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["train", "--recipe", "nope", "-w", str(tmp_path)])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: no recipe 'nope' (not a file; shipped recipes: ")
    assert "cpu-smollm2-135m" in result.stderr and len(result.stderr.splitlines()) == 1


def test_bad_override_is_bad_config_exit_2(tmp_path: Path) -> None:
    args = ["train", "--set", "lora.rank=8", "-w", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    unknown = "lora.rank: unknown key (misspelled? see the recipe's comments)"
    assert result.stderr.endswith(f"{unknown}\n")


def test_stage_failure_is_exit_1(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["cluster", "-w", str(tmp_path / "ws")])
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: no calls to cluster in {tmp_path / 'ws'}")
    assert len(result.stderr.splitlines()) == 1
