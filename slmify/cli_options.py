"""The options the `slmify` commands share, and how a command prints what it did or why it
failed. Reads and writes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from pydantic import BaseModel

WorkspaceOpt = Annotated[
    Path | None,
    typer.Option(
        "--workspace",
        "-w",
        help="State folder. Default: $SLMIFY_WORKSPACE, else ./slmify-workspace.",
    ),
]
StoreOpt = Annotated[
    str | None,
    typer.Option(
        "--store",
        help="Call store: a SQLite path or postgresql:// URL. Default: WORKSPACE/calls.db.",
    ),
]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print one JSON object summarizing what was done.")
]


def fail(message: str, code: int = 1) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


# Shared by `collect proxy` and `serve` (slmify.httpguard).
ApiKeyFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--api-key-file",
        help="Clients' keys, one a line (besides $SLMIFY_API_KEY): with any, each call needs "
        "one, and only such calls go upstream with $SLMIFY_UPSTREAM_API_KEY. Without, the "
        "client's own key goes upstream.",
    ),
]
AllowedHostOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--allowed-host",
        help="Another name clients reach this server by (Host header), besides the loopback "
        "names and the bound address; repeatable. Other names get 421 (DNS rebinding).",
    ),
]


def emit(summary: BaseModel | dict[str, Any], as_json: bool) -> None:
    """Print a command's summary (a model of slmify.schema_stages, or a plain object): one
    JSON object for scripts, else key: value lines."""
    if not isinstance(summary, dict):
        summary = summary.model_dump(mode="json")
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
