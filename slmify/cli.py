"""The `slmify` command line: parse arguments, call a stage, print what it did.

Read top to bottom, this file is the pipeline: collect (S1) and curate (S2), cluster
(S3), train (S4, S5), eval / manifest / serve / run (S6). Each command resolves the
workspace, calls one library function, and prints its summary (`--json` for scripts
and CI). Heavy imports stay inside the commands so `slmify --help` is instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from slmify.workspace import Workspace, emit

app = typer.Typer(
    help="Turn an LLM-powered agent into a team of small specialist models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
collect_app = typer.Typer(
    help="S1/S2: collect the agent's LLM calls (import logs, recording proxy) and curate them.",
    no_args_is_help=True,
)
app.add_typer(collect_app, name="collect")

WorkspaceOpt = Annotated[
    Path | None,
    typer.Option(
        "--workspace", "-w", help="State folder. Default: $SLMIFY_WORKSPACE, else ./slmify-workspace."
    ),
]
StoreOpt = Annotated[
    str | None,
    typer.Option(
        "--store", help="Call store: a SQLite path or postgresql:// URL. Default: WORKSPACE/calls.db."
    ),
]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print one JSON object summarizing what was done.")
]


def fail(message: str, code: int = 1) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


# -- S1 collect --------------------------------------------------------------------------


@collect_app.command("import")
def collect_import(
    paths: Annotated[list[Path], typer.Argument(help="Log files (.jsonl, .json, .gz).")],
    curate: Annotated[bool, typer.Option("--curate", help="Curate the store after importing.")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Exit 1 if any line is rejected.")] = False,
    workspace: WorkspaceOpt = None,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Import existing logs: OpenAI chat-completions logs (incl. legacy functions), OpenAI
    fine-tuning JSONL, OpenTelemetry GenAI spans (OTLP JSON), NVIDIA data-flywheel logs."""
    from slmify.collect import import_files

    ws = Workspace.resolve(workspace, store)
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise fail(f"no such file: {', '.join(missing)}")
    with ws.open_store() as st:
        summary = import_files(st, paths, ws.path("rejects.jsonl"), progress=not as_json)
        if curate:
            from slmify.curate import curate_store

            summary["curation"] = curate_store(st, ws.path("curation-report.json"))
    emit(summary, as_json)
    if strict and summary["rejected"]:
        raise fail(f"{summary['rejected']} line(s) rejected, see {summary['rejects']}")
