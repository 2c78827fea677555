"""What `slmify run` reports: the summary of one run (a `RunSummary`, slmify.schema_stages),
its exit codes, and its human form.

Reads WORKSPACE/manifest.yaml as the run left it (`manifest_summary`); writes nothing
(slmify.run keeps the summary in WORKSPACE/run/summary.json through the workspace).
"""

from __future__ import annotations

from pathlib import Path

from slmify.schema import DriftFinding, RunState, StageOutcome
from slmify.schema_stages import ManifestStatus, ManifestUnreadable, RunSummary
from slmify.workspace import Workspace

EXIT_OK, EXIT_ERROR, EXIT_BAD_INPUT, EXIT_DEMOTED = 0, 1, 2, 3
EXIT_CODES = {
    EXIT_OK: "nothing to do, or every stage ran and no specialist lost its promotion",
    EXIT_ERROR: "a stage failed (its error is in the summary); the state keeps what finished",
    EXIT_BAD_INPUT: "bad config: unknown key, bad value, missing source file, unknown recipe",
    EXIT_DEMOTED: "a specialist was demoted to the LLM, or a promoted task failed the gate",
}


def summarize(
    ws: Workspace,
    config_path: Path,
    outcomes: list[StageOutcome],
    findings: list[DriftFinding],
    state: RunState,
) -> RunSummary:
    """The summary: stages, drift, what is still demoted, the manifest, the exit code."""
    failed = [o for o in outcomes if o.failed]
    demoted = any(f.action == "demote" for f in findings)
    code = EXIT_ERROR if failed else EXIT_DEMOTED if demoted else EXIT_OK
    ran = [o.name for o in outcomes if o.ran]
    if failed:
        message = f"{failed[0].name} failed: {failed[0].reason}"
    elif not ran:
        message = "nothing to do: sources, calls, tasks, recipe and specialists are unchanged"
    else:
        message = f"ran {', '.join(ran)}; skipped the rest (inputs unchanged)"
    return RunSummary(
        config=str(config_path),
        workspace=str(ws.root),
        message=message,
        did_work=bool(ran),
        stages=outcomes,
        drift=findings,
        demoted={k: v.reason for k, v in state.demoted.items()},
        manifest=manifest_summary(ws),
        exit_code=code,
        exit_meaning=EXIT_CODES[code],
    )


def manifest_summary(ws: Workspace) -> ManifestStatus | ManifestUnreadable | None:
    """Per task status and the savings estimate, from manifest.yaml as it now stands."""
    from slmify.manifest import ManifestError, read_manifest

    path = ws.root / "manifest.yaml"
    if not path.exists():
        return None
    try:
        manifest = read_manifest(path)
    except ManifestError as e:
        return ManifestUnreadable(path=str(path), error=str(e))
    promoted = [t for t in manifest.tasks if t.status == "promoted"]
    e2e = manifest.end_to_end
    return ManifestStatus(
        path=str(path),
        headline=e2e.headline() if e2e else "not evaluated end to end",
        end_to_end=e2e.model_dump(mode="json", exclude={"by_task", "schema_version"})
        if e2e
        else None,
        promoted=f"{len(promoted)} of {len(manifest.tasks)} tasks",
        tasks={t.id: f"{t.status}: {t.reason}" for t in manifest.tasks},
        savings=manifest.savings,
    )


def print_summary(summary: RunSummary) -> None:
    """The human form: the outcome, the drift, then the manifest and savings (each
    stage's line was announced as it finished)."""
    from rich.console import Console

    console = Console()
    console.print(f"[bold]slmify run[/bold]: {summary.message}")
    for f in summary.drift:
        where = f" {f.task_id}" if f.task_id else ""
        console.print(f"  [yellow]drift[/yellow] {f.kind}{where} -> {f.action}: {f.detail}")
    for task_id, reason in summary.demoted.items():
        console.print(f"  [yellow]demoted[/yellow] {task_id}: {reason}", highlight=False)
    m = summary.manifest
    if isinstance(m, ManifestStatus):
        console.print(f"[bold]held-out sessions[/bold]: {m.headline}", highlight=False)
        console.print(f"[bold]manifest[/bold] {m.path}: {m.promoted} promoted")
        for task_id, status in m.tasks.items():
            console.print(f"  {task_id}: {status}", highlight=False)
        s = m.savings
        latency = f", {s.llm_latency_s_moved} s of LLM latency" if s.llm_latency_s_moved else ""
        console.print(
            f"[bold]savings[/bold]: {s.specialist_share:.1%} of calls ({s.specialist_calls})"
            f" move to specialists, ${s.llm_cost_usd_moved:.2f} of ${s.llm_cost_usd:.2f}"
            f" LLM cost{latency} (prices: {s.prices})",
            highlight=False,
        )
    elif m is not None:
        console.print(f"[red]manifest[/red]: {m.error}")
    console.print(f"exit code {summary.exit_code}: {summary.exit_meaning}")
