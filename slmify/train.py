"""S5 train: one LoRA specialist per task, from a recipe, on CPU or GPU.

Reads WORKSPACE/cluster/tasks.json and WORKSPACE/assignments.jsonl (which task each call
belongs to) and the calls from the store (curated training calls; status-ok calls when
nothing is curated yet). For each task it writes WORKSPACE/specialists/<task id>/:
`recipe.yaml` (resolved), `pruning.json`, `splits.json`, `dataset/`, `adapter/` (peft
save_pretrained, plus the tokenizer), `metrics.json` and `result.json`; and the run's
summary (`TrainSummary`, what `--json` prints) in WORKSPACE/specialists/summary.json.

Each task is an independent job: it reads the workspace and writes only its own folder
(and the summary, whole, by atomic rename: of jobs sharing a workspace the last one's
stays), so `slmify train --task ID` can run as one job of a CI matrix per task. An interrupted
run resumes from the task's last checkpoint (`checkpoints/`, removed once it is done).
"""

from __future__ import annotations

import resource
import shutil
import time
from pathlib import Path
from typing import Any

from slmify.budget import Bars, budget_callback, learning_curve, plan_steps, stop_reason, tokens_in
from slmify.datasets import build_task_dataset, tokenize_rows
from slmify.errors import SlmifyError
from slmify.models import (
    ModelError,
    TrainPlan,
    describe_base,
    load_for_training,
    pick_device,
    plan_training,
    resolve_base,
    screen_context,
    screen_model,
)
from slmify.recipes import Recipe, save_resolved
from slmify.schema import CallRecord, SpecialistResult, TaskCluster
from slmify.schema_stages import TrainSummary
from slmify.workspace import RECIPE_FILE, Workspace, write_metrics_file


class TrainError(SlmifyError, RuntimeError):
    """Training inputs that cannot be used; the message names the file and line."""


# -- inputs -------------------------------------------------------------------------------


def gather_calls(ws: Workspace, assignment: dict[str, str]) -> tuple[dict[str, list], str]:
    """Calls per task id from the store, and which calls they are (curated or not)."""
    with ws.open_store() as st:
        stored = [s.record for s in st.iter_calls(training_only=True)]
        source = "curated training calls"
        if not stored:
            stored = [s.record for s in st.iter_calls() if s.record.status == "ok"]
            source = "status-ok calls (nothing curated yet: run curation for scrubbed data)"
    by_task: dict[str, list[CallRecord]] = {}
    unusable = 0
    for rec in stored:
        if rec.id not in assignment:
            continue
        if not rec.request.messages or rec.response is None:
            unusable += 1  # nothing to learn from: no prompt, or no answer
            continue
        by_task.setdefault(assignment[rec.id], []).append(rec)
    if unusable:
        source += f"; {unusable} assigned call(s) without messages or answer left out"
    return by_task, source


# -- the run ------------------------------------------------------------------------------


def train_all(
    ws: Workspace,
    recipe: Recipe,
    task_id: str | None = None,
    progress: bool = True,
    only_agents: bool = False,
) -> TrainSummary:
    """Train every task and agent-level specialist (or `task_id`'s, or with `only_agents`
    the agent-level ones); one SpecialistResult each in the summary, which is kept in
    specialists/summary.json."""
    tasks, assignment = ws.tasks(), ws.assigned()
    if task_id is not None or only_agents:
        tasks = [t for t in tasks if t.id == task_id]
    by_task, source = gather_calls(ws, assignment)
    agents = agent_jobs(ws, by_task, recipe, task_id)
    if task_id is not None and not tasks and not agents:
        from slmify.agent import AGENT_PREFIX

        if task_id.startswith(AGENT_PREFIX) and recipe.agent.specialist == "off":
            raise TrainError(
                f"{task_id}: agent-level specialists are off in recipe {recipe.name!r} "
                "(agent.specialist: off); add --set agent.specialist=auto"
            )
        raise TrainError(f"no task {task_id!r} in {ws.tasks_file()}")
    if not tasks and not agents:  # only_agents, and no agent has two tasks: nothing to do
        return TrainSummary(
            recipe=recipe.name,
            base_model=recipe.model.base,
            device="none",
            plan=[],
            calls=source,
            trained=0,
            skipped=0,
            validation_loss={},
            heads={},
            tasks=[],
        )
    # 1. Locate the base model (materializing an embedded GGUF once) and screen it.
    import torch

    device = pick_device(recipe)
    location = resolve_base(recipe.model.base)
    info = describe_base(recipe.model.base, location, recipe.model.license)
    plan = plan_training(info, recipe, device)
    if device == "cpu":
        torch.set_num_threads(plan.threads)
    refusals = screen_model(info, recipe, plan)
    if refusals:
        raise ModelError("base model refused: " + "; ".join(refusals))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(location)
    if recipe.model.chat_template:
        tokenizer.chat_template = recipe.model.chat_template
    if not tokenizer.chat_template:
        raise ModelError(
            f"{recipe.model.base} has no chat template (a pretrained-only checkpoint?); "
            "give one as model.chat_template in the recipe (see recipes/cpu-gemma3-270m.yaml)"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # 2. One independent job per task.
    results = []
    jobs = [(t, by_task.get(t.id, [])) for t in tasks] + list(agents.values())
    with Bars(progress, len(jobs)) as bars:
        for task, calls in jobs:
            out = ws.specialist_dir(task.id)
            out.mkdir(parents=True, exist_ok=True)
            bars.start(task.id)
            result = train_task(task, calls, recipe, info, tokenizer, plan, out, bars)
            ws.write_result(result)
            results.append(result)
            bars.done()
    summary = TrainSummary(
        recipe=recipe.name,
        base_model=recipe.model.base,
        device=device,
        plan=list(plan.notes),
        calls=source,
        trained=sum(r.status == "trained" for r in results),
        skipped=sum(r.status == "skipped" for r in results),
        validation_loss={
            r.id: f"base {m['base_validation_loss']:.3f} -> specialist {m['validation_loss']:.3f}"
            for r in results
            if "base_validation_loss" in (m := r.metrics)
        },
        heads={
            r.id: f"{r.kind}, cross-validated accuracy {m['cv_accuracy']}"
            for r in results
            if r.kind != "lora" and (m := r.metrics)
        },
        tasks=results,
    )
    ws.write_train_summary(summary)
    return summary


def agent_jobs(
    ws: Workspace, by_task: dict[str, list[CallRecord]], recipe: Recipe, task_id: str | None
) -> dict[str, tuple[TaskCluster, list[CallRecord]]]:
    """The agent-level specialists to train (slmify.agent; all of them, or `task_id`'s), each
    as a task of free text over all its agent's calls; their plans are written as planned."""
    from slmify.agent import plan_agents

    if recipe.agent.specialist == "off":
        return {}
    out = {}
    for agent, (plan, calls) in plan_agents(by_task).items():
        if task_id is not None and agent != task_id:
            continue
        label = f"every call of agent {plan.identity}, {len(plan.actions)} actions"
        task = TaskCluster(id=agent, label=label, output_shape="text", calls=len(calls), share=0.0)
        out[agent] = (task, calls)
        ws.write_agent_plan(agent, plan)
    return out


def train_task(
    task: TaskCluster,
    calls: list[CallRecord],
    recipe: Recipe,
    info: Any,
    tokenizer: Any,
    plan: TrainPlan,
    out: Path,
    bars: Any = None,
) -> SpecialistResult:
    """Build the task's dataset, train its LoRA adapter, measure it against the base."""

    def skipped(reason: str) -> SpecialistResult:
        return SpecialistResult(
            id=task.id, status="skipped", reason=reason, base_model=recipe.model.base
        )

    cfg = recipe.dataset
    if len(calls) < cfg.min_calls:
        return skipped(f"{len(calls)} calls, fewer than dataset.min_calls={cfg.min_calls}")
    save_resolved(recipe, out / RECIPE_FILE)
    rows = build_task_dataset(calls, tokenizer, cfg, out)
    if head := _train_head(task, calls, recipe, rows, out):
        return head
    longest = max(r["prompt_tokens"] + r["completion_tokens"] for s in rows.values() for r in s)
    if reason := screen_context(info, longest):
        return skipped(reason)
    train_ds, train_long = tokenize_rows(
        rows["train"], tokenizer, cfg.max_length, cfg.max_train_examples
    )
    val_ds, val_long = tokenize_rows(
        rows["validation"], tokenizer, cfg.max_length, cfg.max_eval_examples
    )
    if len(train_ds) == 0 or len(val_ds) == 0:
        return skipped(
            f"after the split and dataset.max_length={cfg.max_length}: {len(train_ds)} train, "
            f"{len(val_ds)} validation examples ({train_long + val_long} too long)"
        )
    metrics = _fit(recipe, info, tokenizer, plan, out, train_ds, val_ds, bars)
    metrics.update(
        calls=len(calls),
        split_calls={s: len(r) for s, r in rows.items()},
        dropped_too_long={"train": train_long, "validation": val_long},
        prompt_tokens_mean=sum(r["prompt_tokens"] for r in rows["train"])
        / max(1, len(rows["train"])),
    )
    write_metrics_file(out, metrics)
    return SpecialistResult(
        id=task.id,
        status="trained",
        adapter=str(out / "adapter"),
        base_model=recipe.model.base,
        metrics=metrics,
    )


def _train_head(task, calls, recipe, rows, out) -> SpecialistResult | None:  # noqa: ANN001
    """The task's label or field head when the recipe asks for one and the task's answers
    suit it (trained on the train and validation splits); None: train a LoRA. Why a head
    was not kept goes to `out`/head-skipped.txt."""
    ids = {r["id"] for s in ("train", "validation") for r in rows[s]}
    if task.output_shape == "label" and recipe.label.specialist == "head":
        from slmify.labelhead import train_head

        kind, (metrics, why_not) = "label-head", train_head(calls, ids, out)
    elif task.output_shape in ("tool_call", "json") and recipe.structured.specialist == "head":
        from slmify.fieldfit import train_field_head

        min_cv = recipe.structured.min_cv_accuracy
        kind, (metrics, why_not) = "field-head", train_field_head(calls, ids, out, min_cv)
    else:
        return None
    if why_not is not None:
        (out / "head-skipped.txt").write_text(why_not + "\n", encoding="utf-8")
        return None
    (out / "head-skipped.txt").unlink(missing_ok=True)
    write_metrics_file(out, metrics)
    return SpecialistResult(
        id=task.id, status="trained", kind=kind, head=str(out / "head"), metrics=metrics
    )


def _fit(recipe, info, tokenizer, plan, out, train_ds, val_ds, bars) -> dict[str, Any]:  # noqa: ANN001
    """LoRA training with trl's SFTTrainer, epochs within the recipe's budget, stopping when
    validation loss stops falling; the best checkpoint by validation loss is the adapter kept.
    Returns base and adapter validation loss, learning curves, speed and memory."""
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import EarlyStoppingCallback, PrinterCallback
    from trl import SFTTrainer

    t, device = recipe.train, plan.device
    model = load_for_training(info.path, recipe, plan)
    if recipe.quantization.load_in_4bit:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=t.gradient_checkpointing
        )
    model = get_peft_model(model, lora_config(recipe, model, info.layers))
    ckpt_dir = out / "checkpoints"
    resume = _resumable(ckpt_dir, out / RECIPE_FILE)
    budget = budget_callback(t.max_minutes)
    callbacks = [budget, *([bars.callback()] if bars is not None and bars.enabled else [])]
    if t.patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=t.patience))
    trainer = SFTTrainer(
        model=model,
        args=sft_config(recipe, ckpt_dir, plan),
        train_dataset=train_ds,
        eval_dataset=val_ds,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    # With tqdm off the Trainer prints its logs to stdout, which `--json` keeps for itself.
    trainer.remove_callback(PrinterCallback)
    with model.disable_adapter():  # the base model on exactly the same validation examples
        start = time.perf_counter()
        base_loss = trainer.evaluate()["eval_loss"]
        eval_s = time.perf_counter() - start
    steps = plan_steps(
        t, plan.batch_size, len(train_ds), tokens_in(val_ds), tokens_in(train_ds), eval_s
    )
    # The Trainer reads these when training starts; save and eval steps must coincide for
    # the best checkpoint to be one that was evaluated.
    trainer.args.max_steps = steps["steps"]
    trainer.args.eval_steps = trainer.args.save_steps = steps["eval_steps"]
    trainer.args.warmup_steps = steps["warmup_steps"]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=resume)
    wall = time.perf_counter() - start
    state = trainer.state  # the best checkpoint is loaded: its loss is the adapter's
    val_loss = (
        state.best_metric if state.best_metric is not None else trainer.evaluate()["eval_loss"]
    )
    model.save_pretrained(out / "adapter")
    tokenizer.save_pretrained(out / "adapter")
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    tokens, done = int(state.num_input_tokens_seen), state.global_step
    curve = learning_curve(state.log_history, base_loss)
    best = state.best_model_checkpoint
    return {
        "train_loss": output.training_loss,
        "train_loss_last": curve["train"][-1][1] if curve["train"] else None,
        "validation_loss": val_loss,
        "base_validation_loss": base_loss,
        "train_examples": len(train_ds),
        "validation_examples": len(val_ds),
        "steps": done,
        "best_step": int(best.rsplit("-", 1)[1]) if best else done,
        "epochs": round(done * plan.batch_size * t.grad_accum / len(train_ds), 2),
        "stopped": stop_reason(budget, callbacks[-1], t, done, steps),
        **{f"planned_{k}": v for k, v in steps.items()},
        "s_per_step": budget.step_s(),
        "resumed_from": resume,
        "train_tokens": tokens,
        "tokens_per_s": tokens / wall if wall else None,
        "wall_s": wall,
        "curve": curve,
        **peak_memory(device),
        "device": device,
        "dtype": plan.dtype,
        "plan": list(plan.notes),
        "versions": library_versions(),
    }


def library_versions() -> dict[str, str]:
    """The versions an adapter was trained with, recorded beside it."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "peft", "trl", "slmify"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def lora_config(recipe: Recipe, model: Any, layers: int) -> Any:
    import torch
    from peft import LoraConfig

    lo = recipe.lora
    targets, last = lo.target_modules, None
    if lo.last_layers:
        last = list(range(max(0, layers - lo.last_layers), layers))
        # peft takes layers_to_transform only with module names, not "all-linear".
        if targets == "all-linear":
            targets = sorted(
                {
                    name.rsplit(".", 1)[-1]
                    for name, mod in model.named_modules()
                    if isinstance(mod, torch.nn.Linear) and ".layers." in name
                }
            )
    return LoraConfig(
        r=lo.r,
        lora_alpha=lo.alpha,
        lora_dropout=lo.dropout,
        target_modules=targets,
        layers_to_transform=last,
        task_type="CAUSAL_LM",
    )


def sft_config(recipe: Recipe, output_dir: Path, plan: TrainPlan) -> Any:
    """trl's SFTConfig for the recipe; `_fit` sets max_steps and eval/save steps once it
    has measured the machine (`plan_steps`)."""
    from trl import SFTConfig

    t, device = recipe.train, plan.device
    return SFTConfig(
        output_dir=str(output_dir),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        per_device_train_batch_size=plan.batch_size,
        per_device_eval_batch_size=plan.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        warmup_steps=0,  # set by _fit from the planned steps
        # Under a time budget training may stop at any step: no decay that assumes an end.
        lr_scheduler_type="constant_with_warmup" if t.max_minutes else "linear",
        gradient_checkpointing=t.gradient_checkpointing,
        bf16=device == "cuda" and (plan.dtype == "bfloat16" or recipe.quantization.load_in_4bit),
        use_cpu=device == "cpu",
        seed=t.seed,
        logging_steps=t.logging_steps,
        eval_strategy="steps",
        save_strategy="steps",
        eval_steps=t.eval_steps if t.eval_steps != "auto" else 1,
        save_steps=t.eval_steps if t.eval_steps != "auto" else 1,
        save_total_limit=1,  # the Trainer keeps the best checkpoint besides the last
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        report_to="none",
        disable_tqdm=True,
        completion_only_loss=True,
        max_length=recipe.dataset.max_length,
        include_num_input_tokens_seen="non_padding",
        # Batches of similar lengths: less padding, so fewer wasted tokens on CPU.
        train_sampling_strategy="group_by_length",
    )


def _resumable(ckpt_dir: Path, recipe_file: Path) -> str | None:
    """The last checkpoint, if it was made with the same resolved recipe."""
    from transformers.trainer_utils import get_last_checkpoint

    stamp = ckpt_dir / RECIPE_FILE
    if ckpt_dir.exists() and stamp.exists() and stamp.read_text() == recipe_file.read_text():
        return get_last_checkpoint(str(ckpt_dir))
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    ckpt_dir.mkdir(parents=True)
    shutil.copy(recipe_file, stamp)
    return None


def peak_memory(device: str) -> dict[str, Any]:
    """Peak memory: CUDA allocated on GPU; on CPU the process's peak RSS so far."""
    if device == "cuda":
        import torch

        return {
            "peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20,
            "peak_memory_kind": "cuda max allocated",
        }
    return {
        "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_memory_kind": "process peak RSS",
    }
