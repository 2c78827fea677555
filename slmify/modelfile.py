"""A model of slmify.schema as a JSON file: the strict read and the atomic write every
artifact of the workspace goes through (slmify.workspace names the files and says which
model each holds). Reads and writes only the paths it is given.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from slmify.errors import SlmifyError

if TYPE_CHECKING:  # pydantic loads on first use: `--help` stays instant
    from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound="BaseModel")


class WorkspaceError(SlmifyError, ValueError):
    """A stage's file that is missing or not what its writer writes; the message names it."""


def read_model(path: Path, model: type[M], unversioned_ok: bool = False) -> M:
    """The file as `model`, its `schema_version` this slmify's (or absent, when
    `unversioned_ok`: a file written before its model had one); else a WorkspaceError."""
    from pydantic import ValidationError

    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise WorkspaceError(f"{path}: not JSON ({e})") from None
    if not (unversioned_ok and isinstance(doc, dict) and "schema_version" not in doc):
        _check_version(path, model.__name__, doc)
    try:
        return model.model_validate(doc)
    except ValidationError as e:
        raise WorkspaceError(f"{path}: not a {model.__name__} ({first_error(e)})") from None


def _check_version(path: Path, name: str, doc: Any) -> None:
    from slmify.schema import SCHEMA_VERSION

    if not isinstance(doc, dict) or "schema_version" not in doc:
        raise WorkspaceError(f"{path}: no schema_version, not a {name} file as slmify writes it")
    if doc["schema_version"] != SCHEMA_VERSION:
        raise WorkspaceError(
            f"{path}: schema_version {doc['schema_version']!r}, this slmify reads "
            f"{SCHEMA_VERSION}: run the stage that writes it again"
        )


def write_text(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path` (its folder made), then rename it over
    `path`."""
    # Named by process (not mkstemp's 0600 file): the file keeps the umask's permissions.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "the document"
    return f"{where}: {err['msg']}" + (f", {len(e.errors())} errors" if len(e.errors()) > 1 else "")
