"""Datasets and training: splits, pruning, the tool-call convention, LoRA on a tiny model."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import dataset
from typer.testing import CliRunner

from slmify.cli import app
from slmify.collect import import_files
from slmify.datasets import (
    build_prompt,
    build_task_dataset,
    parse_output,
    render_assistant,
    split_of,
)
from slmify.recipes import DatasetConfig
from slmify.schema import CallRecord, ContextPolicy, PromptPruning, TaskCluster, message_text
from slmify.store import open_store
from slmify.workspace import Workspace, read_splits_file

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tiny_tokenizer(corpus: list[str]) -> Any:
    """A byte-level BPE trained in memory on the test's own calls, with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|im_start|>", "<|im_end|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>")
    fast.chat_template = CHATML
    return fast


@pytest.fixture(scope="module")
def tau_calls(tmp_path_factory: pytest.TempPathFactory) -> list[CallRecord]:
    """The first 240 real tau-airline calls (about 20 sessions) in a store."""
    src = dataset("tau-airline")
    folder = tmp_path_factory.mktemp("tau")
    sample = folder / "sample.jsonl"
    with gzip.open(src, "rt") as f, sample.open("w") as out:
        out.writelines(line for _, line in zip(range(240), f, strict=False))
    with open_store(str(folder / "calls.db")) as st:
        import_files(st, [sample], folder / "rejects.jsonl", progress=False)
        return [s.record for s in st.iter_calls()]


@pytest.fixture(scope="module")
def tiny_model(tau_calls: list[CallRecord], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama (hidden 16) saved as a local model folder, with its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    corpus = [
        json.dumps(c.request.messages[-3:]) + render_assistant(c.response.message)
        for c in tau_calls
    ]
    tokenizer = _tiny_tokenizer(corpus)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=65536,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_tool_call_convention_round_trips() -> None:
    message = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "c1",
                "type": "function",
                "function": {"name": "get_user_details", "arguments": '{"user_id":"mia_li_3668"}'},
            }
        ],
    }
    text = render_assistant(message)
    call = '{"name": "get_user_details", "arguments": {"user_id": "mia_li_3668"}}'
    assert text == f"<tool_call>{call}</tool_call>"
    parsed = parse_output(text + "<|im_end|>", [{"name": "get_user_details"}])
    assert parsed["content"] == "<|im_end|>"
    assert parsed["tool_calls"][0]["function"] == {
        "name": "get_user_details",
        "arguments": '{"user_id": "mia_li_3668"}',
    }
    # A tool that was not offered, or a block that is not JSON, stays text: never executed.
    unknown = parse_output(
        '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', [{"name": "a"}]
    )
    assert "tool_calls" not in unknown and "rm_rf" in unknown["content"]
    assert "tool_calls" not in parse_output("<tool_call>{oops</tool_call>", [])


def test_splits_by_session_pruning_recorded(
    tau_calls: list[CallRecord], tiny_model: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    cfg = DatasetConfig(validation_fraction=0.2, test_fraction=0.2)
    rows = build_task_dataset(tau_calls, tokenizer, cfg, tmp_path)
    sessions = {s: {r["session"] for r in rows[s]} for s in rows}
    assert sum(len(r) for r in rows.values()) == len(tau_calls)
    assert not sessions["train"] & sessions["test"]
    assert not sessions["train"] & sessions["validation"]
    assert not sessions["validation"] & sessions["test"]
    assert not sessions["calibration"] & (sessions["train"] | sessions["test"])
    assert all(sessions.values())
    # The shared airline policy and tool schemas are recorded exactly, and left out.
    pruning = PromptPruning.model_validate_json((tmp_path / "pruning.json").read_text())
    policy = tau_calls[0].request.messages[0]["content"]
    assert pruning.system == policy and pruning.tools == tau_calls[0].offered_tools()
    assert pruning.tools_action == "compact"
    prompt = rows["train"][0]["prompt"]
    assert "Airline Agent Policy" not in prompt and '"name": "book_reservation"' in prompt
    assert "Book a reservation." not in prompt  # descriptions compacted away
    # A request with another system text keeps it: only the recorded text is dropped.
    other = tau_calls[0].request.model_copy(deep=True)
    other.messages[0]["content"] = "Another policy"
    assert "Another policy" in build_prompt(tokenizer, other, pruning)
    # Written for eval and serving: the HF dataset and JSONL; the test split is frozen.
    assert (tmp_path / "dataset" / "hf" / "dataset_dict.json").exists()
    assert len((tmp_path / "dataset" / "test.jsonl").read_text().splitlines()) == len(rows["test"])
    recorded = read_splits_file(tmp_path).model_dump()
    rows2 = build_task_dataset(
        tau_calls,
        tokenizer,
        DatasetConfig(test_fraction=0.05, calibration_fraction=0.3),
        tmp_path,
    )
    for frozen in ("test", "calibration"):
        assert {r["id"] for r in rows2[frozen]} == set(recorded[frozen])


def test_calibration_split_is_held_out_by_session(tau_calls: list[CallRecord]) -> None:
    cfg = DatasetConfig(validation_fraction=0.2, test_fraction=0.2, calibration_fraction=0.2)
    splits = {s: [] for s in ("train", "validation", "calibration", "test")}
    for c in tau_calls:
        splits[split_of(c, cfg)].append(c)
    sessions = {s: {c.session_id for c in calls} for s, calls in splits.items()}
    assert sum(len(c) for c in splits.values()) == len(tau_calls) and sessions["calibration"]
    assert not sessions["calibration"] & (sessions["train"] | sessions["test"])
    assert not sessions["calibration"] & sessions["validation"]
    with pytest.raises(ValueError, match="calibration_fraction must stay below 0.9"):
        DatasetConfig(validation_fraction=0.3, test_fraction=0.3, calibration_fraction=0.35)


def test_context_policy_keeps_the_answered_turn(
    tau_calls: list[CallRecord], tiny_model: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    call = max(tau_calls, key=lambda c: len(c.request.messages))
    messages = call.request.messages
    first_user = next(m["content"] for m in messages if m["role"] == "user")

    def text(m: dict) -> str:
        return render_assistant(m) if m["role"] == "assistant" else message_text(m["content"])

    last = text(messages[-1])
    assert text(messages[-2]) and text(messages[-3])
    two = build_prompt(tokenizer, call.request, PromptPruning(context=ContextPolicy(max_turns=2)))
    assert first_user not in two and last[-200:] in two
    assert text(messages[-2])[-100:] in two and text(messages[-3])[-100:] not in two
    # A token budget smaller than the last turn still keeps it, and only it.
    one = build_prompt(tokenizer, call.request, PromptPruning(context=ContextPolicy(max_tokens=1)))
    assert last[-200:] in one and text(messages[-2])[-100:] not in one
    # Tool results are cut to head and tail: the ids a record ends with survive.
    result = next(m for m in messages if m["role"] == "tool" and len(m["content"]) > 400)
    cut = build_prompt(
        tokenizer, call.request, PromptPruning(context=ContextPolicy(tool_result_chars=100))
    )
    assert result["content"] not in cut
    assert f"{result['content'][:50]} …[cut]… {result['content'][-50:]}" in cut
    # The policy is recorded with the task, so eval and serve build the same prompt.
    policy = ContextPolicy(max_tokens=64, tool_result_chars=200)
    cfg = DatasetConfig(validation_fraction=0.2, test_fraction=0.2, context=policy)
    rows = build_task_dataset(tau_calls, tokenizer, cfg, tmp_path)
    pruning = PromptPruning.model_validate_json((tmp_path / "pruning.json").read_text())
    assert pruning.context == policy
    by_id = {c.id: c for c in tau_calls}
    for row in rows["test"]:
        assert row["prompt"] == build_prompt(tokenizer, by_id[row["id"]].request, pruning)


def test_auto_dtype_follows_the_cpu_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    import slmify.models as models

    monkeypatch.setattr(models, "cpu_flags", lambda: {"avx2", "fma", "avx512f"})
    assert models.train_dtype("auto", "cpu") == (
        "float32",
        "auto: this CPU has no avx512_bf16/AMX: bf16 is emulated, float32 is faster",
    )
    assert models.train_dtype("bfloat16", "cpu") == (
        "float32",
        "train.dtype=bfloat16 asked, but this CPU does not compute it natively "
        "(about 40x slower there): training in float32",
    )
    assert models.inference_dtype("cpu") == torch.float32
    for flag in ("avx512_bf16", "amx_bf16"):
        monkeypatch.setattr(models, "cpu_flags", lambda flag=flag: {"avx2", flag})
        assert models.train_dtype("auto", "cpu")[0] == "bfloat16"
        assert models.train_dtype("bfloat16", "cpu") == ("bfloat16", "as the recipe asks")
        assert models.inference_dtype("cpu") == torch.bfloat16
    assert models.train_dtype("float32", "cpu") == ("float32", "as the recipe asks")


def test_plan_reads_the_machine(monkeypatch: pytest.MonkeyPatch, tiny_model: Path) -> None:
    import slmify.models as models
    from slmify.recipes import load_recipe

    monkeypatch.setattr(models, "cpu_flags", lambda: {"avx2"})
    monkeypatch.setattr(models, "usable_cpus", lambda: 2)
    recipe = load_recipe("cpu-smollm2-135m", [f"model.base={tiny_model}"])
    info = models.describe_base(str(tiny_model), tiny_model, "apache-2.0")
    plan = models.plan_training(info, recipe, "cpu")
    assert (plan.dtype, plan.threads, plan.batch_size) == ("float32", 2, 4)
    assert plan.notes[1] == "2 threads: the CPUs this process may run on (sched_getaffinity)"
    assert plan.notes[2].startswith("batch 4: auto, CPU: more updates")
    # Memory planned for the dtype it will run in: float32 weights take twice bf16's.
    f32 = models.training_memory_bytes(info, recipe, "float32", 4)
    assert f32 > models.training_memory_bytes(info, recipe, "bfloat16", 4)
    # Too little memory for 4 examples a step: the plan halves the batch until it fits.
    monkeypatch.setattr(
        models,
        "available_memory_bytes",
        lambda d: models.training_memory_bytes(info, recipe, "float32", 2) / 0.8,
    )
    assert models.plan_training(info, recipe, "cpu").batch_size == 2


def _workspace(tau_calls: list[CallRecord], root: Path) -> Workspace:
    """A workspace whose store holds the calls, assigned to two tasks (one too small)."""
    ws = Workspace.resolve(root)
    with ws.open_store() as st:
        st.add_calls(tau_calls)
    small = {c.id for c in tau_calls[:10]}
    n = len(tau_calls)
    ws.write_tasks(
        [
            TaskCluster(
                id="t01-airline", label="airline", output_shape="tool_call", calls=n - 10, share=0.9
            ),
            TaskCluster(id="t02-small", label="small", output_shape="text", calls=10, share=0.1),
        ]
    )
    ws.write_assignments({c.id: "t02-small" if c.id in small else "t01-airline" for c in tau_calls})
    return ws


def _tiny_args(model: Path, *extra: str) -> list[str]:
    sets = [
        f"model.base={model}",
        "model.license=apache-2.0",
        "dataset.max_length=8192",
        "dataset.validation_fraction=0.2",
        "dataset.max_train_examples=8",
        "dataset.prune.tools=drop",
        "dataset.max_eval_examples=4",
        "train.max_steps=3",
        "train.max_minutes=null",  # steps, not the machine's speed, decide a test's run
        "train.batch_size=2",
        "train.learning_rate=0.05",
        "train.eval_steps=2",
        "lora.last_layers=null",
        "train.dtype=float32",
        *extra,
    ]
    return [arg for s in sets for arg in ("--set", s)]


def test_train_cli_changes_adapter_not_base(
    tau_calls: list[CallRecord], tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForCausalLM

    import slmify.models
    import slmify.train

    # bf16 asked on a CPU without it (AVX2 only): float32, and the summary says so.
    monkeypatch.setattr(slmify.models, "cpu_flags", lambda: {"avx2", "fma"})
    ws = _workspace(tau_calls, tmp_path / "ws")
    seen: list[Any] = []
    real_load = slmify.train.load_for_training
    monkeypatch.setattr(
        slmify.train, "load_for_training", lambda *a: seen.append(real_load(*a)) or seen[-1]
    )
    result = CliRunner().invoke(
        app,
        ["train", "-w", str(ws.root), "--json", *_tiny_args(tiny_model, "train.dtype=bfloat16")],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["plan"][0] == (
        "dtype float32: train.dtype=bfloat16 asked, but this CPU does not compute it "
        "natively (about 40x slower there): training in float32"
    )
    by_id = {t["id"]: t for t in summary["tasks"]}
    assert by_id["t02-small"]["status"] == "skipped"
    assert by_id["t02-small"]["reason"] == "10 calls, fewer than dataset.min_calls=30"
    trained = by_id["t01-airline"]
    assert trained["status"] == "trained" and summary["trained"] == 1
    # Both tasks are one agent's, but the CPU recipe trains no agent-level specialist.
    assert not [t for t in summary["tasks"] if t["id"].startswith("agent-")]
    out = ws.specialist_dir("t01-airline")
    assert Path(trained["adapter"]) == out / "adapter"
    assert (out / "adapter" / "adapter_config.json").exists()
    assert ws.recipe_file("t01-airline").exists()
    assert not (out / "checkpoints").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["train_tokens"] > 0
    assert metrics["dtype"] == "float32" and seen[0].dtype == torch.float32
    for key in (
        "validation_loss",
        "base_validation_loss",
        "tokens_per_s",
        "peak_memory_mb",
        "wall_s",
    ):
        assert metrics[key] > 0
    # LoRA learned (B starts at zero) and the base weights stayed as they were.
    peft_model = seen[0]  # get_peft_model injects the LoRA layers into this model
    base = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)
    for name, param in peft_model.state_dict().items():
        key = name.replace(".base_layer", "")
        if "lora_" not in name:
            assert torch.equal(param, base[key]), name


def _train_one(ws: Workspace, model: Path, *sets: str) -> dict[str, Any]:
    args = ["train", "-w", str(ws.root), "--json", "--task", "t01-airline"]
    result = CliRunner().invoke(app, [*args, *_tiny_args(model, *sets)])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["tasks"][0]["metrics"]


def test_budget_and_early_stop_keep_the_best_adapter(
    tau_calls: list[CallRecord], tiny_model: Path, tmp_path: Path
) -> None:
    ws = _workspace(tau_calls, tmp_path / "ws")
    # A learning rate this high makes validation loss climb after the first steps: training
    # stops after `patience` passes without a lower loss, and the adapter is the best one.
    m = _train_one(
        ws,
        tiny_model,
        "train.learning_rate=3",
        "train.eval_steps=1",
        "train.patience=2",
        "train.max_steps=30",
    )
    val = m["curve"]["validation"]
    assert val[0] == [0, m["base_validation_loss"]] and len(val) == m["steps"] + 1
    assert m["stopped"] == "early stop: no lower validation loss in 2 passes"
    assert m["steps"] < 30 and m["steps"] - m["best_step"] == 2
    assert m["validation_loss"] == min(loss for _, loss in val[1:]) == val[m["best_step"]][1]
    assert [s for s, _ in m["curve"]["train"]] == list(range(4, m["steps"] + 1, 4))
    assert set(m["versions"]) == {"torch", "transformers", "peft", "trl", "slmify"}
    # Far more epochs than the budget allows: the deadline stops training, and the last
    # step is validated, so the best adapter is chosen among every step trained.
    m = _train_one(
        ws,
        tiny_model,
        "train.max_minutes=0.03",
        "train.patience=null",
        "train.max_steps=10000",
        "train.epochs=5000",
        "train.eval_steps=1000",
    )
    assert m["stopped"] == "time budget: train.max_minutes=0.03 reached"
    assert 0 < m["steps"] < 10_000 and m["curve"]["validation"][-1][0] == m["steps"]
    assert m["wall_s"] < 0.03 * 60 + 5  # one validation pass and the save past the deadline


def test_interrupted_training_resumes(
    tau_calls: list[CallRecord], tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trl import SFTTrainer

    ws = _workspace(tau_calls, tmp_path / "ws")
    args = [
        "train",
        "-w",
        str(ws.root),
        "--json",
        "--task",
        "t01-airline",
        *_tiny_args(tiny_model, "train.max_steps=4"),
    ]
    real_step, steps = SFTTrainer.training_step, []

    def crash_at_step_3(self: Any, *a: Any, **kw: Any) -> Any:
        steps.append(1)
        if len(steps) == 3:
            raise RuntimeError("simulated interruption")
        return real_step(self, *a, **kw)

    monkeypatch.setattr(SFTTrainer, "training_step", crash_at_step_3)
    CliRunner().invoke(app, args)
    out = ws.specialist_dir("t01-airline")
    assert (out / "checkpoints" / "checkpoint-2").exists()
    monkeypatch.setattr(SFTTrainer, "training_step", real_step)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from"].endswith("checkpoint-2") and metrics["steps"] == 4


def test_missing_cluster_output_is_named(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["train", "-w", str(tmp_path / "empty"), "--json"])
    assert result.exit_code == 1
    assert f"{tmp_path / 'empty' / 'cluster' / 'tasks.json'} not found" in result.output


@pytest.mark.slow
def test_real_smollm2_trains_a_few_steps(tau_calls: list[CallRecord], tmp_path: Path) -> None:
    # Early turns only: the longest tau conversations exceed SmolLM2's 8k context, which
    # the screen refuses for the whole task.
    ws = _workspace([c for c in tau_calls if len(c.request.messages) <= 8], tmp_path / "ws")
    # tau prompts are long even pruned: a longer max_length, few and small batches.
    sets = [
        "train.max_steps=2",
        "train.batch_size=2",
        "dataset.max_length=2048",
        "dataset.prune.tools=drop",
        "dataset.max_train_examples=4",
        "dataset.max_eval_examples=2",
        "dataset.validation_fraction=0.2",
        "train.eval_steps=2",
    ]
    result = CliRunner().invoke(
        app,
        [
            "train",
            "-w",
            str(ws.root),
            "--json",
            "--task",
            "t01-airline",
            *[a for s in sets for a in ("--set", s)],
        ],
    )
    assert result.exit_code == 0, result.output
    task = json.loads(result.stdout)["tasks"][0]
    assert task["status"] == "trained", task
    metrics = task["metrics"]
    assert metrics["steps"] == 2 and metrics["validation_examples"] == 2
    assert 0 < metrics["validation_loss"] < 2 * metrics["base_validation_loss"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA needs CUDA")
def test_qlora_on_gpu(tau_calls: list[CallRecord], tiny_model: Path, tmp_path: Path) -> None:
    ws = _workspace(tau_calls, tmp_path / "ws")
    args = _tiny_args(
        tiny_model,
        "quantization.load_in_4bit=true",
        "train.dtype=bfloat16",
        "lora.target_modules=[q_proj, v_proj, gate_proj, up_proj, down_proj]",
    )
    result = CliRunner().invoke(
        app, ["train", "-w", str(ws.root), "--json", "--task", "t01-airline", *args]
    )
    assert result.exit_code == 0, result.output
    task = json.loads(result.stdout)["tasks"][0]
    assert task["status"] == "trained" and task["metrics"]["device"] == "cuda"
