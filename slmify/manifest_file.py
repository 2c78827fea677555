"""The manifest file: `WORKSPACE/manifest.yaml` written and read as the `Manifest` model,
checked against the JSON Schema shipped as slmify/manifest.schema.json. Reads and writes
only the paths it is given; slmify.manifest builds the manifest and re-exports these.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from slmify.errors import SlmifyError
from slmify.schema import Manifest

SCHEMA_PATH = Path(__file__).with_name("manifest.schema.json")


class ManifestError(SlmifyError, ValueError):
    """A manifest that cannot be built or read; the message names the file."""


def manifest_json_schema() -> dict[str, Any]:
    """The JSON Schema of manifest.yaml, as shipped in the package."""
    return Manifest.model_json_schema()


def write_schema(path: Path = SCHEMA_PATH) -> None:
    """Regenerate the shipped schema after changing `Manifest` (a test checks it is current)."""
    path.write_text(json.dumps(manifest_json_schema(), indent=2) + "\n", encoding="utf-8")


def write_manifest(manifest: Manifest, path: Path) -> None:
    data = manifest.model_dump(mode="json")
    _validate(data, path)
    header = (
        "# slmify deployment manifest: the router, the fallback LLM, and per task whether its\n"
        "# specialist is promoted or the task stays on the LLM, and why. Schema:\n"
        "# slmify/manifest.schema.json. Written by `slmify manifest`; do not edit by hand.\n"
    )
    path.write_text(header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True))


def read_manifest(path: Path) -> Manifest:
    """Read and check a manifest.yaml against the shipped JSON Schema."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise ManifestError(f"{path}: cannot read the manifest: {e}") from e
    _validate(data, path)
    return Manifest.model_validate(data)


def _validate(data: Any, path: Path) -> None:
    from jsonschema import Draft202012Validator

    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    errors = sorted(Draft202012Validator(schema).iter_errors(data), key=lambda e: list(e.path))
    if errors:
        where = "/".join(str(p) for p in errors[0].absolute_path) or "(top)"
        raise ManifestError(
            f"{path}: does not match the manifest schema at {where}: {errors[0].message}"
        )
