"""The manifest round trip, and the exports parsed the way vLLM and LiteLLM read them."""

from __future__ import annotations

import argparse
import json
import shlex
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml
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
