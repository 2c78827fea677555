"""S5 train: one LoRA specialist per task, from a recipe, on CPU or GPU.

Reads WORKSPACE/cluster/tasks.json and WORKSPACE/assignments.jsonl (which task each call
belongs to) and the calls from the store (curated training calls; status-ok calls when
nothing is curated yet). For each task it writes WORKSPACE/specialists/<task id>/:
`recipe.yaml` (resolved), `pruning.json`, `splits.json`, `dataset/`, `adapter/` (peft
save_pretrained, plus the tokenizer), `metrics.json` and `result.json`.

Each task is an independent job: it reads the workspace and writes only its own folder,
so `slmify train --task ID` can run as one job of a CI matrix per task. An interrupted
run resumes from the task's last checkpoint (`checkpoints/`, removed once it is done).
"""

from __future__ import annotations

import json
import resource
import shutil
import time
from pathlib import Path
from typing import Any

from slmify.datasets import build_task_dataset, hash_unit
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
from slmify.workspace import Workspace


class TrainError(SlmifyError, RuntimeError):
    """Training inputs that cannot be used; the message names the file and line."""


# -- inputs -------------------------------------------------------------------------------


def load_tasks(ws: Workspace) -> tuple[list[TaskCluster], dict[str, str]]:
    """The tasks, and the task id of each assigned call id."""
    tasks_file, assign_file = ws.root / "cluster" / "tasks.json", ws.root / "assignments.jsonl"
    for f in (tasks_file, assign_file):
        if not f.exists():
            raise TrainError(f"{f} not found; run `slmify cluster` first")
    try:
        doc = json.loads(tasks_file.read_text(encoding="utf-8"))
        tasks = [TaskCluster.model_validate(t) for t in doc["tasks"]]
    except (ValueError, KeyError, TypeError) as e:
        raise TrainError(f"{tasks_file}: not a tasks file ({e})") from None
    assignment: dict[str, str] = {}
    with assign_file.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if row["task"] is not None:
                    assignment[str(row["id"])] = str(row["task"])
            except (ValueError, KeyError, TypeError) as e:
                raise TrainError(f"{assign_file}:{lineno}: bad assignment line ({e})") from None
    return tasks, assignment


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
    ws: Workspace, recipe: Recipe, task_id: str | None = None, progress: bool = True
) -> dict[str, Any]:
    """Train every task (or `task_id`); one SpecialistResult per task in the summary."""
    tasks, assignment = load_tasks(ws)
    if task_id is not None:
        tasks = [t for t in tasks if t.id == task_id]
        if not tasks:
            raise TrainError(f"no task {task_id!r} in {ws.root / 'cluster' / 'tasks.json'}")
    by_task, source = gather_calls(ws, assignment)
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
    with _Bars(progress, len(tasks)) as bars:
        for task in tasks:
            out = ws.root / "specialists" / task.id
            out.mkdir(parents=True, exist_ok=True)
            bars.start(task.id)
            result = train_task(
                task, by_task.get(task.id, []), recipe, info, tokenizer, plan, out, bars
            )
            (out / "result.json").write_text(result.model_dump_json(indent=2))
            results.append(result.model_dump(mode="json"))
            bars.done()
    return {
        "recipe": recipe.name,
        "base_model": recipe.model.base,
        "device": device,
        "plan": list(plan.notes),
        "calls": source,
        "trained": sum(r["status"] == "trained" for r in results),
        "skipped": sum(r["status"] == "skipped" for r in results),
        "validation_loss": {
            r[
                "id"
            ]: f"base {m['base_validation_loss']:.3f} -> specialist {m['validation_loss']:.3f}"
            for r in results
            if (m := r["metrics"])
        },
        "tasks": results,
    }


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
    save_resolved(recipe, out / "recipe.yaml")
    rows = build_task_dataset(calls, tokenizer, cfg, out)
    longest = max(r["prompt_tokens"] + r["completion_tokens"] for s in rows.values() for r in s)
    if reason := screen_context(info, longest):
        return skipped(reason)
    train_ds, train_long = _tokenized(
        rows["train"], tokenizer, cfg.max_length, cfg.max_train_examples
    )
    val_ds, val_long = _tokenized(
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
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return SpecialistResult(
        id=task.id,
        status="trained",
        adapter=str(out / "adapter"),
        base_model=recipe.model.base,
        metrics=metrics,
    )


def _tokenized(
    rows: list[dict], tokenizer: Any, max_length: int, cap: int | None
) -> tuple[Any, int]:
    """input_ids + completion_mask (loss on the answer only), long examples left out.

    Prompt and completion are tokenized apart and joined, so the completion starts
    exactly where the prompt ends (trl's own tokenization can merge tokens there).
    A hash of the call id picks the capped subset, the same on every run.
    """
    from datasets import Dataset

    fitting = [r for r in rows if r["prompt_tokens"] + r["completion_tokens"] <= max_length]
    fitting.sort(key=lambda r: hash_unit(r["id"]))
    items = []
    for r in fitting[:cap]:
        p = tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]
        c = tokenizer(r["completion"], add_special_tokens=False)["input_ids"]
        items.append({"input_ids": p + c, "completion_mask": [0] * len(p) + [1] * len(c)})
    return Dataset.from_list(items), len(rows) - len(fitting)


def _fit(recipe, info, tokenizer, plan, out, train_ds, val_ds, bars) -> dict[str, Any]:  # noqa: ANN001
    """LoRA training with trl's SFTTrainer; base and adapter validation loss, speed, memory."""
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import PrinterCallback
    from trl import SFTTrainer

    device = plan.device
    model = load_for_training(info.path, recipe, plan)
    if recipe.quantization.load_in_4bit:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=recipe.train.gradient_checkpointing
        )
    model = get_peft_model(model, lora_config(recipe, model, info.layers))
    ckpt_dir = out / "checkpoints"
    resume = _resumable(ckpt_dir, out / "recipe.yaml")
    callbacks = [bars.callback()] if bars is not None and bars.enabled else []
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
        base_loss = trainer.evaluate()["eval_loss"]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=resume)
    wall = time.perf_counter() - start
    val_loss = trainer.evaluate()["eval_loss"]
    model.save_pretrained(out / "adapter")
    tokenizer.save_pretrained(out / "adapter")
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    tokens = int(trainer.state.num_input_tokens_seen)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "train_loss": output.training_loss,
        "train_loss_last": losses[-1] if losses else None,
        "validation_loss": val_loss,
        "base_validation_loss": base_loss,
        "train_examples": len(train_ds),
        "validation_examples": len(val_ds),
        "steps": trainer.state.global_step,
        "resumed_from": resume,
        "train_tokens": tokens,
        "tokens_per_s": tokens / wall if wall else None,
        "wall_s": wall,
        **peak_memory(device),
        "device": device,
        "dtype": plan.dtype,
        "plan": list(plan.notes),
    }


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
    from trl import SFTConfig

    t, device = recipe.train, plan.device
    return SFTConfig(
        output_dir=str(output_dir),
        max_steps=t.max_steps,
        per_device_train_batch_size=plan.batch_size,
        per_device_eval_batch_size=plan.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        warmup_steps=t.warmup_ratio,  # below 1: a fraction of max_steps
        gradient_checkpointing=t.gradient_checkpointing,
        bf16=device == "cuda" and (plan.dtype == "bfloat16" or recipe.quantization.load_in_4bit),
        use_cpu=device == "cpu",
        seed=t.seed,
        logging_steps=t.logging_steps,
        save_steps=t.save_steps,
        save_total_limit=1,
        eval_strategy="no",
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

    stamp = ckpt_dir / "recipe.yaml"
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


class _Bars:
    """A rich progress bar over tasks and one over the current task's steps."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total = enabled, total

    def __enter__(self) -> _Bars:
        if self.enabled:
            from rich.progress import Progress

            self.progress = Progress(transient=False)
            self.progress.start()
            self.overall = self.progress.add_task("tasks", total=self.total)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.progress.stop()

    def start(self, task_id: str) -> None:
        if self.enabled:
            self.current = self.progress.add_task(task_id, total=None)

    def done(self) -> None:
        if self.enabled:
            task = next(t for t in self.progress.tasks if t.id == self.current)
            total = task.total or 1
            self.progress.update(self.current, completed=total, total=total)
            self.progress.advance(self.overall)

    def callback(self) -> Any:
        from transformers import TrainerCallback

        bars = self

        class StepBar(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):  # noqa: ANN001, ANN201
                bars.progress.update(
                    bars.current, total=state.max_steps, completed=state.global_step
                )

        return StepBar()
