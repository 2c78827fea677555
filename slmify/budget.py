"""How long a task trains: the steps planned for the recipe's budget on this machine, the
callback that holds training to it, why training stopped, the learning curve, and the
progress bars over tasks and steps.

Reads the recipe's `train:` section and the validation pass `slmify.train` has just timed;
writes nothing (train.py records the plan, the stop reason and the measured seconds per
step in metrics.json).
"""

from __future__ import annotations

import math
import time
from typing import Any


def tokens_in(ds: Any) -> int:
    return sum(len(ids) for ids in ds["input_ids"])


def plan_steps(
    t: Any, batch: int, examples: int, val_tokens: int, train_tokens: int, eval_s: float
) -> dict[str, Any]:
    """Optimizer steps (epochs over the train split, capped by max_steps), and the steps
    expected to fit max_minutes, which set the validation interval and the warmup.

    A step's time is estimated from the validation pass just measured: forward time per
    token, times 3 for the backward pass (the usual 1:2 split), times a step's tokens.
    The estimate never shortens training itself: on a shared CPU one pass can be 4x off
    (measured on 2 busy cores), so the deadline callback ends training, and the learning
    rate stays constant after warmup when a budget is set, right wherever it stops.
    """
    per_step = batch * t.grad_accum
    steps = max(1, math.ceil(t.epochs * math.ceil(examples / per_step)))
    why = f"{t.epochs:g} epochs of {examples} examples"
    step_s = 3 * eval_s / max(1, val_tokens) * train_tokens / examples * per_step
    if t.max_steps and t.max_steps < steps:
        steps, why = t.max_steps, f"train.max_steps={t.max_steps}"
    passes = 6  # validation passes when eval_steps is auto: enough to see the curve turn
    fit = steps
    if t.max_minutes:
        fit = min(steps, max(1, int((t.max_minutes * 60 - passes * eval_s) / step_s)))
    every = t.eval_steps if t.eval_steps != "auto" else max(1, math.ceil(fit / passes))
    return {
        "steps": steps,
        "steps_in_budget": fit,
        "eval_steps": every,
        "warmup_steps": int(t.warmup_ratio * fit),  # rounded down: 1 step is never all warmup
        "why": why,
        "s_per_step": round(step_s, 3),
    }


def stop_reason(budget: Any, early: Any, t: Any, done: int, steps: dict) -> str:
    from transformers import EarlyStoppingCallback

    if budget.stopped:
        return f"time budget: train.max_minutes={t.max_minutes:g} reached"
    if isinstance(early, EarlyStoppingCallback) and done < steps["steps"]:
        return f"early stop: no lower validation loss in {t.patience} passes"
    return f"planned steps done ({steps['why']})"


def budget_callback(minutes: float | None) -> Any:
    """A TrainerCallback that stops training when the next step would pass the deadline,
    and always validates and checkpoints the last step (so the best checkpoint, which
    `load_best_model_at_end` keeps, is chosen among every step trained)."""
    from transformers import TrainerCallback

    class Budget(TrainerCallback):
        def __init__(self) -> None:
            self.seconds = minutes * 60 if minutes else None
            self.stopped, self.steps, self.start = False, 0, time.perf_counter()

        def on_train_begin(self, args, state, control, **kw):  # noqa: ANN001, ANN201
            self.start, self.steps = time.perf_counter(), 0

        def step_s(self) -> float | None:
            """Measured seconds per step, validation passes included."""
            if not self.steps:
                return None
            return round((time.perf_counter() - self.start) / self.steps, 3)

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001, ANN201
            self.steps += 1
            elapsed = time.perf_counter() - self.start
            late = self.seconds is not None and elapsed * (1 + 1 / self.steps) > self.seconds
            if late and state.global_step < state.max_steps:
                self.stopped = control.should_training_stop = True
            if late or state.global_step >= state.max_steps:
                control.should_evaluate = control.should_save = True

    return Budget()


def learning_curve(log_history: list[dict], base_loss: float) -> dict[str, list[list[float]]]:
    """[step, loss] pairs: train loss per logging interval, validation loss per pass; step 0
    is the base model's, which LoRA's zero-initialized B leaves unchanged."""
    evals = [[h["step"], h["eval_loss"]] for h in log_history if "eval_loss" in h]
    return {
        "train": [[h["step"], h["loss"]] for h in log_history if "loss" in h],
        "validation": [[0, base_loss], *(e for e in evals if e[0] > 0)],
    }


class Bars:
    """Progress over tasks and the current task's steps: rich bars on a terminal; else (a
    piped log, CI) a plain line when a task starts and ends and every
    $SLMIFY_PROGRESS_SECONDS (30) seconds between: step, loss, tokens/s, time left."""

    def __init__(self, enabled: bool, total: int):
        import os
        import sys

        self.enabled, self.total, self.finished = enabled, total, 0
        self.plain = enabled and not sys.stdout.isatty()
        self.every = float(os.environ.get("SLMIFY_PROGRESS_SECONDS") or 30)

    def __enter__(self) -> Bars:
        if self.enabled and not self.plain:
            from rich.progress import Progress

            self.progress = Progress(transient=False)
            self.progress.start()
            self.overall = self.progress.add_task("tasks", total=self.total)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled and not self.plain:
            self.progress.stop()

    def say(self, line: str) -> None:
        print(f"train {self.task_id}: {line}", flush=True)

    def start(self, task_id: str) -> None:
        self.task_id = task_id
        if self.plain:
            self.say(f"task {self.finished + 1}/{self.total} started")
        elif self.enabled:
            self.current = self.progress.add_task(task_id, total=None)

    def done(self) -> None:
        self.finished += 1
        if self.plain:
            self.say(f"task {self.finished}/{self.total} done")
        elif self.enabled:
            task = next(t for t in self.progress.tasks if t.id == self.current)
            total = task.total or 1
            self.progress.update(self.current, completed=total, total=total)
            self.progress.advance(self.overall)

    def step_line(self, state: Any, started: float, first_step: int, tokens0: int) -> str:
        """`step 12/40, loss 1.234, 850 tokens/s, 3m20s left` (time left at this pace)."""
        elapsed = time.perf_counter() - started
        done = state.global_step - first_step
        losses = [h["loss"] for h in state.log_history if "loss" in h]
        left = (state.max_steps - state.global_step) * elapsed / done if done else None
        tokens = (state.num_input_tokens_seen or 0) - tokens0
        return (
            f"step {state.global_step}/{state.max_steps}"
            + (f", loss {losses[-1]:.4f}" if losses else "")
            + (f", {tokens / elapsed:.0f} tokens/s" if tokens and elapsed else "")
            + (f", {int(left // 60)}m{int(left % 60):02d}s left" if left is not None else "")
        )

    def callback(self) -> Any:
        from transformers import TrainerCallback

        bars = self

        class StepBar(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):  # noqa: ANN001, ANN201
                self.started = self.last = time.perf_counter()
                self.first, self.tokens0 = state.global_step, state.num_input_tokens_seen or 0

            def on_step_end(self, args, state, control, **kw):  # noqa: ANN001, ANN201
                if not bars.plain:
                    bars.progress.update(
                        bars.current, total=state.max_steps, completed=state.global_step
                    )
                    return
                now = time.perf_counter()
                if now - self.last >= bars.every or state.global_step >= state.max_steps:
                    self.last = now
                    bars.say(bars.step_line(state, self.started, self.first, self.tokens0))

        return StepBar()
