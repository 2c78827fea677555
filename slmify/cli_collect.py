"""`slmify collect`: the S1/S2 commands (import logs, the recording proxy, curate, stats).
Each resolves the workspace, calls one library function, and prints its summary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from slmify.cli_options import (
    AllowedHostOpt,
    ApiKeyFileOpt,
    JsonOpt,
    StoreOpt,
    WorkspaceOpt,
    emit,
    fail,
)
from slmify.workspace import Workspace

collect_app = typer.Typer(
    help="S1/S2: collect the agent's LLM calls (import logs, recording proxy) and curate them.",
    no_args_is_help=True,
)


# -- S1 collect --------------------------------------------------------------------------


@collect_app.command("import")
def collect_import(
    paths: Annotated[list[Path], typer.Argument(help="Log files (.jsonl, .json, .gz).")],
    curate: Annotated[
        bool, typer.Option("--curate", help="Curate the store after importing.")
    ] = False,
    strict: Annotated[
        bool, typer.Option("--strict", help="Exit 1 if any line is rejected.")
    ] = False,
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

            summary["curation"] = curate_store(st, ws.curation_report_file(), progress=not as_json)
    emit(summary, as_json)
    if strict and summary["rejected"]:
        raise fail(f"{summary['rejected']} line(s) rejected, see {summary['rejects']}")


@collect_app.command("proxy")
def collect_proxy(
    upstream: Annotated[
        str,
        typer.Option(
            "--upstream",
            help="The LLM's base URL as an OpenAI SDK takes it (https://api.openai.com/v1):"
            " /v1/X on the proxy goes to UPSTREAM/X.",
        ),
    ],
    port: Annotated[
        int, typer.Option("--port", help="Port to listen on; 0 picks a free one.")
    ] = 8900,
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on; 0.0.0.0 opens it to the network.")
    ] = "127.0.0.1",
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds the upstream may stay silent (then 504).")
    ] = 600.0,
    api_key_file: ApiKeyFileOpt = None,
    allowed_host: AllowedHostOpt = None,
    workspace: WorkspaceOpt = None,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Record the agent's calls live: point its OpenAI base URL at http://HOST:PORT/v1.

    Chat completions (streamed or not) are forwarded unchanged and stored; GET /v1/models,
    POST /v1/completions and /v1/embeddings are forwarded only; other paths are a 404.
    Optional request headers `x-slmify-session` and `x-slmify-agent` set the call's
    session id and agent name. Keys are forwarded (see --api-key-file), never stored.
    Ctrl-C stops it after writing every answered call."""
    from slmify.httpguard import configure
    from slmify.proxy import run_proxy

    if not upstream.startswith(("http://", "https://")):
        raise fail(f"--upstream must be an http:// or https:// URL, got {upstream!r}")
    guard = configure(host, allowed_host or [], api_key_file)
    ws = Workspace.resolve(workspace, store)
    with ws.open_store() as st:
        try:
            summary = run_proxy(
                st,
                upstream,
                host,
                port,
                timeout,
                announce=lambda line: typer.echo(line, err=True),
                guard=guard,
            )
        except OSError as e:
            raise fail(f"cannot listen on {host}:{port}: {e}") from e
    emit(summary, as_json)


@collect_app.command("curate")
def collect_curate(
    keep_raw: Annotated[
        bool,
        typer.Option(
            "--keep-raw", help="Also keep each call's unscrubbed record (raw_record column)."
        ),
    ] = False,
    workspace: WorkspaceOpt = None,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Scrub PII and secrets, mark exact duplicates and failed calls (kept out of training).
    Curates only calls not curated yet; the audit report goes to curation-report.json."""
    from slmify.curate import curate_store

    ws = Workspace.resolve(workspace, store)
    with ws.open_store() as st:
        summary = curate_store(
            st, ws.curation_report_file(), keep_raw=keep_raw, progress=not as_json
        )
    emit(summary, as_json)


@collect_app.command("stats")
def collect_stats(
    workspace: WorkspaceOpt = None, store: StoreOpt = None, as_json: JsonOpt = False
) -> None:
    """Calls by agent, model and status; tokens; duplicates; exclusions; scrubbed PII."""
    ws = Workspace.resolve(workspace, store)
    with ws.open_store() as st:
        stats = st.stats()
    if as_json:
        emit(stats, as_json)
    else:
        from slmify.curate import print_stats

        print_stats(stats)
