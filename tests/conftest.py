"""Shared fixtures: every test runs offline in its own workspace, with one model cache per
run ($SLMIFY_CACHE) that is never ~/.cache/slmify."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
# .ci/run starts a server on loopback and exports this; locally the same URL is tried.
POSTGRES = os.environ.get("SLMIFY_TEST_POSTGRES") or (
    "postgresql://postgres:slmify@127.0.0.1:5432/slmify_test"
)


@pytest.fixture(scope="session", autouse=True)
def _model_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One model cache for the whole run, so the embedded SmolLM2 is materialized once per
    run (not per test) and nothing is written to ~/.cache/slmify. Set for the session too,
    because session and module fixtures (`tiny_base`) run before any function fixture."""
    cache = tmp_path_factory.mktemp("slmify-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLMIFY_CACHE", str(cache))
        yield cache


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _model_cache: Path) -> None:
    monkeypatch.setenv("SLMIFY_WORKSPACE", str(tmp_path / "ws"))
    monkeypatch.setenv("SLMIFY_CACHE", str(_model_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # The servers' keys (slmify.httpguard) come from the environment: not the developer's.
    monkeypatch.delenv("SLMIFY_API_KEY", raising=False)
    monkeypatch.delenv("SLMIFY_UPSTREAM_API_KEY", raising=False)


def dataset(name: str) -> Path:
    """Path of a shared real agent log; skips the test when ../shared is absent."""
    path = DATASETS / name / "calls.jsonl.gz"
    if not path.exists():
        pytest.skip(f"{path} not found (the shared datasets live beside the checkout)")
    return path


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A PostgreSQL store URL on a fresh schema (dropped afterwards), so reruns and parallel
    runs never see each other's rows; skips when no server is reachable, unless
    SLMIFY_TEST_POSTGRES promised one."""
    import psycopg

    try:
        admin = psycopg.connect(POSTGRES, connect_timeout=3, autocommit=True)
    except psycopg.OperationalError as e:
        if os.environ.get("SLMIFY_TEST_POSTGRES"):
            raise
        pytest.skip(f"no PostgreSQL server at {POSTGRES}: {e}")
    schema = f"slmify_test_{uuid.uuid4().hex[:12]}"
    admin.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in POSTGRES else "?"
    try:
        yield f"{POSTGRES}{sep}options=-csearch_path%3D{schema}"
    finally:
        admin.execute(f"DROP SCHEMA {schema} CASCADE")
        admin.close()


def make_tiny_base(folder: Path, hidden: int = 16) -> Path:
    """A 2-layer random Llama (2 heads of `hidden` / 2) with SmolLM2's tokenizer and chat
    template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from slmify.models import resolve_base

    tokenizer = AutoTokenizer.from_pretrained(resolve_base("smollm2-135m"))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny random base model for the whole run (see `make_tiny_base`)."""
    return make_tiny_base(tmp_path_factory.mktemp("tiny-base"))


DEMO = Path(__file__).resolve().parents[1] / "data" / "demo" / "calls.jsonl.gz"
# Train settings that make every stage run in seconds with the tiny base (held-out splits
# large enough to calibrate and gate on).
TINY_TRAIN = [
    "model.license=apache-2.0",
    "train.max_steps=1",
    "dataset.max_train_examples=4",
    "dataset.max_eval_examples=2",
    "dataset.test_fraction=0.3",
    "dataset.calibration_fraction=0.3",
    "eval.max_new_tokens=3",
    # The JSON and tool-call steps train (tiny) LoRAs here, so the generative path is what
    # the shared workspace exercises; test_endtoend trains their field heads separately.
    "structured.specialist=lora",
]


def run_cli(*args: str) -> dict:
    """`slmify ARGS --json` through typer's runner; its JSON summary (exit 0 asserted)."""
    import json

    from typer.testing import CliRunner

    from slmify.cli import app

    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def sets(overrides: list[str]) -> list[str]:
    return [x for o in overrides for x in ("--set", o)]


@pytest.fixture(scope="session")
def demo_trained(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> Path:
    """The demo agent's workspace as `slmify cluster` and `slmify train` leave it, every
    file written by the stage itself (tiny base; the real MiniLM label head). Copy it
    before changing it: it is shared by the whole run."""
    ws = tmp_path_factory.mktemp("demo-trained") / "ws"
    run_cli("collect", "import", str(DEMO), "--curate", "-w", str(ws))
    # The router holds out TINY_TRAIN's test + calibration sessions, as `slmify run` would.
    run_cli("cluster", "-w", str(ws), *sets(["n_clusters=4", "holdout_share=0.6"]))
    run_cli("train", "-w", str(ws), *sets([f"model.base={tiny_base}", *TINY_TRAIN]))
    return ws
