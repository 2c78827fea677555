"""S6 serve, the local half: the promoted specialists answering requests, and the checks
that keep each one to what it was trained for.

Reads the manifest's tasks (`task_runtimes`: the pruning, generation cap, constrained
decoding and confidence threshold they were evaluated with, all in the manifest) and the
adapter or head folders it names, nothing else (a manifest older than those fields: the
train stage's files beside the adapter, as serve read them then); eval builds the same
runtimes from the train stage's folders. Writes nothing.

Each base model is loaded once (`slmify.runtime.Specialist`: float weights on the GPU when
there is one, greedy decoding, the template's end of turn as the stop, a confidence from the
answer's token probabilities). A base serving one adapter has it merged into its weights;
a base serving several has each attached by name (peft `load_adapter`), and a request
switches to its task's adapter with `set_adapter`. peft has one active adapter per model,
so switching and generating happen under one lock. The prompt is built exactly as in
training and evaluation (`build_prompt` with the task's pruning, the model's chat
template) and read back with `parse_output`. A LoRA task's tool calls and JSON are
generated under a grammar of the offered tools' schemas or of JSON (slmify.constrained;
the recipe's `generate.constrained`, carried by the manifest), in-process and on a backend
alike. A head task answers without generating: a label head (slmify.labelhead) with the
most likely label of its closed set, a field head (slmify.fieldhead) with the most likely
tool call or JSON assembled field by field; the probability is the confidence.

An answer goes out as an OpenAI `chat.completion` with usage (`completion_body`), or as the
`chat.completion.chunk` events of a stream (`slmify.sse.sse_events`).

Two checks (slmify.answer_checks) send a request to the LLM instead: `out_of_scope`
before generating (the request asks for what training never showed; here also a prompt
that overflows the context window, `OutOfScope`), and `answer_problem` after (the answer is
not valid).
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from slmify.answer_checks import (
    answer_problem,
    forced_tool,
    offered_specs,
    response_format,
)

# Eval's decision path (slmify.decision) asks the scope check where it gets the pool.
from slmify.answer_checks import out_of_scope as out_of_scope
from slmify.datasets import build_prompt, parse_output
from slmify.schema import (
    HEAD_KINDS,
    ChatRequest,
    Deferral,
    Manifest,
    OutputShape,
    PromptPruning,
    SpecialistKind,
)

log = logging.getLogger(__name__)

# An agent-level specialist's answers kept for the task its action names (serve routes a
# call and answers it a moment later; eval likewise, one call at a time).
MEMO_SIZE = 64


def load_any_head(kind: SpecialistKind, folder: Path | None) -> Any:
    """A label head or a field head, loaded from its folder."""
    assert folder is not None, f"a {kind} needs its folder"
    if kind == "label-head":
        from slmify.labelhead import load_head

        return load_head(folder)
    from slmify.fieldhead import load_field_head

    return load_field_head(folder)


class OutOfScope(Exception):
    """A request its specialist cannot answer as trained; the message says why."""


@dataclass(frozen=True)
class TaskRuntime:
    """What serving (and eval, which answers exactly as serving does) needs of one task."""

    id: str
    output_shape: OutputShape
    kind: SpecialistKind
    base_path: str | None
    adapter: Path | None
    head: Path | None
    pruning: PromptPruning
    max_new_tokens: int  # the generation cap it was evaluated with
    threshold: float | None = None  # the calibrated confidence threshold; None: no deferral
    # Whether a LoRA task generates under a grammar (the recipe's generate.constrained);
    # None: the pool reads the recipe beside the adapter (eval's runtimes, built from the
    # train stage's folder).
    constrained: bool | None = None
    # The agent-level specialist (slmify.agent) that answers for this task: its answer,
    # whose action named this task, is this task's. None: the task's own specialist.
    answered_by: str | None = None
    # An agent-level specialist: it answers any call of its agent, in words or with any
    # tool, its confidence the least likely token's (the action's and everything after).
    agent: bool = False


@dataclass(frozen=True)
class Answer:
    """A specialist's answer, as an OpenAI assistant message, with what it cost."""

    task_id: str
    text: str
    message: dict[str, Any]
    finish_reason: str
    problem: str | None
    prompt_tokens: int
    output_tokens: int
    latency_ms: float
    confidence: float
    # Why it was generated without its grammar (one xgrammar cannot compile); None: it was not.
    unconstrained: str | None = None


def task_runtimes(manifest: Manifest, unpromoted: bool = False) -> list[TaskRuntime]:
    """The promoted tasks of a manifest, as the manifest describes their specialists; with
    `unpromoted`, also the tasks kept on the LLM whose trained specialist is on disk
    (shadow mode answers them in the background). Reads nothing the manifest does not name."""
    out = []
    for task in manifest.tasks:
        spec = task.specialist
        if spec is None:
            continue
        folder = spec.head_path if spec.kind in HEAD_KINDS else spec.adapter_path
        if task.status != "promoted" and not (unpromoted and folder and Path(folder).is_dir()):
            continue
        pruning, max_new_tokens = spec.pruning, spec.max_new_tokens
        if pruning is None or max_new_tokens is None:
            pruning, max_new_tokens = _legacy_prompting(task.id, Path(spec.adapter_path))
        constrained = spec.constrained
        if constrained is None and spec.kind == "lora":
            # A manifest older than `constrained`: its recipe decides, as serve read it then.
            from slmify.constrained import recipe_constrains

            constrained = recipe_constrains(Path(spec.adapter_path))
        out.append(
            TaskRuntime(
                id=task.id,
                output_shape=task.output_shape,
                kind=spec.kind,
                base_path=spec.base_model_path,
                adapter=Path(spec.adapter_path) if spec.adapter_path else None,
                head=Path(spec.head_path) if spec.head_path else None,
                pruning=pruning,
                max_new_tokens=max_new_tokens,
                threshold=serving_threshold(task.deferral),
                constrained=constrained,
                answered_by=task.answered_by,
            )
        )
    answering = {t.answered_by for t in out}
    for agent in manifest.agents:
        spec = agent.specialist
        if agent.design == "agent" and agent.id in answering:
            adapter = Path(spec.adapter_path or "")
            out.append(
                agent_runtime(
                    agent.id, spec.base_model_path, adapter, spec.pruning, spec.max_new_tokens
                )
            )
    return out


def agent_runtime(
    agent: str, base_path: str | None, adapter: Path, pruning: PromptPruning, max_new_tokens: int
) -> TaskRuntime:
    """An agent-level specialist (slmify.agent) as the pool runs it: free generation (it
    chooses the tool itself), any action."""
    return TaskRuntime(
        id=agent,
        output_shape="text",
        kind="lora",
        base_path=base_path,
        adapter=adapter,
        head=None,
        pruning=pruning,
        max_new_tokens=max_new_tokens,
        constrained=False,
        agent=True,
    )


def serving_threshold(deferral: Deferral | None) -> float | None:
    """The confidence below which serve defers: none for a manifest written before
    deferral existed; above any confidence when calibration found no safe threshold."""
    if deferral is None:
        return None
    return math.inf if deferral.threshold is None else deferral.threshold


def _legacy_prompting(task_id: str, adapter: Path) -> tuple[PromptPruning, int]:
    """A manifest written before manifests held the prompting (format 1 without `pruning`):
    the train stage's files beside the adapter, as serve read them then."""
    from slmify.recipes import read_recipe_sections
    from slmify.workspace import PRUNING_FILE, RECIPE_FILE, read_pruning_file

    folder = adapter.parent  # specialists/<task id>/, as `slmify train` lays it out
    if not (folder / PRUNING_FILE).exists():
        raise FileNotFoundError(
            f"{folder / PRUNING_FILE} not found: task {task_id}'s manifest entry has no "
            "pruning and its specialist folder is incomplete; run `slmify manifest` again"
        )
    cfg = read_recipe_sections(folder / RECIPE_FILE)[0]
    return read_pruning_file(folder), cfg.max_new_tokens


# -- generation ---------------------------------------------------------------------------


def _stop_at(text: str, stop: Any) -> tuple[str, bool]:
    """`text` cut before the first of the request's stop sequences, and whether it was."""
    stops = [stop] if isinstance(stop, str) else [s for s in stop or [] if isinstance(s, str)]
    cut = min((i for s in stops if s and (i := text.find(s)) >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def _call_finish(message: dict[str, Any]) -> str | None:
    """The finish reason of an answer that calls a tool; None for any other answer."""
    if message.get("tool_calls"):
        return "tool_calls"
    return "function_call" if message.get("function_call") else None


def _legacy(message: dict[str, Any], request: ChatRequest) -> dict[str, Any]:
    """The message in the API the request used: `function_call` for legacy `functions`."""
    if request.tools or not request.functions or not message.get("tool_calls"):
        return message
    first = message.pop("tool_calls")[0]  # the legacy API has room for one call
    return {**message, "function_call": first["function"]}


class SpecialistPool:
    """The specialists: one loaded model per base, one adapter per task, and label heads."""

    def __init__(self, tasks: list[TaskRuntime], backend: Any = None):
        """`backend`: a `slmify.backends.CompletionsBackend` that generates for the LoRA
        tasks (each adapter served under its task id); None: in-process generation."""
        from slmify.constrained import recipe_constrains
        from slmify.runtime import Specialist

        self.tasks = {t.id: t for t in tasks}
        self.lock = threading.Lock()
        # An agent-level specialist's latest answers by prompt: routing generated them, the
        # task its action named returns them (greedy: the same prompt, the same answer).
        self.memo: OrderedDict[tuple[str, str, int], Answer] = OrderedDict()
        tasks = [t for t in tasks if t.answered_by is None]
        # Per LoRA task, whether it generates under a grammar (`generate.constrained`: the
        # manifest's, or the recipe's for eval), and why a task whose grammar did not
        # compile was generated unconstrained.
        self.constrained = {
            t.id: recipe_constrains(t.adapter) if t.constrained is None else t.constrained
            for t in tasks
            if t.kind == "lora"
        }
        self.unconstrained: dict[str, str] = {}
        self._models: dict[str, Specialist] = {}
        self._adapter_name: dict[str, str] = {}
        self._heads: dict[str, Any] = {}
        lora = [t.base_path for t in tasks if t.kind == "lora"]
        for t in tasks:
            if t.kind in HEAD_KINDS:
                self._heads[t.id] = load_any_head(t.kind, t.head)
            elif backend is not None:
                if t.base_path not in self._models:
                    self._models[t.base_path] = backend.specialist(t.base_path, t.max_new_tokens)
                self._adapter_name[t.id] = t.id
            elif t.base_path not in self._models:
                # A base serving one adapter has it merged: no LoRA matmuls per token.
                merge = lora.count(t.base_path) == 1
                spec = Specialist(t.base_path, t.adapter, t.max_new_tokens, merge=merge)
                self._models[t.base_path] = spec
                self._adapter_name[t.id] = spec.adapter
            else:
                self._models[t.base_path].add_adapter(t.adapter, t.id)
                self._adapter_name[t.id] = t.id

    def answer(
        self,
        task_id: str,
        request: ChatRequest,
        use_adapter: bool = True,
        max_new_tokens: int | None = None,
    ) -> Answer:
        """The task's specialist's answer (blocking; safe from any thread); OutOfScope when
        the prompt does not fit the base model's context window. `use_adapter=False`
        answers with the base model alone (eval's comparison); `max_new_tokens` caps it
        below the evaluated cap (an agent-level specialist's first tokens say its action)."""
        task = self.tasks[task_id]
        if task.answered_by is not None:
            found = self.answer(task.answered_by, request, use_adapter, max_new_tokens)
            problem = found.problem or answer_problem(task, request, found.text, found.message)
            return replace(found, task_id=task_id, problem=problem)
        if task.kind in HEAD_KINDS:
            return self._head_answer(task, request)
        spec = self._models[task.base_path]
        prompt = build_prompt(spec.tokenizer, request, task.pruning)
        asked = request.params.get("max_completion_tokens") or request.params.get("max_tokens")
        cap = min(task.max_new_tokens, asked) if isinstance(asked, int) else task.max_new_tokens
        cap = min(cap, max_new_tokens or cap)
        key = (task_id, prompt, cap)
        if use_adapter and task.agent:
            with self.lock:
                if (known := self.memo.get(key)) is not None:
                    return known
            found = self._generate(task, request, prompt, cap, use_adapter)
            with self.lock:
                self.memo[key] = found
                while len(self.memo) > MEMO_SIZE:
                    self.memo.popitem(last=False)
            return found
        return self._generate(task, request, prompt, cap, use_adapter)

    def _generate(
        self, task: TaskRuntime, request: ChatRequest, prompt: str, cap: int, use_adapter: bool
    ) -> Answer:
        task_id = task.id
        spec = self._models[task.base_path]
        prompt_tokens = len(spec.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        window = spec.context_window
        if prompt_tokens + cap > window:
            raise OutOfScope(f"prompt of {prompt_tokens} tokens + {cap} to generate > {window}")
        t0 = time.perf_counter()
        name = self._adapter_name[task_id]
        grammar, failed = self._grammar(task, request, spec)
        shape = "tool_call" if task.agent else task.output_shape  # tool_call: least likely token
        if spec.remote:  # a server batches concurrent calls itself: no lock, no selection
            generated = spec.answer(prompt, use_adapter, cap, shape, grammar, adapter=name)
        else:
            with self.lock:
                spec.select(name)
                generated = spec.answer(prompt, use_adapter, cap, shape, grammar)
        latency_ms = (time.perf_counter() - t0) * 1000  # includes waiting for the lock
        text, stopped = _stop_at(generated.text, request.params.get("stop"))
        tokens = generated.output_tokens
        message = _legacy(parse_output(text, offered_specs(request)), request)
        # Hitting the cap exactly is read as cut off: an end-of-turn token landing on the
        # last step is rare and only mislabels the finish reason.
        finish = _call_finish(message) or ("length" if tokens >= cap and not stopped else "stop")
        return Answer(
            task_id=task_id,
            text=text,
            message=message,
            finish_reason=finish,
            problem=answer_problem(task, request, text, message),
            prompt_tokens=prompt_tokens,
            output_tokens=tokens,
            latency_ms=round(latency_ms, 3),
            confidence=generated.confidence,
            unconstrained=failed,
        )

    def _grammar(
        self, task: TaskRuntime, request: ChatRequest, spec: Any
    ) -> tuple[dict | None, str | None]:
        """The grammar this answer is generated under (slmify.constrained), or None: not
        constrained by the recipe, a label or free text, or a grammar that does not compile
        (the reason returned too, kept in `unconstrained`, logged once per task and reason)."""
        from slmify.constrained import compiled_grammar

        if not self.constrained.get(task.id):
            return None, None
        tools, fmt = offered_specs(request), response_format(request)
        grammar, failed = compiled_grammar(
            spec, task.output_shape, tools, forced_tool(request), fmt
        )
        if failed and self.unconstrained.get(task.id) != failed:
            log.warning("task %s generates unconstrained: %s", task.id, failed)
            self.unconstrained[task.id] = failed
        return grammar, failed

    def _head_answer(self, task: TaskRuntime, request: ChatRequest) -> Answer:
        """A head's answer: a label head's most likely label, or a field head's most likely
        tool call or JSON; its probability is the confidence."""
        t0 = time.perf_counter()
        problem = None
        with self.lock:  # the head's embedder is not shared across threads
            if task.kind == "label-head":
                text, probability = self._heads[task.id].predict(request)
            else:
                found, probability, problem = self._heads[task.id].predict(request)
                text = found or ""
        message = _legacy(parse_output(text, offered_specs(request)), request)
        finish = _call_finish(message) or "stop"
        return Answer(
            task_id=task.id,
            text=text,
            message=message,
            finish_reason=finish,
            problem=problem or answer_problem(task, request, text, message),
            prompt_tokens=0,
            output_tokens=1,
            latency_ms=round((time.perf_counter() - t0) * 1000, 3),
            confidence=probability,
        )


# -- the OpenAI shapes --------------------------------------------------------------------


def completion_body(answer: Answer) -> dict[str, Any]:
    """A specialist's answer as an OpenAI `chat.completion` with usage."""
    return {
        "id": f"chatcmpl-slmify-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": answer.task_id,
        "choices": [{"index": 0, "message": answer.message, "finish_reason": answer.finish_reason}],
        "usage": {
            "prompt_tokens": answer.prompt_tokens,
            "completion_tokens": answer.output_tokens,
            "total_tokens": answer.prompt_tokens + answer.output_tokens,
        },
    }
