"""Router + task specialists against an agent-level specialist (issue 17), on the same
held-out calls of one workspace evaluated once per design.

    cp -r WS WS-agent
    .venv/bin/slmify eval -w WS --design tasks [--task ID ...]
    .venv/bin/slmify eval -w WS-agent --design agent [--task ID ...]
    .venv/bin/python bench/bench_designs.py WS WS-agent

Reads each workspace's eval/endtoend/test.jsonl and summary.json (what `slmify eval`
wrote) and prints, per design, over the test sessions' calls:

- routed share: calls a task was picked for, by the router or by the action of the
  agent-level specialist's answer;
- routing accuracy when routing: the task picked is the one the cluster stage put the
  call in (it saw the LLM's answer: its action);
- answered: calls a specialist answered; past threshold: of those, the answers valid and
  above their task's calibrated threshold (served, were the task promoted);
- served share (promoted tasks only), agreement with the LLM and its lower bound, and
  misrouted calls among the served (the issue's goal: at most 1 in 20);
- the calibration comparison eval made for the agent (served at the targets by each
  design) and the design `--design auto` would keep.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from slmify.schema import EndToEnd, EvalReport, ReplayedCall


def figures(ws: Path) -> tuple[EndToEnd, dict[str, float | int | None]]:
    folder = ws / "eval" / "endtoend"
    e2e = EndToEnd.model_validate_json((folder / "summary.json").read_text())
    rows = [ReplayedCall.model_validate_json(x) for x in (folder / "test.jsonl").open()]
    reports = [EvalReport.model_validate_json(p.read_text()) for p in ws.glob("eval/*/report.json")]
    promoted = {r.task_id for r in reports if r.decision.status == "promoted"}
    routed = [r for r in rows if r.picked is not None]
    served = [r for r in rows if r.answered_by in promoted]
    misroutes = sum(r.picked != r.cluster_task for r in served)
    return e2e, {
        "calls": len(rows),
        "routed_share": len(routed) / len(rows) if rows else None,
        "routing_accuracy": sum(r.picked == r.cluster_task for r in routed) / len(routed)
        if routed
        else None,
        "answered": sum(r.answer is not None for r in rows),
        "past_threshold": sum(r.answered_by != "llm" for r in rows),
        "served": len(served),
        "served_share": e2e.served_share,
        "agreement": e2e.agreement,
        "agreement_lower": e2e.agreement_lower,
        "misroutes_served": misroutes,
        "agreement_without_deferral": e2e.agreement_without_deferral,
        "served_without_deferral": e2e.served_without_deferral,
    }


def show(value: float | int | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tasks", type=Path, help="the workspace evaluated with --design tasks")
    parser.add_argument("agent", type=Path, help="its copy evaluated with --design agent")
    args = parser.parse_args()
    results = {}
    for name, ws in (("tasks", args.tasks), ("agent", args.agent)):
        e2e, row = figures(ws)
        made = {c.design for c in e2e.designs} or {"tasks (no agent-level specialist)"}
        print(f"{name}: {ws} evaluated as {', '.join(sorted(made))}")
        results[name] = (e2e, row)
    keys = list(results["tasks"][1])
    print(f"\n{'figure':28s} {'router + tasks':>15s} {'agent-level':>12s}")
    for key in keys:
        print(
            f"{key:28s} {show(results['tasks'][1][key]):>15s} {show(results['agent'][1][key]):>12s}"
        )
    for choice in results["agent"][0].designs:
        print(
            f"\ncalibration, {choice.agent}: {choice.calibration_calls} calls; served at the "
            f"targets by router + tasks {choice.served_tasks}, by the agent-level specialist "
            f"{choice.served_agent}; auto keeps "
            f"{'agent' if choice.served_agent > choice.served_tasks else 'tasks'}"
        )
    tasks, agent = results["tasks"][1]["served"], results["agent"][1]["served"]
    print(f"test: served by router + tasks {tasks}, by the agent-level specialist {agent}")


if __name__ == "__main__":
    main()
