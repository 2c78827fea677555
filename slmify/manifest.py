"""The deployment manifest (S6): what to serve, and why each task is or is not promoted.

`build_manifest` reads the cluster stage's tasks and router, each specialist's training
record and each task's eval report, and `write_manifest` (slmify.manifest_file) writes
WORKSPACE/manifest.yaml (checked against the JSON Schema shipped as
slmify/manifest.schema.json) with two exports beside it (slmify.manifest_exports; both
modules' names are imported from here):

- exports/vllm-serve.sh: per base model, the command that starts vLLM's OpenAI server
  (`python -m vllm.entrypoints.openai.api_server --model BASE --enable-lora --lora-modules
  task=adapter ...`) with every promoted LoRA adapter, on loopback. It is the generation
  backend that `slmify serve --backend URL` sends the exact prompts eval built to
  (slmify.backends), never an endpoint for clients: asked directly, an adapter answers the
  client's own messages, unpruned, with no router, scope check, validation or fallback in
  front of it, which is not the deployment that was evaluated. Head tasks (label or field
  heads) have no adapter and are not in it;
- exports/litellm-config.yaml: LiteLLM (or any gateway) in FRONT of `slmify serve`: one
  model, the fallback LLM's name, whose api_base is serve's URL, so every call goes through
  the router, the specialists and the fallback exactly as evaluated. It routes no call to a
  specialist itself and holds no upstream key.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from slmify.manifest_exports import (
    SERVE_URL,
    VLLM_LORA_RANKS,
    litellm_config,
    vllm_commands,
    vllm_dtype,
    vllm_max_lora_rank,
    write_exports,
)
from slmify.manifest_file import (
    SCHEMA_PATH,
    ManifestError,
    manifest_json_schema,
    read_manifest,
    write_manifest,
    write_schema,
)
from slmify.schema import (
    AgentEntry,
    EndToEnd,
    EvalReport,
    FallbackLLM,
    Manifest,
    ManifestTask,
    RouterSpec,
    Savings,
    SpecialistResult,
    SpecialistSpec,
    TaskCluster,
    TaskEvaluation,
    content_hash,
)
from slmify.workspace import RECIPE_FILE, Workspace, read_pruning_file

# The stage's whole interface, the file and the exports included: callers import it here.
__all__ = [
    "SCHEMA_PATH",
    "SERVE_URL",
    "VLLM_LORA_RANKS",
    "ManifestError",
    "build_manifest",
    "litellm_config",
    "manifest_json_schema",
    "read_manifest",
    "savings",
    "vllm_commands",
    "vllm_dtype",
    "vllm_max_lora_rank",
    "write_exports",
    "write_manifest",
    "write_schema",
    "write_workspace_manifest",
]
PRICES_SOURCE = (
    "the cluster stage's per-task llm_cost_usd: slmify.tasks.DEFAULT_PRICES (USD per million "
    "tokens) with the cluster recipe's `prices` overrides (cluster/config.yaml)"
)


# -- building it from the workspace -------------------------------------------------------


def build_manifest(ws_root: Path, store: Any) -> Manifest:
    """The manifest of the workspace as it stands: every task, promoted or on the LLM."""
    ws = Workspace.at(ws_root)
    tasks = ws.tasks()
    entries = [manifest_task(ws_root, t) for t in tasks]
    headline = ws.end_to_end()
    agents = manifest_agents(ws_root, headline)
    for agent in agents:
        if agent.design != "agent":
            continue
        for entry in entries:  # evaluated as answered by the agent-level specialist
            if entry.id in agent.actions.values() and entry.specialist is not None:
                entry.answered_by, entry.specialist = agent.id, agent.specialist
    return Manifest(
        created_at=datetime.now(timezone.utc),
        router=router_spec(ws_root),
        fallback=fallback_llm(store),
        tasks=entries,
        end_to_end=headline,
        savings=savings(tasks, entries),
        agents=agents,
    )


def manifest_agents(ws_root: Path, headline: EndToEnd | None) -> list[AgentEntry]:
    """The agent-level specialists the last eval weighed (slmify.agent), with its choice."""
    ws = Workspace.at(ws_root)
    plans = ws.agent_plans()
    out = []
    for choice in headline.designs if headline else []:
        plan, result = plans.get(choice.agent), ws.trained(choice.agent)
        if plan is None or isinstance(result, str):
            continue
        spec = specialist_spec(ws.specialist_dir(choice.agent), result)
        out.append(
            AgentEntry(
                id=choice.agent,
                identity=choice.identity,
                design=choice.design,
                why=choice.why,
                actions=plan.actions,
                # It chooses the tool itself: generated without a grammar, as evaluated.
                specialist=spec.model_copy(update={"constrained": False}),
            )
        )
    return out


def manifest_task(ws_root: Path, task: TaskCluster) -> ManifestTask:
    """One task's entry: its specialist and evaluation when they exist, and the decision."""
    ws = Workspace.at(ws_root)
    folder = ws.specialist_dir(task.id)
    result = ws.trained(task.id)
    entry = ManifestTask(
        id=task.id,
        label=task.label,
        share=task.share,
        calls=task.calls,
        output_shape=task.output_shape,
        status="llm",
        reason=result if isinstance(result, str) else "",
    )
    if isinstance(result, str):
        return entry
    entry.specialist = specialist_spec(folder, result)
    data = folder / "dataset"
    entry.data_hash = files_hash([data / "train.jsonl", data / "validation.jsonl"])
    entry.recipe_hash = content_hash(yaml.safe_load(ws.recipe_file(task.id).read_text()))
    report = ws.eval_report(task.id)
    if report is None:
        entry.reason = "not evaluated yet (run `slmify eval`)"
        return entry
    entry.evaluation = task_evaluation(report, ws.eval_report_file(task.id))
    trained_file = (
        Path(result.adapter) / "adapter_config.json"
        if result.kind == "lora"
        else Path(result.head) / "head.json"
    )
    adapter_time = datetime.fromtimestamp(trained_file.stat().st_mtime, timezone.utc)
    if report.created_at < adapter_time:
        entry.reason = "the evaluation predates the adapter, retrained since (run `slmify eval`)"
        return entry
    entry.status, entry.reason = report.decision.status, report.decision.reason
    entry.deferral, entry.served = report.deferral, report.served
    return entry


def router_spec(ws_root: Path) -> RouterSpec | None:
    """The router `slmify cluster` fitted (cluster/router/), or None: all calls to the LLM."""
    ws = Workspace.at(ws_root)
    meta = ws.router_meta()
    if meta is None:
        return None
    return RouterSpec(
        embedding_model=meta.embedding_model,
        params={
            "max_seq_length": meta.max_seq_length,
            "classes": meta.classes,
            "holdout": meta.holdout,
        },
        # Relative to the manifest's folder (the workspace), so the workspace can move.
        artifact=str(ws.router_dir().relative_to(ws_root)),
        confidence_threshold=meta.min_confidence,
    )


def specialist_spec(folder: Path, result: SpecialistResult) -> SpecialistSpec:
    """What serving needs to load, prompt and decode the specialist exactly as it was
    evaluated: serve reads this and the folders it names, never the train stage's files."""
    from slmify.recipes import read_generate_config, read_recipe_sections

    pruning = read_pruning_file(folder)
    max_new_tokens = read_recipe_sections(folder / RECIPE_FILE)[0].max_new_tokens
    if result.kind != "lora":
        head = Path(result.head)
        meta = json.loads((head / "head.json").read_text(encoding="utf-8"))
        reads = (
            "a classification head on MiniLM embeddings of the task statement and the last turn"
            if result.kind == "label-head"
            else "a field head: each field of the answer chosen from a closed set (MiniLM "
            "embeddings and word n-grams of the task statement and last turn) or copied from "
            "the request"
        )
        return SpecialistSpec(
            kind=result.kind,
            base_model=None,
            base_model_path=None,
            head_path=str(head.resolve()),
            labels=meta.get("labels"),
            input_pruning=[],
            chat_template=f"none: {reads}",
            pruning=pruning,
            max_new_tokens=max_new_tokens,
        )
    from transformers import AutoTokenizer

    from slmify.datasets import native_tools, turn_end
    from slmify.models import resolve_base

    adapter = Path(result.adapter)
    lora = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    removed = []
    if pruning.system is not None:
        removed.append(f"the shared system message ({len(pruning.system)} chars)")
    if pruning.tools and pruning.tools_action != "keep":
        what = "descriptions of" if pruning.tools_action == "compact" else "all of"
        removed.append(f"{what} the {len(pruning.tools)} shared tool schemas")
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    tools = "rendered by the template" if native_tools(tokenizer) else "in the system message"
    return SpecialistSpec(
        base_model=result.base_model,
        base_model_path=str(resolve_base(result.base_model)),
        adapter_path=str(adapter.resolve()),
        lora_rank=int(lora["r"]),
        input_pruning=removed,
        chat_template=(
            f"the base model's chat template, turns ending {turn_end(tokenizer)}; tool schemas "
            f'{tools}; tool calls as <tool_call>{{"name": ..., "arguments": {{...}}}}</tool_call>'
        ),
        pruning=pruning,
        max_new_tokens=max_new_tokens,
        constrained=read_generate_config(folder / RECIPE_FILE).constrained,
    )


def files_hash(paths: list[Path]) -> str:
    """sha256 over the files' bytes in order: the exact data an adapter was trained on."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes() if path.exists() else b"")
    return digest.hexdigest()


def task_evaluation(report: EvalReport, report_file: Path) -> TaskEvaluation:
    s, b = report.specialist, report.base
    return TaskEvaluation(
        test_calls=s.agreement.n,
        agreement=round(s.agreement.mean, 4),
        agreement_lower=round(s.agreement.lower, 4),
        base_agreement=round(b.agreement.mean, 4) if b else None,
        base_agreement_lower=round(b.agreement.lower, 4) if b else None,
        method=s.agreement.method,
        confidence=s.agreement.confidence,
        specialist_latency_ms_p50=s.latency_ms_p50,
        specialist_tokens_per_s=s.tokens_per_s,
        llm_latency_ms_p50=report.llm_latency_ms_p50,
        report=str(report_file),
    )


def fallback_llm(store: Any) -> FallbackLLM:
    """The LLM the agent called most, and its endpoint when a proxy recorded it."""
    models: Counter[str] = Counter()
    endpoints: Counter[str] = Counter()
    for stored in store.iter_calls():
        rec = stored.record
        model = (rec.response.model if rec.response else None) or rec.request.model
        if model:
            models[model] += 1
        if rec.source.startswith("proxy:"):
            endpoints[rec.source.removeprefix("proxy:")] += 1
    return FallbackLLM(
        model=models.most_common(1)[0][0] if models else None,
        endpoint=endpoints.most_common(1)[0][0] if endpoints else None,
    )


def served_fraction(entry: ManifestTask) -> float:
    """The part of its task's calls a promoted specialist answers: on the held-out test
    sessions, what it served of the calls routed to it (deferral keeps the rest on the
    LLM); all of them for an evaluation without those figures."""
    s = entry.served
    return s.served / s.routed if s is not None and s.routed else 1.0


def savings(tasks: list[TaskCluster], entries: list[ManifestTask]) -> Savings:
    """What moves off the LLM if the promoted specialists serve their tasks as evaluated."""
    promoted = [(e, served_fraction(e)) for e in entries if e.status == "promoted"]
    cost = {t.id: t.llm_cost_usd for t in tasks}
    latencies = [
        (e.evaluation.llm_latency_ms_p50, e.calls * f) for e, f in promoted if e.evaluation
    ]
    latency_known = all(ms is not None for ms, _ in latencies)
    return Savings(
        specialist_share=round(sum(e.share * f for e, f in promoted), 4),
        specialist_calls=round(sum(e.calls * f for e, f in promoted)),
        llm_cost_usd=round(sum(cost.values()), 4),
        llm_cost_usd_moved=round(sum(cost[e.id] * f for e, f in promoted), 4),
        # The median recorded latency times the calls: an estimate, the logs hold no more.
        llm_latency_s_moved=round(sum(ms * n for ms, n in latencies) / 1000, 1)
        if latency_known
        else None,
        prices=PRICES_SOURCE,
    )


def write_workspace_manifest(ws_root: Path, store: Any) -> dict[str, Any]:
    """Build and write WORKSPACE/manifest.yaml and its exports; the summary to print."""
    manifest = build_manifest(ws_root, store)
    manifest.exports = write_exports(manifest, ws_root / "exports")
    path = ws_root / "manifest.yaml"
    write_manifest(manifest, path)
    promoted = [t for t in manifest.tasks if t.status == "promoted"]
    s = manifest.savings
    e2e = manifest.end_to_end
    return {
        "manifest": str(path),
        "headline": e2e.headline() if e2e else "not evaluated end to end (run `slmify eval`)",
        "promoted": f"{len(promoted)} of {len(manifest.tasks)} tasks, "
        f"{s.specialist_share:.1%} of calls ({s.specialist_calls})",
        "llm_cost_usd_moved": f"{s.llm_cost_usd_moved:.2f} of {s.llm_cost_usd:.2f}",
        "llm_latency_s_moved": s.llm_latency_s_moved,
        "tasks": {t.id: f"{t.status}: {t.reason}" for t in manifest.tasks},
        **manifest.exports,
    }
