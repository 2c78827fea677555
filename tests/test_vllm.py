"""A real vLLM (`make vllm-venv`) as `slmify serve --backend`: started on loopback by the
command the manifest exports, with two adapters written by peft on a tiny random base,
it answers the test calls exactly as the in-process specialists do. Slow (vLLM starts in
about a minute on 2 cores) and skipped when .venv-vllm is absent."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
from conftest import make_tiny_base
from test_proxy import FakeLLM, serving
from test_serve import TEXT, TOOL, _load, _record, _specialist, post

from slmify.callparse import parse_request
from slmify.schema import (
    FallbackLLM,
    Manifest,
    ManifestTask,
    PromptPruning,
    Savings,
    SpecialistSpec,
)
from slmify.serve import REASON_HEADER, ROUTE_HEADER, make_app
from slmify.specialists import SpecialistPool, task_runtimes
from slmify.store import open_store

VLLM_PYTHON = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not VLLM_PYTHON.exists(), reason="no .venv-vllm: run `make vllm-venv`"),
]


def make_vllm_base(folder: Path) -> Path:
    """conftest's tiny random base with 32-wide attention heads: vLLM's CPU attention has
    no kernel for narrower ones."""
    return make_tiny_base(folder, hidden=64)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ready(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM exited {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/models", timeout=5):
                return
        except OSError:
            time.sleep(2)
    raise RuntimeError(f"vLLM not ready after {timeout_s} s: {log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def vllm_deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    """Two promoted LoRA tasks on one base, the manifest naming them, and vLLM started by
    the manifest's own export (its port moved to a free one, in float32: see the test).
    Yields (manifest, vLLM's URL, the fireact and tau-airline calls)."""
    from slmify.datasets import find_pruning
    from slmify.manifest import vllm_commands
    from slmify.recipes import PruneConfig

    root = tmp_path_factory.mktemp("vllm")
    base = make_vllm_base(root / "base")
    fireact = _load("fireact", 6)
    tau = [
        c
        for c in _load("tau-airline", 40)
        if c["response"]["choices"][0]["message"].get("tool_calls")
    ]
    tool_pruning = find_pruning([_record(c) for c in tau], PruneConfig())

    def task(task_id: str, shape: str, spec: SpecialistSpec) -> ManifestTask:
        return ManifestTask(id=task_id, label=task_id, share=0.5, calls=100, output_shape=shape,
                            status="promoted", reason="by hand", specialist=spec)  # fmt: skip

    manifest = Manifest(
        created_at=datetime.now(timezone.utc),
        router=None,
        fallback=FallbackLLM(model="gpt-4o", endpoint=None),
        tasks=[
            task(TEXT, "text", _specialist(root, base, TEXT, PromptPruning(), 1)),
            task(TOOL, "tool_call", _specialist(root, base, TOOL, tool_pruning, 2)),
        ],
        savings=Savings(
            specialist_share=1.0,
            specialist_calls=200,
            llm_cost_usd=1.0,
            llm_cost_usd_moved=1.0,
            llm_latency_s_moved=None,
            prices="test",
        ),  # fmt: skip
    )
    [(argv, _)] = vllm_commands(manifest)
    port = _free_port()
    argv[argv.index("--port") + 1] = str(port)
    argv = [str(VLLM_PYTHON), *argv[1:], "--dtype", "float32"]
    log = root / "vllm.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    with log.open("w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        _ready(url, proc, log)
        yield manifest, url, fireact, tau
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_vllm_answers_the_test_calls_as_in_process_through_serve(
    vllm_deployment, tmp_path, monkeypatch
):
    import torch

    from slmify.manifest import write_manifest
    from slmify.serve import load_service

    # Both sides in float32. Random weights spread a token's probability over the whole
    # vocabulary (confidence ~4e-5), so the top two tokens often differ by less than
    # bfloat16 rounds, and vLLM's bf16 kernels and torch's then pick differently (3 of 10
    # answers here on an avx512_bf16 CPU): that is rounding, not prompt or decoding.
    monkeypatch.setattr("slmify.models.inference_dtype", lambda device: torch.float32)

    manifest, url, fireact, tau = vllm_deployment
    path = tmp_path / "manifest.yaml"
    write_manifest(manifest, path)
    calls = [(TEXT, c) for c in fireact] + [(TOOL, c) for c in tau[:4]]
    local = SpecialistPool(task_runtimes(manifest))
    expected = [local.answer(t, parse_request(c["request"])) for t, c in calls]
    fake = FakeLLM(fireact + tau)
    with open_store(str(tmp_path / "calls.db")) as st, serving(fake.app) as up:
        service = load_service(path, st, f"{up}/v1", 60, 0.0, [url])
        assert service.backend.describe() == [f"generating on {url}"]  # logprobs returned
        try:
            with serving(make_app(service)) as serve_url:
                # Pinned to each task (the request's model), as a client may; one by one,
                # so each answer is vLLM's for exactly this prompt.
                got = [post(serve_url, [{**c["request"], "model": t}])[0] for t, c in calls]
        finally:
            service.writer.close()
        agree, confidences = 0, []
        for (task, _), answer, (status, headers, body) in zip(calls, expected, got, strict=True):
            assert status == 200
            if headers[ROUTE_HEADER] == task:
                completion = json.loads(body)
                agree += completion["choices"][0]["message"] == answer.message
                route = st.get_call(completion["id"]).record.metadata["route"]
                confidences.append((route["answer_confidence"], answer.confidence))
            else:  # the tool calls of random weights fail validation, in-process as on vLLM
                assert answer.problem is not None, headers[REASON_HEADER]
                assert headers[REASON_HEADER] == f"invalid-output: {answer.problem}"
                agree += 1
    assert agree == len(calls)
    # The confidence from vLLM's logprobs is the in-process one (float32 sums reordered).
    assert [r for r, _ in confidences] == pytest.approx([e for _, e in confidences], rel=1e-3)
    assert sum(h[ROUTE_HEADER] == TEXT for _, h, _ in got) == len(fireact)
