"""Agent-level specialists: one LoRA that answers every call of an agent and chooses the
action itself (issue 17).

An agent whose calls share one prompt deciding its next action (tau-airline: one policy,
14 tools) is split by the cluster stage into one task per action, and the router must
then guess the action the LLM is about to take from the input alone. The agent-level
specialist is trained on all of that agent's calls instead (`slmify train`, recipe
`agent.specialist: auto`, folder specialists/agent-<identity>/ with `agent.json`, an
`AgentPlan`). Its answer's action (the tool it calls, or the shape of its words) names
the task where the LLM's calls with that action were clustered, and that task organizes
everything else exactly as for a task specialist: the calibrated threshold on the
answer's confidence (its least likely token: the action's and everything after), the
test gate, the reports.

`AgentRouter` is how both eval and serve run it: as the router of its agent's calls (the
answer is generated while routing and kept in the pool's memo for the task it names) and
the task router's for every other agent. An answer in words that no task could serve
(free text without a judge, or not promoted) is not generated past its first tokens.

`choose_designs` replays the calibration sessions with the agent-level specialist and
keeps, per agent, the design that serves more of its calls at a threshold that clears
the targets (ties keep router + task specialists: no generation to route); the recipe's
`eval.design` can force one, to measure both on the test sessions.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from slmify.features import action_of, input_view, message_action
from slmify.schema import AgentPlan, CallRecord, ChatRequest, Deferral
from slmify.schema_eval import DesignChoice
from slmify.specialists import OutOfScope, SpecialistPool, TaskRuntime, agent_runtime

AGENT_PREFIX = "agent-"
TOOL_MARK = "<tool_call>"
# Enough tokens to read past TOOL_MARK (5 tokens in SmolLM2's vocabulary) and a space.
PROBE_TOKENS = 8
WORD_ACTIONS = ("text", "label", "json")


def agent_id(identity: str) -> str:
    return f"{AGENT_PREFIX}{identity}"


def plan_agents(by_task: dict[str, list[CallRecord]]) -> dict[str, tuple[AgentPlan, list]]:
    """Per agent whose calls the cluster stage split into two tasks or more: its plan
    (each action's task: where the LLM's calls with it were clustered most) and all its
    clustered calls, the agent-level specialist's training data."""
    tasks_by_action: dict[str, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
    calls: dict[str, list[CallRecord]] = defaultdict(list)
    for task_id, task_calls in sorted(by_task.items()):
        for call in task_calls:
            identity = input_view(call.request).identity
            tasks_by_action[identity][action_of(call)][task_id] += 1
            calls[identity].append(call)
    out = {}
    for identity, actions in sorted(tasks_by_action.items()):
        if len({t for counts in actions.values() for t in counts}) < 2:
            continue
        plan = AgentPlan(
            identity=identity,
            calls=len(calls[identity]),
            actions={a: counts.most_common(1)[0][0] for a, counts in sorted(actions.items())},
        )
        out[agent_id(identity)] = (plan, calls[identity])
    return out


def opens_tool_call(text: str) -> bool:
    """Whether the first tokens of an answer start a tool call (or may still)."""
    head = text.lstrip()
    return bool(head) and (head.startswith(TOOL_MARK) or TOOL_MARK.startswith(head))


class AgentRouter:
    """Routes the calls of agents with an agent-level specialist by the action of that
    specialist's answer; every other call by the task router (`base`)."""

    def __init__(
        self,
        base: Any,
        pool: SpecialistPool,
        agents: dict[str, tuple[str, dict[str, str]]],
        words: Callable[[str], bool],
    ):
        """`agents`: per identity, the agent-level specialist's id in `pool` and its plan's
        actions; `words(task_id)`: whether that task's answers in words can be served (else
        an answer in words is not generated past its first tokens)."""
        self.base, self.pool, self.agents, self.words = base, pool, agents, words
        self.meta = base.meta
        self.generates = True  # routing is answering: eval's progress follows routing

    def fitted_on(self, session: str) -> bool:
        return self.base.fitted_on(session)

    def warm_up(self) -> None:
        self.base.warm_up()

    def route(self, request: ChatRequest) -> tuple[str | None, float]:
        return self.route_many([request])[0]

    def route_many(self, requests: list[ChatRequest]) -> list[tuple[str | None, float]]:
        out: list[tuple[str | None, float] | None] = [None] * len(requests)
        rest = []
        for i, request in enumerate(requests):
            agent = self.agents.get(input_view(request).identity)
            if agent is None:
                rest.append(i)
            else:
                out[i] = self.route_agent(request, *agent)
        if rest:
            routes = self.base.route_many([requests[i] for i in rest])
            for i, route in zip(rest, routes, strict=True):
                out[i] = route
        return out  # type: ignore[return-value] - every slot is filled

    def route_agent(
        self, request: ChatRequest, agent: str, actions: dict[str, str]
    ) -> tuple[str | None, float]:
        """The task the agent-level specialist's answer names, and 1.0: its own confidence
        is the answer's, which the task's threshold reads (None: an action no task has)."""
        in_words = [actions[a] for a in WORD_ACTIONS if a in actions]
        try:
            if not any(self.words(t) for t in in_words):
                probe = self.pool.answer(agent, request, max_new_tokens=PROBE_TOKENS)
                if not opens_tool_call(probe.text):
                    return (in_words[0], 1.0) if in_words else (None, probe.confidence)
            answer = self.pool.answer(agent, request)
        except OutOfScope:
            return None, 0.0
        task = actions.get(message_action(answer.message))
        return (task, 1.0) if task else (None, answer.confidence)


# -- eval: the agent-level specialists of a workspace, and the choice ----------------------


@dataclass
class TrainedAgent:
    id: str
    plan: AgentPlan  # actions restricted to trained tasks
    runtime: TaskRuntime


def trained_agents(ws_root: Path, trained: set[str], max_new_tokens: int) -> list[TrainedAgent]:
    """The workspace's trained agent-level specialists whose actions name trained tasks."""
    from slmify.models import resolve_base
    from slmify.workspace import Workspace, read_pruning_file

    ws = Workspace.at(ws_root)
    out = []
    for agent, plan in ws.agent_plans().items():
        result = ws.trained(agent)
        actions = {a: t for a, t in plan.actions.items() if t in trained}
        if isinstance(result, str) or result.kind != "lora" or not actions:
            continue
        pruning = read_pruning_file(ws.specialist_dir(agent))
        base = str(resolve_base(result.base_model))
        runtime = agent_runtime(agent, base, Path(result.adapter), pruning, max_new_tokens)
        out.append(TrainedAgent(agent, plan.model_copy(update={"actions": actions}), runtime))
    return out


def certified(deferrals: dict[str, Deferral], tasks: set[str]) -> int:
    """Calibration calls served by `tasks` at a threshold whose lower bound clears the
    target (a task without one serves nothing that calibration vouches for)."""
    return sum(
        d.calibration_served
        for t, d in deferrals.items()
        if t in tasks
        and d.threshold is not None
        and (d.calibration_agreement_lower or 0.0) >= d.target
    )


def alias(pool: SpecialistPool, agents: list[TrainedAgent]) -> None:
    """Make each agent's tasks answered by it in `pool` (and only those)."""
    by_task = {t: a.id for a in agents for t in a.plan.actions.values()}
    for task_id, task in pool.tasks.items():
        if not task.agent:
            pool.tasks[task_id] = replace(task, answered_by=by_task.get(task_id))


def agent_calls(agents: list[TrainedAgent], calls: list[CallRecord]) -> list[CallRecord]:
    """The calls of `calls` made by the agents of `agents`."""
    identities = {a.plan.identity for a in agents}
    return [c for c in calls if input_view(c.request).identity in identities]


def deploy(replay: Any, base: Any, agents: list[TrainedAgent]) -> None:
    """Make `replay` run `agents` for their agents' calls, `base` routing the others."""
    alias(replay.pool, agents)
    routes = {a.plan.identity: (a.id, a.plan.actions) for a in agents}
    replay.router = AgentRouter(base, replay.pool, routes, replay.decidable) if agents else base


def choose_designs(
    replay: Any,
    agents: list[TrainedAgent],
    mine: list[CallRecord],
    deferrals: dict[str, Deferral],
    fit: Callable[[list, Any], dict[str, Deferral]],
    forced: str,
    tick: Callable[[], None] = lambda: None,
) -> tuple[dict[str, Deferral], list[DesignChoice]]:
    """Replay `mine`, the calibration calls of the agents in `agents`, with their
    agent-level specialists, and choose per agent (`forced`: eval.design). Leaves `replay`
    deploying the choice (its router and the pool's aliases) and returns the deferrals to
    use and the choices."""
    base = replay.router
    deploy(replay, base, agents)
    rows = replay.run(mine, calibrating=True, tick=tick)
    agent_deferrals = fit(rows, replay)
    out, choices, kept = dict(deferrals), [], []
    for a in agents:
        tasks = set(a.plan.actions.values())
        theirs = [c for c in mine if input_view(c.request).identity == a.plan.identity]
        by_tasks, by_agent = certified(deferrals, tasks), certified(agent_deferrals, tasks)
        if forced != "auto":
            design, why = forced, f"eval.design forces {forced}"
        elif by_agent > by_tasks:
            design, why = "agent", "it serves more calibration calls at the targets"
        else:
            design = "tasks"
            why = "the agent-level specialist serves no more calibration calls at the targets"
        choices.append(
            DesignChoice(
                identity=a.plan.identity,
                agent=a.id,
                design=design,
                calibration_calls=len(theirs),
                served_tasks=by_tasks,
                served_agent=by_agent,
                why=f"{why} ({by_agent} by the agent-level specialist, {by_tasks} by router + "
                f"task specialists, of {len(theirs)})",
            )
        )
        if design == "agent":
            kept.append(a)
            out.update({t: agent_deferrals[t] for t in tasks})
    deploy(replay, base, kept)
    return out, choices
