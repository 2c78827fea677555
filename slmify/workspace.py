"""Where slmify keeps its state, and how a command prints what it did.

One folder holds everything a run produces (the SQLite store, cluster artifacts,
specialists, reports, the manifest). It is `--workspace DIR`, else `$SLMIFY_WORKSPACE`,
else `./slmify-workspace`. Tests point `SLMIFY_WORKSPACE` at a temporary folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_WORKSPACE = "slmify-workspace"


@dataclass(frozen=True)
class Workspace:
    root: Path
    store_url: str

    @classmethod
    def resolve(cls, workspace: Path | None = None, store: str | None = None) -> Workspace:
        root = Path(workspace or os.environ.get("SLMIFY_WORKSPACE") or DEFAULT_WORKSPACE)
        root.mkdir(parents=True, exist_ok=True)
        return cls(root=root, store_url=store or str(root / "calls.db"))

    def path(self, *parts: str) -> Path:
        """A path inside the workspace, its parent folder created."""
        p = self.root.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def open_store(self):  # noqa: ANN201 - avoids importing the store for --help
        from slmify.store import open_store

        return open_store(self.store_url)


def emit(summary: dict[str, Any], as_json: bool) -> None:
    """Print a command's summary: one JSON object for scripts, else key: value lines."""
    if as_json:
        print(json.dumps(summary, default=str, ensure_ascii=False))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=False, box=None)
    for key, value in summary.items():
        if isinstance(value, dict | list):
            value = json.dumps(value, default=str, ensure_ascii=False)
        table.add_row(f"[bold]{key}[/bold]", str(value))
    Console().print(table)
