"""The manifest round trip, and the exports parsed the way vLLM and LiteLLM read them."""

from __future__ import annotations

import argparse
import gzip
import json
import shlex
from datetime import datetime, timezone
from functools import cache
from pathlib import Path

import pytest
import yaml
from conftest import dataset
from jsonschema import Draft202012Validator

from slmify.manifest import (
    SCHEMA_PATH,
    VLLM_LORA_RANKS,
    ManifestError,
    litellm_config,
    manifest_json_schema,
    read_manifest,
    vllm_commands,
    vllm_max_lora_rank,
    write_exports,
    write_manifest,
)
from slmify.schema import (
    CallEval,
    CallRecord,
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
)


def _task(task_id: str, status: str, adapter: str | None, rank: int = 16, base: str = "/m/smollm2"):
    spec = None
    if adapter is not None:
        spec = SpecialistSpec(
            base_model="smollm2-135m",
            base_model_path=base,
            adapter_path=adapter,
            lora_rank=rank,
            input_pruning=["system prompt", "tool descriptions"],
            chat_template="chatml",
        )
    evaluation = TaskEvaluation(
        test_calls=120,
        agreement=0.975,
        agreement_lower=0.941,
        base_agreement=0.1,
        base_agreement_lower=0.06,
        method="wilson",
        confidence=0.95,
        specialist_latency_ms_p50=80.0,
        specialist_tokens_per_s=41.5,
        llm_latency_ms_p50=None,
        report=f"eval/{task_id}/report.json",
    )
    return ManifestTask(
        id=task_id,
        label=task_id.split("-", 1)[1].replace("-", " "),
        share=0.25,
        calls=600,
        output_shape="tool_call",
        status=status,
        reason="agreement 0.975 over 120 test calls ..." if status == "promoted" else "too few",
        specialist=spec,
        evaluation=evaluation if spec else None,
        data_hash="d" * 64 if spec else None,
        recipe_hash="r" * 64 if spec else None,
    )


def _manifest(tasks: list[ManifestTask]) -> Manifest:
    return Manifest(
        created_at=datetime(2026, 11, 24, 3, 0, tzinfo=timezone.utc),
        router=RouterSpec(
            embedding_model="sentence-transformers/all-MiniLM-L6-v2",
            params={"k": 8},
            artifact="cluster/router.npz",
            confidence_threshold=0.6,
        ),
        fallback=FallbackLLM(model="gpt-4o", endpoint=None),
        tasks=tasks,
        savings=Savings(
            specialist_share=0.5,
            specialist_calls=1200,
            llm_cost_usd=10.0,
            llm_cost_usd_moved=4.2,
            llm_latency_s_moved=None,
            prices="slmify/prices.py",
        ),
    )


@pytest.fixture
def manifest() -> Manifest:
    return _manifest(
        [
            _task("t01-get-reservation", "promoted", "/ws/specialists/t01-get-reservation/adapter"),
            _task("t02-reply-to-user", "llm", "/ws/specialists/t02-reply-to-user/adapter"),
            _task("t03-book-flight", "promoted", "/ws/spec,ials/t03=x/adapter", rank=40),
            _task("t04-rare", "llm", None),
        ]
    )


def test_shipped_schema_is_current() -> None:
    shipped = json.loads(SCHEMA_PATH.read_text())
    assert shipped == manifest_json_schema(), (
        "slmify/manifest.schema.json is stale: run "
        "`.venv/bin/python -c 'from slmify.manifest import write_schema; write_schema()'`"
    )


def test_round_trip_validates_against_schema(tmp_path: Path, manifest: Manifest) -> None:
    path = tmp_path / "manifest.yaml"
    write_manifest(manifest, path)
    assert path.read_text().startswith("# slmify deployment manifest")
    data = yaml.safe_load(path.read_text())
    Draft202012Validator(json.loads(SCHEMA_PATH.read_text())).validate(data)
    assert read_manifest(path) == manifest
    assert [t["status"] for t in data["tasks"]] == ["promoted", "llm", "promoted", "llm"]
    assert data["tasks"][3]["specialist"] is None


def test_read_rejects_a_manifest_off_schema(tmp_path: Path, manifest: Manifest) -> None:
    path = tmp_path / "manifest.yaml"
    write_manifest(manifest, path)
    data = yaml.safe_load(path.read_text())
    data["tasks"][0]["status"] = "maybe"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(
        ManifestError,
        match=r"manifest.yaml: does not match the manifest schema "
        r"at tasks/0/status: 'maybe' is not one of \['promoted', 'llm'\]",
    ):
        read_manifest(path)


def _vllm_parser() -> argparse.ArgumentParser:
    """`vllm serve`'s arguments used here, with vLLM's own --lora-modules parsing
    (vllm/entrypoints/openai/cli_args.py LoRAParserAction: `name=path` unless the item
    holds a comma, else JSON with name/path/base_model_name; nargs="+")."""

    class LoRAParserAction(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001
            modules = []
            for item in values:
                if "=" in item and "," not in item:
                    name, path = item.split("=")
                    modules.append({"name": name, "path": path})
                else:
                    lora = json.loads(item)
                    assert set(lora) <= {"name", "path", "base_model_name"}
                    modules.append(lora)
            setattr(namespace, self.dest, modules)

    parser = argparse.ArgumentParser(prog="vllm")
    parser.add_argument("subcommand", choices=["serve"])
    parser.add_argument("model_tag")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--enable-lora", action="store_true")
    parser.add_argument("--lora-modules", nargs="+", action=LoRAParserAction)
    parser.add_argument("--max-lora-rank", type=int, choices=VLLM_LORA_RANKS)
    parser.add_argument("--max-loras", type=int)
    return parser


def test_vllm_command_parses_with_vllms_argument_format(tmp_path: Path, manifest: Manifest) -> None:
    paths = write_exports(manifest, tmp_path / "exports")
    script = Path(paths["vllm"]).read_text()
    command = [line for line in script.replace("\\\n", " ").splitlines() if line.startswith("vllm")]
    assert len(command) == 1  # both promoted adapters share one base model
    args = _vllm_parser().parse_args(shlex.split(command[0])[1:])
    assert args.model_tag == "/m/smollm2" and args.enable_lora and args.port == 8000
    assert args.lora_modules == [
        {"name": "t01-get-reservation", "path": "/ws/specialists/t01-get-reservation/adapter"},
        {"name": "t03-book-flight", "path": "/ws/spec,ials/t03=x/adapter"},
    ]
    assert args.max_lora_rank == 64  # ranks 16 and 40: the next rank vLLM accepts
    assert args.max_loras == 2


def test_max_lora_rank_rounds_up_to_what_vllm_accepts() -> None:
    assert vllm_max_lora_rank([8]) == 8
    assert vllm_max_lora_rank([4, 16]) == 16
    assert vllm_max_lora_rank([300]) == 320
    with pytest.raises(ManifestError, match="exceeds vLLM's largest"):
        vllm_max_lora_rank([1024])


def test_one_vllm_server_per_base_model() -> None:
    m = _manifest(
        [
            _task("t01-a", "promoted", "/ad/a", base="/m/one"),
            _task("t02-b", "promoted", "/ad/b", base="/m/two"),
        ]
    )
    commands = vllm_commands(m)
    assert [(argv[2], base) for argv, base in commands] == [
        ("/m/one", "http://localhost:8000/v1"),
        ("/m/two", "http://localhost:8001/v1"),
    ]
    bases = {
        e["model_name"]: e["litellm_params"].get("api_base")
        for e in litellm_config(m)["model_list"]
    }
    assert bases["t01-a"] == "http://localhost:8000/v1"
    assert bases["t02-b"] == "http://localhost:8001/v1"


# The keys LiteLLM's proxy reads from config.yaml, per https://docs.litellm.ai/docs/proxy/configs
# (model_list[].model_name, litellm_params.model / api_base / api_key) and
# https://docs.litellm.ai/docs/proxy/reliability (router_settings.fallbacks:
# [{"model_name": ["fallback_model_name"]}]).
LITELLM_SCHEMA = {
    "type": "object",
    "required": ["model_list"],
    "properties": {
        "model_list": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["model_name", "litellm_params"],
                "properties": {
                    "model_name": {"type": "string"},
                    "litellm_params": {
                        "type": "object",
                        "required": ["model"],
                        "properties": {
                            "model": {"type": "string", "pattern": "^[a-z_]+/.+"},
                            "api_base": {"type": "string", "pattern": "^https?://"},
                            "api_key": {"type": "string"},
                        },
                    },
                },
            },
        },
        "router_settings": {
            "type": "object",
            "properties": {
                "fallbacks": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "minProperties": 1,
                        "maxProperties": 1,
                        "additionalProperties": {"type": "array", "items": {"type": "string"}},
                    },
                }
            },
        },
    },
}


def test_litellm_config_has_the_keys_litellm_reads(tmp_path: Path, manifest: Manifest) -> None:
    paths = write_exports(manifest, tmp_path / "exports")
    config = yaml.safe_load(Path(paths["litellm"]).read_text())
    Draft202012Validator(LITELLM_SCHEMA).validate(config)
    models = {e["model_name"]: e["litellm_params"] for e in config["model_list"]}
    assert models == {
        "t01-get-reservation": {
            "model": "hosted_vllm/t01-get-reservation",
            "api_base": "http://localhost:8000/v1",
        },
        "t03-book-flight": {
            "model": "hosted_vllm/t03-book-flight",
            "api_base": "http://localhost:8000/v1",
        },
        "gpt-4o": {"model": "openai/gpt-4o", "api_key": "os.environ/OPENAI_API_KEY"},
    }
    # Every fallback names a model group that exists, and leads to the LLM.
    assert config["router_settings"]["fallbacks"] == [
        {"t01-get-reservation": ["gpt-4o"]},
        {"t03-book-flight": ["gpt-4o"]},
    ]


def test_nothing_promoted_exports_only_the_llm(tmp_path: Path) -> None:
    m = _manifest([_task("t01-a", "llm", "/ad/a")])
    m.fallback = FallbackLLM(model="gpt-4", endpoint="https://llm.example/v1")
    paths = write_exports(m, tmp_path)
    assert "nothing to serve" in Path(paths["vllm"]).read_text()
    config = yaml.safe_load(Path(paths["litellm"]).read_text())
    assert config == {
        "model_list": [
            {
                "model_name": "gpt-4",
                "litellm_params": {
                    "model": "openai/gpt-4",
                    "api_key": "os.environ/OPENAI_API_KEY",
                    "api_base": "https://llm.example/v1",
                },
            }
        ],
        "router_settings": {"fallbacks": []},
    }


# -- eval, then manifest, on a workspace with real tau-airline calls ---------------------

TASK = "t01-get-reservation-details"


@cache
def _reservation_calls() -> list[CallRecord]:
    """The tau-airline calls answered with get_reservation_details (read-only)."""
    from slmify.collect import from_openai_log

    calls = []
    with gzip.open(dataset("tau-airline"), "rt") as fh:
        for line in fh:
            rec = from_openai_log(json.loads(line), "tau-airline")[0]
            if any(c["name"] == "get_reservation_details" for c in rec.tool_calls()):
                calls.append(rec)
    return calls


def _eval_workspace(root: Path, base: Path, n_test: int) -> tuple[Path, list[CallRecord]]:
    """A workspace as cluster and train leave it: one trained task, one not trained."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slmify.datasets import find_pruning
    from slmify.recipes import PruneConfig
    from slmify.store import open_store

    calls = _reservation_calls()
    with open_store(str(root / "calls.db")) as st:
        st.add_calls(calls)
    tasks = [
        TaskCluster(
            id=TASK,
            label="get reservation details",
            tools=["get_reservation_details"],
            output_shape="tool_call",
            calls=len(calls),
            share=0.3,
            llm_cost_usd=1.5,
        ),
        TaskCluster(id="t02-rare", label="rare", output_shape="text", calls=3, share=0.01),
    ]
    (root / "cluster").mkdir(parents=True)
    (root / "cluster" / "tasks.json").write_text(
        json.dumps({"tasks": [t.model_dump(mode="json") for t in tasks]})
    )
    folder = root / "specialists" / TASK
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
    )
    model.save_pretrained(folder / "adapter")
    AutoTokenizer.from_pretrained(base).save_pretrained(folder / "adapter")
    (folder / "recipe.yaml").write_text(
        "# resolved\nmodel: {base: tiny}\neval: {min_test_calls: 3, max_new_tokens: 6}\n"
    )
    (folder / "pruning.json").write_text(find_pruning(calls, PruneConfig()).model_dump_json())
    test_ids = [c.id for c in calls[:n_test]]
    (folder / "splits.json").write_text(
        json.dumps({"train": [], "validation": [], "test": test_ids})
    )
    (folder / "dataset").mkdir()
    (folder / "dataset" / "train.jsonl").write_text('{"id": "x"}\n')
    result = SpecialistResult(
        id=TASK, status="trained", adapter=str(folder / "adapter"), base_model=str(base)
    )
    (folder / "result.json").write_text(result.model_dump_json())
    return root, calls[:n_test]


def test_eval_runs_the_real_model_and_gates(tmp_path: Path, tiny_base: Path) -> None:
    from slmify.evaluate import evaluate_workspace
    from slmify.store import open_store

    root, calls = _eval_workspace(tmp_path / "ws", tiny_base, n_test=4)
    lines: list[str] = []
    with open_store(str(root / "calls.db")) as st:
        summary = evaluate_workspace(root, st, progress=False, announce=lines.append)
    assert summary["evaluated"] == 1 and summary["promoted"] == 0
    by_id = {t["id"]: t for t in summary["tasks"]}
    assert by_id["t02-rare"] == {
        "id": "t02-rare",
        "status": "llm",
        "reason": "no specialist trained (run `slmify train`)",
    }
    assert by_id[TASK]["test_calls"] == 4 and by_id[TASK]["status"] == "llm"
    rows = [CallEval.model_validate_json(x) for x in (root / "eval" / TASK / "calls.jsonl").open()]
    assert [r.call_id for r in rows] == [c.id for c in calls]
    for r in rows:
        assert r.reference == next(c for c in calls if c.id == r.call_id).response.message
        for answer in (r.specialist, r.base):
            assert 1 <= answer.output_tokens <= 6 and answer.latency_ms > 0
            assert answer.score.shape == "tool_call"
    report = EvalReport.model_validate_json((root / "eval" / TASK / "report.json").read_text())
    # A random 2-layer model never reproduces the LLM's call: kept on the LLM, with numbers.
    assert report.specialist.agreement.n == 4 and report.specialist.agreement.mean == 0.0
    assert report.decision.status == "llm"
    assert report.decision.reason == (
        "agreement 0.000 over 4 test calls, 95% lower bound 0.000 (wilson) "
        "< tool_call threshold 0.90"
    )
    assert report.specialist.tokens_per_s > 0
    assert lines[0] == "t02-rare: -> llm: no specialist trained (run `slmify train`)"
    assert lines[1].startswith(f"{TASK}: n=4 specialist 0.000 [0.000, 0.")
    assert " base 0.000 [0.000, 0." in lines[1]


def _oracle(
    monkeypatch: pytest.MonkeyPatch, root: Path, base: Path, calls: list[CallRecord]
) -> None:
    """The specialist answers exactly what the LLM did; the base model answers in words."""
    from transformers import AutoTokenizer

    from slmify import evaluate
    from slmify.datasets import build_prompt, render_assistant

    tokenizer = AutoTokenizer.from_pretrained(base)
    pruning = PromptPruning.model_validate_json(
        (root / "specialists" / TASK / "pruning.json").read_text()
    )
    answers = {
        build_prompt(tokenizer, c.request, pruning): render_assistant(c.response.message)
        for c in calls
    }

    def answer(self, prompt: str, use_adapter: bool) -> tuple[str, float, int]:  # noqa: ANN001
        return (answers[prompt] if use_adapter else "Let me check that for you."), 12.5, 10

    monkeypatch.setattr(evaluate.Specialist, "answer", answer)


def test_eval_promotes_a_specialist_that_matches_and_the_manifest_lists_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_base: Path
) -> None:
    from typer.testing import CliRunner

    from slmify.cli import app

    # 25 of 25: one-sided 95% Wilson lower bound 25 / (25 + 1.645^2) = 0.902 >= 0.90.
    root, calls = _eval_workspace(tmp_path / "ws", tiny_base, n_test=25)
    _oracle(monkeypatch, root, tiny_base, calls)
    runner = CliRunner()
    result = runner.invoke(app, ["eval", "-w", str(root), "--json"])
    assert result.exit_code == 0, result.output
    task = next(t for t in json.loads(result.stdout)["tasks"] if t["id"] == TASK)
    assert task["status"] == "promoted", task["reason"]
    assert task["specialist"]["mean"] == 1.0 and task["base"]["mean"] == 0.0
    assert task["specialist"]["lower"] == pytest.approx(25 / (25 + 1.6448536**2), abs=1e-4)
    result = runner.invoke(app, ["eval", "-w", str(root)])  # the human form: a line per task
    assert f"{TASK}: n=25 specialist 1.000 [0.902, 1.000] base 0.000 [0.000, 0.098]" in (
        result.stdout
    )
    assert "t02-rare: -> llm: no specialist trained" in result.stdout
    result = runner.invoke(app, ["manifest", "-w", str(root), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["manifest"] == str(root / "manifest.yaml")
    manifest = read_manifest(Path(out["manifest"]))
    entries = {t.id: t for t in manifest.tasks}
    assert entries[TASK].status == "promoted"
    assert entries[TASK].reason.startswith("agreement 1.000 over 25 test calls")
    assert entries[TASK].evaluation.base_agreement == 0.0
    assert entries[TASK].specialist.lora_rank == 4
    assert entries[TASK].specialist.input_pruning == [
        "the shared system message (6155 chars)",
        "descriptions of the 14 shared tool schemas",
    ]
    assert entries[TASK].data_hash and entries[TASK].recipe_hash
    assert entries["t02-rare"].status == "llm" and entries["t02-rare"].specialist is None
    assert manifest.fallback.model == "gpt-4o"
    assert manifest.savings.specialist_share == 0.3
    assert manifest.savings.llm_cost_usd_moved == 1.5
    assert manifest.savings.llm_latency_s_moved is None  # the logs have no latency
    assert out["tasks"][TASK].startswith("promoted: agreement 1.000")
    script = Path(out["vllm"]).read_text()
    assert f"{TASK}={entries[TASK].specialist.adapter_path}" in script


def test_manifest_refuses_an_evaluation_older_than_the_adapter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_base: Path
) -> None:
    import os
    import time

    from slmify.evaluate import evaluate_workspace
    from slmify.manifest import build_manifest
    from slmify.store import open_store

    root, calls = _eval_workspace(tmp_path / "ws", tiny_base, n_test=25)
    _oracle(monkeypatch, root, tiny_base, calls)
    with open_store(str(root / "calls.db")) as st:
        evaluate_workspace(root, st, progress=False)
        later = time.time() + 60
        os.utime(root / "specialists" / TASK / "adapter" / "adapter_config.json", (later, later))
        entry = next(t for t in build_manifest(root, st).tasks if t.id == TASK)
    assert entry.status == "llm"
    assert (
        entry.reason == "the evaluation predates the adapter, retrained since (run `slmify eval`)"
    )


def test_judge_reads_yes_no_from_an_openai_compatible_endpoint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from slmify.evaluate import EvalError, Judge

    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
            verdict = body["messages"][1]["content"].rsplit("\n", 1)[-1]  # echo the candidate
            reply = {"choices": [{"message": {"role": "assistant", "content": verdict}}]}
            data = json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("SLMIFY_JUDGE_API_KEY", "sk-test")
        judge = Judge.from_env(f"http://127.0.0.1:{server.server_port}/v1/", "judge-1")
        assert judge.verdict("Where is it?", "In Paris.", "Yes.") == 1.0
        assert judge.verdict("Where is it?", "In Paris.", "no") == 0.0
        assert judge.verdict("Where is it?", "In Paris.", "Maybe") is None
        assert seen[0]["path"] == "/v1/chat/completions"
        assert seen[0]["auth"] == "Bearer sk-test"
        assert seen[0]["model"] == "judge-1" and seen[0]["temperature"] == 0
    finally:
        server.shutdown()
    with pytest.raises(EvalError, match=r"judge http://127\.0\.0\.1:1/v1: "):
        Judge("http://127.0.0.1:1/v1", "judge-1", None).verdict("q", "a", "b")


def test_eval_without_the_base_model_comparison(tmp_path: Path, tiny_base: Path) -> None:
    from slmify.evaluate import evaluate_workspace
    from slmify.manifest import build_manifest
    from slmify.store import open_store

    root, _ = _eval_workspace(tmp_path / "ws", tiny_base, n_test=3)
    recipe = root / "specialists" / TASK / "recipe.yaml"
    recipe.write_text(recipe.read_text().replace("6}", "6, compare_base: false}"))
    lines: list[str] = []
    with open_store(str(root / "calls.db")) as st:
        summary = evaluate_workspace(root, st, progress=False, announce=lines.append)
        manifest = build_manifest(root, st)
    task = next(t for t in summary["tasks"] if t["id"] == TASK)
    assert task["base"] is None and task["test_calls"] == 3
    rows = [CallEval.model_validate_json(x) for x in (root / "eval" / TASK / "calls.jsonl").open()]
    assert len(rows) == 3 and all(r.base is None for r in rows)
    assert " base not run " in lines[1]
    entry = next(t for t in manifest.tasks if t.id == TASK)
    assert entry.evaluation.base_agreement is None and entry.evaluation.agreement == 0.0
