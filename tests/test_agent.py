"""Agent-level specialists (slmify.agent): one LoRA answering every call of an agent whose
calls share one prompt, its answer's action naming the task whose threshold decides.

The agent here is written by the test: one system prompt and one tool, each session a
lookup (a tool call) then a reply in words, so the cluster stage finds two tasks of one
agent. Every stage runs through the CLI on a tiny random base model.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest
from conftest import TINY_TRAIN, run_cli, sets

from slmify.agent import AgentRouter, opens_tool_call, plan_agents
from slmify.features import message_action
from slmify.schema import CallRecord, EndToEnd, ReplayedCall

SYSTEM = "You are the order desk of a shop. Look orders up before you answer."
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup_order",
            "description": "Find an order by id.",
            "parameters": {
                "type": "object",
                "properties": {"order_id": {"type": "string"}},
                "required": ["order_id"],
            },
        },
    }
]


def _record(session: int, step: int, messages: list[dict], answer: dict) -> dict:
    return {
        "id": f"s{session}-m{step}",
        "request": {"model": "gpt-4o", "messages": messages, "tools": TOOLS},
        "response": {
            "object": "chat.completion",
            "choices": [{"index": 0, "message": answer, "finish_reason": "stop"}],
        },
        "metadata": {"session_id": f"s{session}", "agent": "order-desk"},
    }


def write_agent_log(path: Path, sessions: int = 50) -> Path:
    """A one-prompt agent: per session, a tool call then a reply."""
    lines = []
    for s in range(sessions):
        order = f"{1000 + s * 7}"
        messages = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Where is my order {order}? It has not come yet."},
        ]
        call = {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": f"c{s}",
                    "type": "function",
                    "function": {
                        "name": "lookup_order",
                        "arguments": json.dumps({"order_id": order}),
                    },
                }
            ],
        }
        lines.append(_record(s, 1, messages, call))
        day = ("Monday", "Tuesday", "Friday")[s % 3]
        messages = [
            *messages,
            call,
            {"role": "tool", "tool_call_id": f"c{s}", "content": json.dumps({"ships": day})},
        ]
        reply = {"role": "assistant", "content": f"Your order {order} ships on {day}."}
        lines.append(_record(s, 2, messages, reply))
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in lines)
    return path


@pytest.fixture(scope="module")
def agent_ws(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> Path:
    """The agent imported, clustered into its two tasks and trained: each task's
    specialist and the agent-level one."""
    root = tmp_path_factory.mktemp("agent")
    ws = root / "ws"
    log = write_agent_log(root / "calls.jsonl.gz")
    run_cli("collect", "import", str(log), "--curate", "-w", str(ws))
    run_cli("cluster", "-w", str(ws), *sets(["n_clusters=2", "holdout_share=0.6"]))
    # The CPU recipes leave agent-level specialists off (a minute of CPU teaches a LoRA no
    # agent's policy); auto is what the GPU recipes and a recipe without the key say.
    overrides = [f"model.base={tiny_base}", *TINY_TRAIN, "agent.specialist=auto"]
    out = run_cli("train", "-w", str(ws), *sets(overrides))
    assert [t["id"] for t in out["tasks"] if t["id"].startswith("agent-")], out
    return ws


def _calls(ws: Path) -> dict[str, CallRecord]:
    from slmify.store import open_store

    with open_store(str(ws / "calls.db")) as st:
        return {s.record.id: s.record for s in st.iter_calls()}


def test_an_agent_split_into_tasks_gets_a_plan_naming_each_actions_task(agent_ws: Path) -> None:
    from slmify.workspace import Workspace

    ws = Workspace.at(agent_ws)
    [(agent, plan)] = ws.agent_plans().items()
    tasks = {t.id: t for t in ws.tasks()}
    assert agent == f"agent-{plan.identity}" and plan.calls == 100
    # The tool call's task and the reply's task, as the cluster stage named them.
    assert set(plan.actions) == {"lookup_order", "text"}
    assert tasks[plan.actions["lookup_order"]].output_shape == "tool_call"
    assert tasks[plan.actions["text"]].output_shape == "text"
    result = ws.trained(agent)
    assert not isinstance(result, str) and result.kind == "lora"
    # The CPU recipe leaves them off, and says how to train one.
    from typer.testing import CliRunner

    from slmify.cli import app

    result = CliRunner().invoke(app, ["train", "-w", str(agent_ws), "--task", agent])
    assert result.exit_code != 0
    assert f"{agent}: agent-level specialists are off in recipe 'cpu-smollm2-135m'" in (
        result.output
    )
    assert "--set agent.specialist=auto" in result.output
    # An agent with one task has no agent-level specialist: its router is exact already.
    one = {t: [c for c in _calls(agent_ws).values() if c.id.endswith("m1")] for t in ["t1"]}
    assert plan_agents(one) == {}


def test_actions_and_tool_call_openings_are_read_as_the_cluster_stage_names_them() -> None:
    call = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "b", "arguments": "{}"}},
            {"id": "2", "type": "function", "function": {"name": "a", "arguments": "{}"}},
        ],
    }
    assert message_action(call) == "a+b"
    assert message_action({"role": "assistant", "content": "Monday"}) == "label"
    assert (
        message_action(
            {"role": "assistant", "content": "Your order ships on Monday, as we planned it."}
        )
        == "text"
    )
    assert opens_tool_call("  <tool_") and opens_tool_call('<tool_call>{"name"')
    assert not opens_tool_call("") and not opens_tool_call("Your order")


def test_eval_weighs_both_designs_and_the_manifest_serves_the_one_chosen(
    agent_ws: Path, tmp_path: Path
) -> None:
    """auto keeps router + task specialists when the agent-level one serves no more
    calibration calls; forced, the agent-level specialist answers its agent's calls as
    serve will: routing is its answer's action, the task's threshold defers."""
    from slmify.manifest import read_manifest
    from slmify.specialists import SpecialistPool, task_runtimes

    out = run_cli("eval", "-w", str(agent_ws))
    e2e = EndToEnd.model_validate_json((agent_ws / "eval/endtoend/summary.json").read_text())
    [choice] = e2e.designs
    assert choice.design == "tasks" and choice.served_agent <= choice.served_tasks
    assert choice.calibration_calls > 20 and str(choice.served_tasks) in choice.why
    assert out["end_to_end"]["designs"][0]["design"] == "tasks"

    ws = tmp_path / "ws"
    shutil.copytree(agent_ws, ws, ignore=shutil.ignore_patterns("eval", "manifest.yaml"))
    recipe = next((ws / "specialists").glob("t*/recipe.yaml"))
    for path in (ws / "specialists").glob("*/recipe.yaml"):
        path.write_text(path.read_text().replace("design: auto", "design: agent"))
    assert "design: agent" in recipe.read_text()
    run_cli("eval", "-w", str(ws))
    e2e = EndToEnd.model_validate_json((ws / "eval/endtoend/summary.json").read_text())
    [choice] = e2e.designs
    assert choice.design == "agent" and choice.why.startswith("eval.design forces agent")
    rows = [ReplayedCall.model_validate_json(x) for x in (ws / "eval/endtoend/test.jsonl").open()]
    assert len(rows) == e2e.calls and sum(e2e.reasons.values()) == e2e.calls
    run_cli("manifest", "-w", str(ws))
    manifest = read_manifest(ws / "manifest.yaml")
    [agent] = manifest.agents
    assert agent.design == "agent" and agent.specialist.constrained is False
    answered = {t.id for t in manifest.tasks if t.answered_by == agent.id}
    assert answered == set(agent.actions.values())
    # serve loads the agent design behind its router (shadow mode loads the unpromoted
    # tasks too); from completions servers it refuses it, saying so.
    from slmify.serve import ServeError, load_service
    from slmify.store import open_store

    upstream = "http://127.0.0.1:9/v1"
    with open_store(str(tmp_path / "served.db")) as st:
        service = load_service(ws / "manifest.yaml", st, upstream, 10, 1.0)
        service.writer.close()
        with pytest.raises(ServeError, match="not supported yet"):
            load_service(ws / "manifest.yaml", st, upstream, 10, 1.0, [upstream])
    assert isinstance(service.router, AgentRouter)
    assert service.pool.tasks[agent.id].agent
    # Serve's runtimes answer each routed call exactly as the replay did, through the
    # agent-level specialist; the task its answer names is the one the replay picked.
    pool = SpecialistPool(task_runtimes(manifest, unpromoted=True))
    assert pool.tasks[agent.id].agent
    calls = _calls(ws)
    # Words are served by no task here (free text, no judge): only their first tokens are
    # generated, in eval and serve alike.
    router = AgentRouter(
        _FixedRouter(), pool, {agent.identity: (agent.id, agent.actions)}, lambda t: False
    )
    answered_rows = [r for r in rows if r.answer is not None][:4]
    assert answered_rows, "the agent-level specialist answered some held-out calls"
    for row in answered_rows:
        request = calls[row.call_id].request
        picked, confidence = router.route(request)
        assert picked == row.picked and confidence == 1.0
        answer = pool.answer(picked, request)
        assert answer.text == row.answer.text and answer.task_id == picked
        assert answer.confidence == pytest.approx(row.answer.confidence, abs=1e-5)


def test_the_task_an_answer_names_defers_it_below_that_tasks_threshold(agent_ws: Path) -> None:
    """Deferral per action: the agent-level specialist's answer is deferred by the
    threshold of the task its action names, and kept at or above it."""
    from dataclasses import replace

    from slmify.agent import trained_agents
    from slmify.decision import Decision, answer_decision
    from slmify.specialists import SpecialistPool
    from slmify.workspace import Workspace

    ws = Workspace.at(agent_ws)
    tasks = {t.id for t in ws.tasks()}
    [agent] = trained_agents(agent_ws, tasks, max_new_tokens=3)
    runtimes = [
        replace(agent.runtime, id=t, agent=False, answered_by=agent.id, output_shape="text")
        for t in tasks
    ]
    pool = SpecialistPool([agent.runtime, *runtimes])
    call = next(c for c in _calls(agent_ws).values() if c.id.endswith("m2"))
    task = agent.plan.actions["text"]
    answer = pool.answer(task, call.request)
    assert answer.task_id == task and answer.text == pool.answer(agent.id, call.request).text
    decision = Decision(task, "routed: confidence 1.00 >= 0.50", task, 1.0)
    above = replace(pool.tasks[task], threshold=answer.confidence + 1e-6)
    at = replace(pool.tasks[task], threshold=answer.confidence)
    assert answer_decision(decision, answer, above).reason.startswith("deferred: low-confidence")
    assert answer_decision(decision, answer, at).task_id == task


class _FixedRouter:
    """The task router's place for other agents' calls (this workspace has none)."""

    meta = None

    def route_many(self, requests: list) -> list:
        raise AssertionError("every call here is the agent's")


def test_the_cpu_recipes_leave_agent_level_specialists_off_as_yaml_spells_it() -> None:
    """`specialist: off` in YAML is the boolean false; it reads as "off" (true as "auto")."""
    from slmify.recipes import AgentConfig, load_recipe

    for name in ("cpu-smollm2-135m", "cpu-gemma3-270m"):
        assert load_recipe(name).agent.specialist == "off"
    assert AgentConfig.model_validate({"specialist": True}).specialist == "auto"
    assert AgentConfig().specialist == "auto"
