"""The manifest round trip, and the exports: the vLLM backend's command run by a shell and
parsed the way vLLM parses it, and the LiteLLM config (LiteLLM in front of serve) checked
against the keys LiteLLM reads."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch
import yaml
from jsonschema import Draft202012Validator

from slmify.manifest import (
    SCHEMA_PATH,
    SERVE_URL,
    VLLM_LORA_RANKS,
    ManifestError,
    litellm_config,
    manifest_json_schema,
    read_manifest,
    vllm_commands,
    vllm_dtype,
    vllm_max_lora_rank,
    write_exports,
    write_manifest,
)
from slmify.schema import (
    FallbackLLM,
    Manifest,
    ManifestTask,
    RouterSpec,
    Savings,
    SpecialistSpec,
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
            _head_task("t05-classify-intent"),
        ]
    )


def _head_task(task_id: str) -> ManifestTask:
    """A promoted label-head task: nothing for vLLM to host."""
    task = _task(task_id, "promoted", None)
    task.specialist = SpecialistSpec(
        kind="label-head",
        base_model=None,
        base_model_path=None,
        head_path=f"/ws/specialists/{task_id}/head",
        labels=["book", "cancel"],
        input_pruning=[],
        chat_template="none",
    )
    return task


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
    assert [t["status"] for t in data["tasks"]] == [
        "promoted",
        "llm",
        "promoted",
        "llm",
        "promoted",
    ]
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
    """The arguments of `python -m vllm.entrypoints.openai.api_server` used here, with
    vLLM's own --lora-modules parsing (vllm/entrypoints/openai/cli_args.py LoRAParserAction:
    `name=path` unless the item holds a comma, else JSON with name/path/base_model_name;
    nargs="+"). Unknown arguments are an error, as in vLLM."""

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

    parser = argparse.ArgumentParser(prog="vllm.entrypoints.openai.api_server")
    parser.add_argument("--model", required=True)
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--enable-lora", action="store_true")
    parser.add_argument("--lora-modules", nargs="+", action=LoRAParserAction)
    parser.add_argument("--max-lora-rank", type=int, choices=VLLM_LORA_RANKS)
    parser.add_argument("--max-loras", type=int)
    parser.add_argument(
        "--dtype", choices=["auto", "half", "float16", "bfloat16", "float", "float32"]
    )
    return parser


def _run_vllm_script(script: Path, tmp_path: Path) -> list[list[str]]:
    """Run the exported script with VLLM_PYTHON set to a python that records its argv:
    what vLLM's python would receive, after the shell's own quoting and line joins."""
    record = tmp_path / "argv.jsonl"
    fake = tmp_path / "fake-python"
    fake.write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"open({str(record)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
    )
    fake.chmod(0o755)
    env = {**os.environ, "VLLM_PYTHON": str(fake)}
    subprocess.run(["sh", str(script)], env=env, check=True, timeout=30)
    if not record.exists():
        return []
    return [json.loads(line) for line in record.read_text().splitlines()]


def _vllm_args(argv: list[str]) -> argparse.Namespace:
    assert argv[:2] == ["-m", "vllm.entrypoints.openai.api_server"]
    return _vllm_parser().parse_args(argv[2:])


def test_vllm_command_parses_with_vllms_argument_format(tmp_path: Path, manifest: Manifest) -> None:
    paths = write_exports(manifest, tmp_path / "exports")
    runs = _run_vllm_script(Path(paths["vllm"]), tmp_path)
    assert len(runs) == 1  # both promoted adapters share one base model
    args = _vllm_args(runs[0])
    assert args.model == "/m/smollm2" and args.enable_lora and args.port == 8000
    # Loopback only: the backend answers any prompt with any adapter, unguarded.
    assert args.host == "127.0.0.1"
    # The promoted LoRA tasks only: not t02 (on the LLM), not t05 (a label head).
    assert args.lora_modules == [
        {"name": "t01-get-reservation", "path": "/ws/specialists/t01-get-reservation/adapter"},
        {"name": "t03-book-flight", "path": "/ws/spec,ials/t03=x/adapter"},
    ]
    assert args.max_lora_rank == 64  # ranks 16 and 40: the next rank vLLM accepts
    assert args.max_loras == 2
    assert args.dtype == vllm_dtype("cuda" if torch.cuda.is_available() else "cpu")
    assert vllm_commands(manifest)[0][1] == "http://127.0.0.1:8000/v1"


@pytest.mark.parametrize("native", [True, False])
def test_vllm_dtype_is_float32_on_any_cpu_and_evals_dtype_on_a_gpu(
    monkeypatch: pytest.MonkeyPatch, native: bool
) -> None:
    monkeypatch.setattr("slmify.models.native_bf16", lambda device: native)
    # A CPU with avx512_bf16 too: vLLM's bf16 kernels round differently from torch's.
    assert vllm_dtype("cpu") == "float32"
    assert vllm_dtype("cuda") == ("bfloat16" if native else "float32")


def test_max_lora_rank_rounds_up_to_what_vllm_accepts() -> None:
    assert vllm_max_lora_rank([8]) == 8
    assert vllm_max_lora_rank([4, 16]) == 16
    assert vllm_max_lora_rank([300]) == 320
    with pytest.raises(ManifestError, match="exceeds vLLM's largest"):
        vllm_max_lora_rank([1024])


def test_one_vllm_server_per_base_model(tmp_path: Path) -> None:
    m = _manifest(
        [
            _task("t01-a", "promoted", "/ad/a", base="/m/one"),
            _task("t02-b", "promoted", "/ad/b", base="/m/two"),
            _task("t03-c", "promoted", "/ad/c", base="/m/one"),
        ]
    )
    assert [base for _, base in vllm_commands(m)] == [
        "http://127.0.0.1:8000/v1",
        "http://127.0.0.1:8001/v1",
    ]
    runs = [
        _vllm_args(argv)
        for argv in _run_vllm_script(Path(write_exports(m, tmp_path)["vllm"]), tmp_path)
    ]
    served = {(a.model, a.port): [lora["name"] for lora in a.lora_modules] for a in runs}
    assert served == {("/m/one", 8000): ["t01-a", "t03-c"], ("/m/two", 8001): ["t02-b"]}
    # However many backends, clients see one model: serve, which routes between them.
    assert len(litellm_config(m)["model_list"]) == 1


# The keys LiteLLM's proxy reads from config.yaml, per https://docs.litellm.ai/docs/proxy/configs
# (model_list[].model_name, litellm_params.model / api_base / api_key; "os.environ/NAME"
# reads the key from LiteLLM's environment) and the OpenAI-compatible provider
# (https://docs.litellm.ai/docs/providers/openai_compatible: `openai/<name>` with an api_base).
LITELLM_SCHEMA = {
    "type": "object",
    "required": ["model_list"],
    "additionalProperties": False,
    "properties": {
        "model_list": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["model_name", "litellm_params"],
                "additionalProperties": False,
                "properties": {
                    "model_name": {"type": "string"},
                    "litellm_params": {
                        "type": "object",
                        "required": ["model"],
                        "additionalProperties": False,
                        "properties": {
                            "model": {"type": "string", "pattern": "^[a-z_]+/.+"},
                            "api_base": {"type": "string", "pattern": "^https?://"},
                            "api_key": {"type": "string", "pattern": "^os\\.environ/[A-Z_]+$"},
                        },
                    },
                },
            },
        },
    },
}


def test_litellm_config_puts_litellm_in_front_of_serve(tmp_path: Path, manifest: Manifest) -> None:
    paths = write_exports(manifest, tmp_path / "exports")
    text = Path(paths["litellm"]).read_text()
    config = yaml.safe_load(text)
    Draft202012Validator(LITELLM_SCHEMA).validate(config)
    # One model, the agent's own: every call reaches serve, which routes, checks and falls back.
    assert config == {
        "model_list": [
            {
                "model_name": "gpt-4o",
                "litellm_params": {
                    "model": "openai/gpt-4o",
                    "api_base": SERVE_URL,
                    "api_key": "os.environ/SLMIFY_API_KEY",
                },
            }
        ]
    }
    assert SERVE_URL == "http://127.0.0.1:8901/v1"  # `slmify serve`'s default address
    # No route around serve: no task model, no vLLM address, no upstream LLM key.
    for task in manifest.tasks:
        assert task.id not in text
    assert ":8000" not in text and "hosted_vllm" not in text and "OPENAI_API_KEY" not in text


def test_nothing_promoted_exports_no_vllm_and_litellm_still_through_serve(tmp_path: Path) -> None:
    m = _manifest([_task("t01-a", "llm", "/ad/a"), _head_task("t02-label")])
    m.fallback = FallbackLLM(model="gpt-4", endpoint="https://llm.example/v1")
    paths = write_exports(m, tmp_path)
    script = Path(paths["vllm"])
    assert "nothing for vLLM to serve" in script.read_text()
    assert _run_vllm_script(script, tmp_path) == []  # a promoted label head needs no vLLM
    config = yaml.safe_load(Path(paths["litellm"]).read_text())
    # The LLM's own endpoint is serve's --upstream, never LiteLLM's: LiteLLM reaches serve.
    assert config["model_list"] == [
        {
            "model_name": "gpt-4",
            "litellm_params": {
                "model": "openai/gpt-4",
                "api_base": SERVE_URL,
                "api_key": "os.environ/SLMIFY_API_KEY",
            },
        }
    ]


# -- the judge (eval and manifest themselves run in tests/test_endtoend.py) --------------


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
