"""The `slmify` command line: parse arguments, call a stage, print what it did.

Read top to bottom, this file is the pipeline: collect (S1) and curate (S2), whose
commands are in slmify.cli_collect, cluster (S3), train (S4, S5), eval / manifest / serve /
run (S6). Each command resolves the workspace, calls one library function, and prints its
summary (`--json` for scripts and CI; slmify.cli_options holds the shared options and the
printing). Heavy imports stay inside the commands so `slmify --help` is instant.

Any `SlmifyError` a command lets through becomes one line, `error: <message>`, on stderr
and the error's exit code (1: a stage or its input failed; 2: bad config), no traceback.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated

import click
import typer
from typer.core import TyperGroup

from slmify.cli_collect import collect_app
from slmify.cli_options import (
    AllowedHostOpt,
    ApiKeyFileOpt,
    JsonOpt,
    StoreOpt,
    WorkspaceOpt,
    emit,
    fail,
)
from slmify.errors import SlmifyError
from slmify.workspace import Workspace

# Libraries whose own deprecation notices (`torch.jit.script_method is deprecated`,
# transformers' renamed arguments) tell a user of slmify nothing they can act on.
QUIET_LIBRARIES = (
    r"(torch|transformers|peft|trl|accelerate|datasets|huggingface_hub|sentence_transformers"
    r"|sklearn|bitsandbytes|safetensors|tokenizers)(\.|$)"
)


class Commands(TyperGroup):
    """The root group: every command runs inside its `invoke`, so one `except` here turns
    any SlmifyError into one line and its exit code, whichever command raised it, and one
    filter here silences the libraries' deprecation notices (by category and module, so
    slmify's own warnings still show)."""

    def invoke(self, ctx: click.Context) -> object:
        for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=category, module=QUIET_LIBRARIES)
        try:
            return super().invoke(ctx)
        except SlmifyError as e:
            # Messages that quote a library (psycopg, yaml) can span lines; one line greps.
            raise fail(" ".join(str(e).split()), e.exit_code) from None


app = typer.Typer(
    cls=Commands,
    help="Turn an LLM-powered agent into a team of small specialist models. Exit codes: "
    "0 done; 1 a stage or its input failed; 2 bad config (recipe, run config); "
    "`slmify run` adds 3 (see its --help).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(collect_app, name="collect")


# -- S3 cluster --------------------------------------------------------------------------


@app.command("cluster")
def cluster(
    recipe: Annotated[
        str,
        typer.Option(
            "--recipe", "-r", help="A shipped cluster recipe (recipes/cluster/NAME.yaml) or a path."
        ),
    ] = "default",
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a key, e.g. --set algorithm=hdbscan (repeatable)."),
    ] = None,
    workspace: WorkspaceOpt = None,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Discover the agent's recurring task types: WORKSPACE/cluster/ (tasks.json, report.html,
    the runtime router) and WORKSPACE/assignments.jsonl (each call's task, or null: LLM)."""
    from slmify.cluster import cluster_store, load_cluster_config

    ws = Workspace.resolve(workspace, store)
    config = load_cluster_config(recipe, overrides or [])
    with ws.open_store() as st:
        summary = cluster_store(st, ws, config, progress=not as_json)
    emit(summary, as_json)


# -- S4 select, S5 train -----------------------------------------------------------------


@app.command("train")
def train(
    recipe: Annotated[
        str,
        typer.Option(
            "--recipe", "-r", help="A shipped recipe name (recipes/NAME.yaml) or a YAML path."
        ),
    ] = "cpu-smollm2-135m",
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a recipe key, e.g. --set lora.r=32 (repeatable)."),
    ] = None,
    task: Annotated[
        str | None, typer.Option("--task", help="Train only this task id (one CI matrix job).")
    ] = None,
    workspace: WorkspaceOpt = None,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Train a LoRA specialist per task from the clustered calls: adapters, splits, metrics
    and the resolved recipe under WORKSPACE/specialists/<task id>/."""
    from slmify.recipes import load_recipe
    from slmify.train import train_all

    ws = Workspace.resolve(workspace, store)
    summary = train_all(ws, load_recipe(recipe, overrides or []), task, progress=not as_json)
    emit(summary, as_json)


# -- S6 eval, manifest -------------------------------------------------------------------


@app.command("eval")
def eval_(
    task: Annotated[
        list[str] | None,
        typer.Option(
            "--task",
            help="Only this task's specialist answers (repeatable); the headline then counts "
            "what these alone would serve.",
        ),
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option(
            "--limit",
            min=1,
            help="At most N held-out calls per split, calibration and test (a fixed sample by "
            "call-id hash): faster on CPU; the confidence bounds widen with the smaller sample.",
        ),
    ] = None,
    judge_url: Annotated[
        str | None,
        typer.Option(
            "--judge-url",
            help="OpenAI-compatible base URL (…/v1) of an LLM judge for free-text answers; "
            "its key from $SLMIFY_JUDGE_API_KEY, else $OPENAI_API_KEY.",
        ),
    ] = None,
    judge_model: Annotated[
        str | None, typer.Option("--judge-model", help="The judge's model name.")
    ] = None,
    design: Annotated[
        str | None,
        typer.Option(
            "--design",
            help="For an agent with an agent-level specialist: auto (keep the design that "
            "serves more calibration calls), tasks or agent (force one, to measure both); "
            "default: the recipe's eval.design.",
        ),
    ] = None,
    workspace: WorkspaceOpt = None,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Replay the held-out sessions through the serving decision path (router, scope,
    specialist, validation, confidence threshold): fit each task's threshold on the
    calibration sessions, gate each task on what it served of the test sessions, and print
    the share of held-out calls specialists answer at the LLM's quality. Writes
    WORKSPACE/eval/endtoend/ and eval/<task id>/report.json."""
    from slmify.evaluate import Judge, evaluate_workspace

    if (judge_url is None) != (judge_model is None):
        raise fail("--judge-url and --judge-model go together")
    if design not in (None, "auto", "tasks", "agent"):
        raise fail(f"--design {design}: one of auto, tasks, agent")
    ws = Workspace.resolve(workspace, store)
    judge = Judge.from_env(judge_url, judge_model) if judge_url and judge_model else None
    with ws.open_store() as st:
        summary = evaluate_workspace(
            ws.root,
            st,
            task,
            limit,
            judge,
            progress=not as_json,
            announce=(lambda line: None) if as_json else typer.echo,
            design=design,
        )
    # The per-task lines were printed as each task finished; JSON gets them structured.
    emit(summary if as_json else {k: v for k, v in summary.items() if k != "tasks"}, as_json)


@app.command("manifest")
def manifest(
    workspace: WorkspaceOpt = None, store: StoreOpt = None, as_json: JsonOpt = False
) -> None:
    """Write WORKSPACE/manifest.yaml (router, fallback LLM, every task promoted or on the
    LLM with its reason, evaluation figures, savings) and exports under WORKSPACE/exports/:
    the command starting vLLM with the promoted adapters (serve's generation backend) and a
    LiteLLM config that puts LiteLLM in front of `slmify serve`."""
    from slmify.manifest import write_workspace_manifest

    ws = Workspace.resolve(workspace, store)
    with ws.open_store() as st:
        summary = write_workspace_manifest(ws.root, st)
    emit(summary, as_json)


@app.command("report")
def report(
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Where to write the HTML page. Default: WORKSPACE/report.html."),
    ] = None,
    workspace: WorkspaceOpt = None,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """One page to decide from (self-contained HTML, works offline): each task named and
    described from its calls with examples, each specialist's learning curve, agreement,
    confidence threshold and latency, the end-to-end headline, and the map of the calls.
    --json prints the same content."""
    from slmify.workspace_report import write_workspace_report

    ws = Workspace.resolve(workspace, store)
    with ws.open_store() as st:
        doc = write_workspace_report(ws.root, st, out)
    if as_json:
        emit(doc, as_json)
        return
    h = doc["headline"]
    emit(
        {
            "report": doc["html"],
            "headline": h["text"] if h else "no end-to-end figures yet: run `slmify eval`",
            "tasks": ", ".join(f"{t['id']}: {t['name']}" for t in doc["tasks"]),
        },
        False,
    )


@app.command("serve")
def serve(
    manifest_path: Annotated[
        Path, typer.Option("--manifest", help="The manifest.yaml written by `slmify manifest`.")
    ],
    upstream: Annotated[
        str,
        typer.Option(
            "--upstream",
            help="The fallback LLM's base URL as an OpenAI SDK takes it (https://api.openai.com"
            "/v1). Its key: $SLMIFY_UPSTREAM_API_KEY for clients holding a slmify key (see "
            "--api-key-file), else the client's own; never stored.",
        ),
    ],
    port: Annotated[
        int, typer.Option("--port", help="Port to listen on; 0 picks a free one.")
    ] = 8901,
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on; 0.0.0.0 opens it to the network.")
    ] = "127.0.0.1",
    shadow: Annotated[
        float,
        typer.Option(
            "--shadow",
            min=0.0,
            max=1.0,
            help="Share of the calls routed to a task with a trained specialist (promoted or "
            "not) that the LLM answers, the specialist answering in the background; their "
            "agreement is recorded.",
        ),
    ] = 0.0,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds the upstream may stay silent (then 504).")
    ] = 600.0,
    backend: Annotated[
        list[str] | None,
        typer.Option(
            "--backend",
            help="An OpenAI-compatible completions server hosting the LoRA adapters under "
            "their task ids (http://127.0.0.1:8000/v1, vLLM as exports/vllm-serve.sh starts "
            "it); repeatable; `exports`: the URLs that script uses. Default: in-process.",
        ),
    ] = None,
    api_key_file: ApiKeyFileOpt = None,
    allowed_host: AllowedHostOpt = None,
    workspace: WorkspaceOpt = None,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Serve the agent's calls: point its OpenAI base URL at http://HOST:PORT/v1.

    Each chat call goes to the promoted specialist of the task the router picks, or to the
    upstream LLM (no match, low confidence, task not promoted, a request the specialist was
    not trained for, or an answer that fails validation). Headers x-slmify-route and
    x-slmify-reason say who answered and why; every call is recorded in the store with its
    route. Ctrl-C stops it after recording every answered call."""
    from slmify.httpguard import configure
    from slmify.serve import run_server

    if not upstream.startswith(("http://", "https://")):
        raise fail(f"--upstream must be an http:// or https:// URL, got {upstream!r}")
    for url in backend or []:
        if url != "exports" and not url.startswith(("http://", "https://")):
            raise fail(f"--backend must be an http:// or https:// URL or `exports`, got {url!r}")
    if not manifest_path.is_file():
        raise fail(f"no such file: {manifest_path}")
    guard = configure(host, allowed_host or [], api_key_file)
    ws = Workspace.resolve(workspace, store)
    with ws.open_store() as st:
        try:
            summary = run_server(
                st,
                manifest_path,
                upstream,
                host,
                port,
                timeout,
                shadow,
                announce=lambda line: typer.echo(line, err=True),
                guard=guard,
                backend_urls=backend,
            )
        except OSError as e:
            raise fail(f"cannot listen on {host}:{port}: {e}") from e
    emit(summary, as_json)


# -- S6 retrain: the whole conversion, incrementally -------------------------------------


@app.command("run")
def run(
    config: Annotated[
        Path, typer.Option("--config", "-c", help="The run config (see slmify.yaml).")
    ] = Path("slmify.yaml"),
    workspace: WorkspaceOpt = None,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Collect, curate, cluster, train, eval and write the manifest, each stage only when
    its inputs changed since its last run (hashes in WORKSPACE/run/state.json); new calls of
    one task retrain that task only. Reports drift (a new task type, a task's share moving,
    the router's confidence dropping, a promoted specialist's live agreement falling below
    its gate) and acts on it: re-cluster, retrain, or demote to the LLM.

    Exit codes, for CI to branch on:
    0 nothing to do, or all good;
    1 a stage failed (the summary names it);
    2 bad config (unknown key, bad value), missing source file or unknown recipe;
    3 a specialist was demoted to the LLM, or a promoted task failed the gate."""
    from slmify.run import run_pipeline
    from slmify.run_summary import print_summary

    ws = Workspace.resolve(workspace, store)
    # A RunConfigError (exit 2) or StoreError (exit 1) is printed by Commands.invoke.
    summary = run_pipeline(
        ws,
        config,
        progress=not as_json,
        announce=(lambda line: None) if as_json else (lambda line: typer.echo(line, err=True)),
    )
    if as_json:
        emit(summary, as_json)
    else:
        print_summary(summary)
    raise typer.Exit(summary.exit_code)
