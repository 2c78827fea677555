"""`slmify serve` on loopback: a tiny random specialist pair, a real local fake LLM.

The deployment is a manifest written by hand around two LoRA adapters saved by peft on a
2-layer random Llama: a free-text task (FireAct ReAct steps), whose answer needs no
validation beyond being non-empty, and a tool-calling task (tau-airline), whose random
answers are never valid tool calls, which is the invalid-output fallback case. A third
task is not promoted. The upstream is `FakeLLM` from test_proxy, answering the real calls
with their recorded answers.
"""

from __future__ import annotations

import asyncio
import gzip
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import dataset
from test_proxy import FakeLLM, serving

from slmify.collect import parse_request
from slmify.datasets import build_prompt
from slmify.proxy import CallWriter, Upstream
from slmify.schema import (
    ChatRequest,
    FallbackLLM,
    Manifest,
    ManifestTask,
    PromptPruning,
    RouterSpec,
    Savings,
    ServedRoute,
    SpecialistSpec,
)
from slmify.serve import REASON_HEADER, ROUTE_HEADER, Service, make_app
from slmify.specialists import SpecialistPool, answer_problem, out_of_scope, task_runtimes
from slmify.sse import assemble_stream, parse_sse
from slmify.store import open_store
from slmify.workspace import write_pruning_file

TEXT, TOOL, REPLY = "t01-react-step", "t02-airline-tool-call", "t03-airline-reply"
SECRET = "sk-upstream-5e4d3c2b1a-NEVER-STORED"
THRESHOLD = 0.5


def _load(name: str, n: int) -> list[dict[str, Any]]:
    with gzip.open(dataset(name), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in itertools.islice(f, n)]


@dataclass
class Deployment:
    manifest_path: Path
    manifest: Manifest
    pool: SpecialistPool
    fireact: list[dict[str, Any]]
    tool_calls: list[dict[str, Any]]  # tau-airline calls the LLM answered with a tool call
    replies: list[dict[str, Any]]  # tau-airline calls the LLM answered in words


class TableRouter:
    """A router double: the task and confidence written down for each known request."""

    def __init__(self, table: dict[str, tuple[str, float]]):
        self.table = table

    def route_many(self, requests: list[ChatRequest]) -> list[tuple[str | None, float]]:
        return [self.table.get(_key(r.messages), (None, 0.2)) for r in requests]


def _key(messages: list[dict[str, Any]]) -> str:
    return json.dumps(messages, sort_keys=True)


def _specialist(root: Path, base: Path, task_id: str, pruning: PromptPruning, seed: int):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = root / "specialists" / task_id
    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
    )
    model.save_pretrained(folder / "adapter")
    write_pruning_file(folder, pruning)
    # A manifest written before it held the prompting: serve reads the recipe's cap.
    (folder / "recipe.yaml").write_text("eval: {max_new_tokens: 8}\n")
    return SpecialistSpec(
        base_model="tiny",
        base_model_path=str(base),
        adapter_path=str(folder / "adapter"),
        lora_rank=4,
        input_pruning=[],
        chat_template="the base model's",
    )


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> Deployment:
    from slmify.datasets import find_pruning
    from slmify.manifest import read_manifest, write_manifest
    from slmify.recipes import PruneConfig

    root = tmp_path_factory.mktemp("deploy")
    tau = _load("tau-airline", 40)
    tool_calls = [c for c in tau if c["response"]["choices"][0]["message"].get("tool_calls")]
    replies = [c for c in tau if c not in tool_calls]
    tau_records = [_record(c) for c in tool_calls]
    tool_pruning = find_pruning(tau_records, PruneConfig())
    assert tool_pruning.tools_action == "compact" and len(tool_pruning.tools) == 14

    def task(task_id: str, shape: str, spec: SpecialistSpec, status: str) -> ManifestTask:
        return ManifestTask(id=task_id, label=task_id, share=0.3, calls=100, output_shape=shape,
                            status=status, reason="by hand", specialist=spec)  # fmt: skip

    manifest = Manifest(
        created_at=datetime.now(timezone.utc),
        router=RouterSpec(
            embedding_model="table", artifact="router.json", confidence_threshold=THRESHOLD
        ),  # fmt: skip
        fallback=FallbackLLM(model="gpt-4o", endpoint=None),
        tasks=[
            task(TEXT, "text", _specialist(root, tiny_base, TEXT, PromptPruning(), 1), "promoted"),
            task(
                TOOL, "tool_call", _specialist(root, tiny_base, TOOL, tool_pruning, 2), "promoted"
            ),
            # Kept on the LLM by the gate: it answers only in shadow mode.
            task(REPLY, "text", _specialist(root, tiny_base, REPLY, PromptPruning(), 3), "llm"),
        ],
        savings=Savings(
            specialist_share=0.6,
            specialist_calls=200,
            llm_cost_usd=1.0,
            llm_cost_usd_moved=0.6,
            llm_latency_s_moved=None,
            prices="test",
        ),  # fmt: skip
    )
    path = root / "manifest.yaml"
    write_manifest(manifest, path)
    manifest = read_manifest(path)
    return Deployment(
        manifest_path=path,
        manifest=manifest,
        pool=SpecialistPool(task_runtimes(manifest, unpromoted=True)),
        fireact=_load("fireact", 12),
        tool_calls=tool_calls,
        replies=replies,
    )


def _record(call: dict[str, Any]):  # noqa: ANN202
    from slmify.collect import from_openai_log

    return from_openai_log(call, "test")[0]


def _router(dep: Deployment) -> TableRouter:
    table = {_key(c["request"]["messages"]): (TEXT, 0.9) for c in dep.fireact[:-2]}
    table[_key(dep.fireact[-2]["request"]["messages"])] = (TEXT, 0.3)  # below the threshold
    table |= {_key(c["request"]["messages"]): (TOOL, 0.9) for c in dep.tool_calls}
    table |= {_key(c["request"]["messages"]): (REPLY, 0.8) for c in dep.replies}
    return TableRouter(table)  # fireact[-1] is unknown to it: no match


@contextmanager
def running(
    dep: Deployment, store: Any, shadow: float = 0.0, router: Any = None
) -> Iterator[tuple[str, FakeLLM]]:
    """The router in front of a fake LLM; leaving stops it, drains shadows, flushes."""
    fake = FakeLLM(dep.fireact + dep.tool_calls + dep.replies)
    writer = CallWriter(store)
    try:
        with serving(fake.app) as up:
            service = Service(
                manifest=dep.manifest,
                router=router or _router(dep),
                pool=dep.pool,
                upstream=Upstream(f"{up}/v1", 10),
                writer=writer,
                shadow_rate=shadow,
            )
            with serving(make_app(service)) as url:
                yield url, fake
    finally:
        writer.close()


def post(
    url: str, bodies: list[dict[str, Any]], headers: dict[str, str] | None = None
) -> list[tuple[int, dict[str, str], bytes]]:
    """POST the bodies concurrently: [(status, headers, body)] in order."""

    async def one(s: aiohttp.ClientSession, body: dict[str, Any]) -> tuple:
        async with s.post(f"{url}/v1/chat/completions", json=body, headers=headers) as r:
            return r.status, dict(r.headers), await r.read()

    async def go() -> list[tuple[int, dict[str, str], bytes]]:
        async with aiohttp.ClientSession() as s:
            return list(await asyncio.gather(*(one(s, b) for b in bodies)))

    return asyncio.run(go())


@pytest.fixture
def store(tmp_path: Path):
    with open_store(str(tmp_path / "ws" / "calls.db")) as st:
        yield st


def _route(store: Any, call_id: str) -> ServedRoute:
    return ServedRoute.model_validate(store.get_call(call_id).record.metadata["route"])


# -- routing over HTTP --------------------------------------------------------------------


def test_a_routed_call_is_answered_by_its_specialist(deployment, store):
    call = deployment.fireact[0]
    with running(deployment, store) as (url, fake):
        [(status, headers, body)] = post(url, [call["request"]], {"x-slmify-session": "s-1"})
    assert status == 200, body
    assert headers[ROUTE_HEADER] == TEXT
    assert headers[REASON_HEADER] == "routed: confidence 0.90 >= 0.50"
    assert fake.seen == []  # the LLM was never asked
    completion = json.loads(body)
    assert completion["object"] == "chat.completion" and completion["model"] == TEXT
    [choice] = completion["choices"]
    expected = deployment.pool.answer(TEXT, parse_request(call["request"]))
    assert choice["message"] == expected.message and choice["message"]["content"]
    assert choice["finish_reason"] in ("stop", "length")
    # The prompt is the one training built: the task's pruning, the model's chat template.
    spec = deployment.pool._models[deployment.pool.tasks[TEXT].base_path]
    prompt = build_prompt(spec.tokenizer, parse_request(call["request"]), PromptPruning())
    usage = completion["usage"]
    assert usage["prompt_tokens"] == len(spec.tokenizer(prompt, add_special_tokens=False).input_ids)
    assert 1 <= usage["completion_tokens"] <= 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    rec = store.get_call(completion["id"]).record
    assert rec.source == f"specialist:{TEXT}" and rec.session_id == "s-1"
    assert rec.response.message == choice["message"] and rec.usage.completion_tokens >= 1
    assert _route(store, completion["id"]) == ServedRoute(
        answered_by=TEXT,
        reason="routed: confidence 0.90 >= 0.50",
        task_id=TEXT,
        confidence=0.9,
        answer_confidence=expected.confidence,
    )
    assert 0.0 < expected.confidence <= 1.0


def test_calls_no_specialist_should_answer_go_to_the_llm(deployment, store):
    unmatched, low = deployment.fireact[-1], deployment.fireact[-2]
    reply = deployment.replies[0]
    two = {**deployment.fireact[1]["request"], "n": 2}
    with running(deployment, store) as (url, fake):
        got = post(url, [unmatched["request"], low["request"], reply["request"], two])
    reasons = [(h[ROUTE_HEADER], h[REASON_HEADER]) for _, h, _ in got]
    assert reasons == [
        ("llm", "no-match: no task fits (0.20)"),
        ("llm", f"low-confidence: {TEXT} at 0.30 < 0.50"),
        ("llm", f"not-promoted: {REPLY} stays on the LLM"),
        ("llm", "out-of-scope: n=2: a specialist gives one answer"),
    ]
    assert len(fake.seen) == 4
    for (status, _, body), call in zip(
        got, [unmatched, low, reply, deployment.fireact[1]], strict=True
    ):
        assert status == 200
        assert json.loads(body)["choices"] == call["response"]["choices"]  # the LLM's own answer
        route = _route(store, call["response"]["id"])
        assert route.answered_by == "llm" and route.specialist is None


class BrokenRouter:
    def route_many(self, requests: list[ChatRequest]) -> list[tuple[str | None, float]]:
        raise RuntimeError("embedding model missing")


class SlowRouter(TableRouter):
    """A router that takes its time, as embedding does, and notes each batch's size."""

    def __init__(self, table: dict[str, tuple[str, float]]):
        super().__init__(table)
        self.batches: list[int] = []

    def route_many(self, requests: list[ChatRequest]) -> list[tuple[str | None, float]]:
        time.sleep(0.3)
        self.batches.append(len(requests))
        return super().route_many(requests)


def test_concurrent_calls_are_routed_in_batches(deployment, store):
    calls = deployment.replies[:3] + deployment.fireact[-2:]  # not promoted, low, no match
    router = SlowRouter(_router(deployment).table)
    with running(deployment, store, router=router) as (url, fake):
        got = post(url, [c["request"] for c in calls])
    assert sum(router.batches) == len(calls) and max(router.batches) > 1
    reasons = [h[REASON_HEADER].split(":")[0] for _, h, _ in got]
    assert reasons == ["not-promoted"] * 3 + ["low-confidence", "no-match"]
    for (_, _, body), call in zip(got, calls, strict=True):
        assert json.loads(body)["choices"] == call["response"]["choices"]


def test_a_failing_router_leaves_the_call_to_the_llm(deployment, store):
    call = deployment.fireact[0]
    with running(deployment, store, router=BrokenRouter()) as (url, fake):
        [(status, headers, body)] = post(url, [call["request"]])
    assert status == 200 and headers[ROUTE_HEADER] == "llm"
    assert headers[REASON_HEADER] == "router-error: embedding model missing"
    assert json.loads(body)["choices"] == call["response"]["choices"]
    assert store.count_calls() == 1


def test_a_low_confidence_answer_goes_to_the_llm_with_its_reason(deployment, store):
    from dataclasses import replace

    call = deployment.fireact[0]
    request = parse_request(call["request"])
    confidence = deployment.pool.answer(TEXT, request).confidence * 0.9  # x the router's
    task = deployment.pool.tasks[TEXT]
    try:
        deployment.pool.tasks[TEXT] = replace(task, threshold=confidence + 0.01)
        with running(deployment, store) as (url, fake):
            [(status, headers, body)] = post(url, [call["request"]])
        assert status == 200 and headers[ROUTE_HEADER] == "llm"
        reason = f"deferred: low-confidence {confidence:.2f} < {confidence + 0.01:.2f}"
        assert headers[REASON_HEADER] == reason
        assert json.loads(body)["choices"] == call["response"]["choices"]  # the LLM's
        [stored] = list(store.iter_calls())
        route = ServedRoute.model_validate(stored.record.metadata["route"])
        assert route.answered_by == "llm" and route.reason == reason
        assert route.specialist.task_id == TEXT
        assert route.specialist.confidence * 0.9 == pytest.approx(confidence)
        # At the threshold exactly, the specialist answers.
        deployment.pool.tasks[TEXT] = replace(task, threshold=confidence - 1e-9)
        with running(deployment, store) as (url, fake):
            [(status, headers, body)] = post(url, [call["request"]])
        assert headers[ROUTE_HEADER] == TEXT and fake.seen == []
    finally:
        deployment.pool.tasks[TEXT] = task


def test_an_invalid_specialist_answer_is_replaced_by_the_llms(deployment, store):
    call = deployment.tool_calls[0]
    with running(deployment, store) as (url, fake):
        [(status, headers, body)] = post(url, [call["request"]])
    rejected = deployment.pool.answer(TOOL, parse_request(call["request"]))
    assert rejected.problem is not None  # random weights never write a valid tool call
    assert status == 200 and headers[ROUTE_HEADER] == "llm"
    assert headers[REASON_HEADER] == f"invalid-output: {rejected.problem}"
    assert body == fake.sent[-1]  # the client got the LLM's bytes, not the broken answer
    route = _route(store, call["response"]["id"])
    assert route.task_id == TOOL and route.confidence == 0.9
    assert route.specialist.problem == rejected.problem
    assert route.specialist.text == rejected.text and route.specialist.output_tokens >= 1


def test_streaming_from_the_specialist_and_from_the_llm(deployment, store):
    call, tool = deployment.fireact[2], deployment.tool_calls[1]
    streamed = {**call["request"], "stream": True, "stream_options": {"include_usage": True}}
    with running(deployment, store) as (url, fake):
        (_, _, plain), (status, headers, sse) = post(url, [call["request"], streamed])
        [(_, tool_headers, tool_sse)] = post(url, [{**tool["request"], "stream": True}])
    assert status == 200 and headers["Content-Type"] == "text/event-stream"
    assert headers[ROUTE_HEADER] == TEXT
    events = list(parse_sse(sse))
    assert len(events) >= 4 and sse.endswith(b"data: [DONE]\n\n")
    assembled = assemble_stream(events)
    expected = json.loads(plain)
    assert assembled["choices"] == expected["choices"]
    assert assembled["usage"] == expected["usage"]
    # The tool call falls back: the LLM's stream is relayed as it came.
    assert tool_headers[ROUTE_HEADER] == "llm"
    assert tool_headers[REASON_HEADER].startswith("invalid-output: ")
    assert b"".join(fake.sent).endswith(tool_sse)
    tool_answer = assemble_stream(parse_sse(tool_sse))
    assert tool_answer["choices"][0]["message"] == tool["response"]["choices"][0]["message"]


def test_every_call_is_recorded_with_its_route(deployment, store):
    bodies = [c["request"] for c in deployment.fireact[:4] + deployment.tool_calls[:3]]
    bodies += [deployment.replies[1]["request"], {**deployment.fireact[4]["request"], "n": 3}]
    with running(deployment, store) as (url, _):
        got = post(url, bodies)
    assert [s for s, _, _ in got] == [200] * 9
    headers = sorted((h[ROUTE_HEADER], h[REASON_HEADER].split(":")[0]) for _, h, _ in got)
    assert headers == sorted(
        [(TEXT, "routed")] * 4
        + [("llm", "invalid-output")] * 3
        + [("llm", "not-promoted"), ("llm", "out-of-scope")]
    )
    records = [s.record for s in store.iter_calls()]
    assert len(records) == 9
    recorded = sorted(
        (r.metadata["route"]["answered_by"], r.metadata["route"]["reason"].split(":")[0])
        for r in records
    )
    assert recorded == headers


def test_shadow_mode_answers_with_the_llm_and_records_the_agreement(deployment, store):
    call = deployment.fireact[3]
    with running(deployment, store, shadow=1.0) as (url, fake):
        [(status, headers, body)] = post(url, [call["request"]])
        assert headers[ROUTE_HEADER] == "llm" and len(fake.seen) == 1
        reason = f"shadow: sampled at 1, {TEXT} (promoted) answers in the background"
        assert headers[REASON_HEADER] == reason
        assert json.loads(body)["choices"] == call["response"]["choices"]
    route = _route(store, call["response"]["id"])  # written once the shadow answer is scored
    shadow = deployment.pool.answer(TEXT, parse_request(call["request"]))
    assert route.shadow and route.task_id == TEXT and route.specialist.text == shadow.text
    score = route.specialist.score
    assert score.shape == "text" and not score.agree and 0.0 <= score.score < 0.5
    assert set(score.metrics) == {"cosine", "rouge_l"}


def test_shadow_mode_tries_a_specialist_the_gate_kept_on_the_llm(deployment, store):
    call = deployment.replies[0]
    with running(deployment, store) as (url, fake):
        [(_, headers, _)] = post(url, [call["request"]])
        assert headers[REASON_HEADER] == f"not-promoted: {REPLY} stays on the LLM"
    with running(deployment, store, shadow=1.0) as (url, fake):
        [(_, headers, body)] = post(url, [call["request"]])
        assert headers[ROUTE_HEADER] == "llm"
        reason = f"shadow: sampled at 1, {REPLY} (not promoted) answers in the background"
        assert headers[REASON_HEADER] == reason
        assert json.loads(body)["choices"] == call["response"]["choices"]
    routes = [s.record.metadata["route"] for s in store.iter_calls()]
    assert [r["specialist"] is not None for r in routes] == [False, True]
    assert routes[1]["specialist"]["task_id"] == REPLY and routes[1]["shadow"]


def test_upstream_credentials_pass_through_or_come_from_the_environment(
    deployment, store, tmp_path, monkeypatch
):
    # The operator's key goes upstream only for a client holding a slmify key (see
    # test_security for the attacks); without client keys, the client's own goes through.
    monkeypatch.setenv("SLMIFY_UPSTREAM_API_KEY", SECRET)
    monkeypatch.setenv("SLMIFY_API_KEY", "slm-client-key")
    calls = deployment.replies[2:5]
    with running(deployment, store) as (url, fake):
        [(refused, _, _)] = post(url, [calls[0]["request"]], {"Authorization": "Bearer sk-own"})
        post(url, [calls[1]["request"]], {"Authorization": "Bearer slm-client-key"})
    assert refused == 401 and len(fake.seen) == 1
    assert fake.seen[0]["Authorization"] == f"Bearer {SECRET}"
    monkeypatch.delenv("SLMIFY_API_KEY")
    with running(deployment, store) as (url, fake):
        post(url, [calls[2]["request"]], {"Authorization": "Bearer sk-client"})
    assert fake.seen[0]["Authorization"] == "Bearer sk-client"
    assert store.count_calls() == 2
    db = (tmp_path / "ws" / "calls.db").read_bytes()
    assert SECRET.encode() not in db and b"slm-client-key" not in db


def test_a_request_naming_a_task_model_skips_the_router(deployment, store):
    unmatched = deployment.fireact[-1]["request"]  # the router knows no task for it
    with running(deployment, store) as (url, fake):
        [(_, headers, body)] = post(url, [{**unmatched, "model": TEXT}])
        [(_, fb_headers, fb_body)] = post(url, [{**unmatched, "model": TEXT, "logprobs": True}])
    assert headers[ROUTE_HEADER] == TEXT
    assert headers[REASON_HEADER] == "pinned: the request's model is the task"
    assert fb_headers[REASON_HEADER] == "out-of-scope: logprobs requested"
    # Falling back, the call goes to the LLM under the LLM's name.
    rec = store.get_call(json.loads(fb_body)["id"]).record
    assert rec.request.model == "gpt-4o" and len(fake.seen) == 1


def test_models_and_health(deployment, store):
    async def get(url: str) -> tuple[dict, dict]:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{url}/v1/models") as r:
                models = await r.json()
            async with s.get(f"{url}/health") as r:
                return models, await r.json()

    with running(deployment, store) as (url, _):
        models, health = asyncio.run(get(url))
    assert [m["id"] for m in models["data"]] == [TEXT, TOOL, "gpt-4o"]
    assert health["status"] == "ok" and health["specialists"] == [TEXT, TOOL]
    assert health["router"] is True and health["fallback"] == "gpt-4o"


# -- with the real router ---------------------------------------------------------------


@pytest.mark.slow
def test_a_router_fitted_by_the_cluster_stage_routes_real_calls(tiny_base, tmp_path):
    """`slmify cluster` on 60 FireAct + 60 tau-airline calls; its largest FireAct task is
    promoted, and the service is loaded from the manifest the way `slmify serve` loads it."""
    from slmify.cluster import ClusterConfig, cluster_store
    from slmify.manifest import write_manifest
    from slmify.serve import load_service
    from slmify.workspace import Workspace

    ws = Workspace.resolve(tmp_path / "ws")
    raw = {name: _load(name, 60) for name in ("fireact", "tau-airline")}
    with ws.open_store() as st:
        st.add_calls([_record(c) for calls in raw.values() for c in calls])
        cluster_store(st, ws, ClusterConfig(sample_size=100))
    tasks = [t.model_dump(mode="json") for t in ws.tasks()]
    assigned = ws.assigned()
    fireact_ids = {c["id"] for c in raw["fireact"]}
    promoted = max(
        (t for t in tasks if t["output_shape"] == "text"),
        key=lambda t: sum(assigned.get(i) == t["id"] for i in fireact_ids),
    )["id"]
    spec = _specialist(ws.root, tiny_base, promoted, PromptPruning(), 1)
    manifest = Manifest(
        created_at=datetime.now(timezone.utc),
        router=RouterSpec(
            embedding_model="all-MiniLM-L6-v2",
            artifact="cluster/router",
            confidence_threshold=THRESHOLD,
        ),  # fmt: skip
        fallback=FallbackLLM(model="gpt-4o", endpoint=None),
        tasks=[
            ManifestTask(
                id=t["id"],
                label=t["label"],
                share=t["share"],
                calls=t["calls"],
                output_shape=t["output_shape"],
                status="promoted" if t["id"] == promoted else "llm",
                reason="test",
                specialist=spec if t["id"] == promoted else None,
            )
            for t in tasks
        ],  # fmt: skip
        savings=Savings(
            specialist_share=0.3,
            specialist_calls=20,
            llm_cost_usd=1.0,
            llm_cost_usd_moved=0.3,
            llm_latency_s_moved=None,
            prices="test",
        ),  # fmt: skip
    )
    write_manifest(manifest, ws.root / "manifest.yaml")
    fake = FakeLLM(raw["fireact"] + raw["tau-airline"])
    mine = next(c for c in raw["fireact"] if assigned.get(c["id"]) == promoted)
    tau = raw["tau-airline"][0]
    with open_store(str(tmp_path / "served.db")) as st, serving(fake.app) as up:
        service = load_service(ws.root / "manifest.yaml", st, f"{up}/v1", 10, 0.0)
        try:
            expected = service.router.route(parse_request(mine["request"]))
            assert expected[0] == promoted and expected[1] >= THRESHOLD
            with serving(make_app(service)) as url:
                got = post(url, [mine["request"], tau["request"]])
        finally:
            service.writer.close()
        assert [h[ROUTE_HEADER] for _, h, _ in got] == [promoted, "llm"]
        assert got[0][1][REASON_HEADER] == f"routed: confidence {expected[1]:.2f} >= 0.50"
        assert got[1][1][REASON_HEADER].split(":")[0] in ("no-match", "not-promoted")
        assert st.count_calls() == 2 and len(fake.seen) == 1


# -- the specialists ----------------------------------------------------------------------


def test_adapters_switch_per_task_as_if_each_were_loaded_alone(deployment):
    from slmify.models import inference_dtype
    from slmify.runtime import Specialist

    request = parse_request(deployment.fireact[5]["request"])
    # TEXT, TOOL, then TEXT again: switching back gives the first adapter's answer again.
    text, tool, again = (deployment.pool.answer(t, request).text for t in (TEXT, TOOL, TEXT))
    assert text == again and text != tool
    # TOOL's adapter was attached second (load_adapter): alone, it answers the same.
    rt = deployment.pool.tasks[TOOL]
    alone = Specialist(rt.base_path, rt.adapter, 8)
    assert alone.answer(build_prompt(alone.tokenizer, request, rt.pruning), True).text == tool
    # Generation runs in the device's native half precision where it has one.
    assert alone.model.get_base_model().dtype == inference_dtype("cpu")


def test_requests_out_of_the_specialists_scope(deployment):
    tool = deployment.pool.tasks[TOOL]
    text = deployment.pool.tasks[TEXT]
    req = deployment.tool_calls[0]["request"]

    def scope(rt: Any, **changes: Any) -> str | None:
        return out_of_scope(rt, parse_request({**req, **changes}))

    assert scope(tool) is None
    assert scope(tool, tools=req["tools"][:3]) == (
        "the request offers other tools than the task was trained with"
    )
    assert scope(tool, tools=None) == (
        "the request offers other tools than the task was trained with"
    )
    assert scope(tool, tool_choice="none") == (
        "tool calls forbidden (tool_choice none) on a tool-calling task"
    )
    assert scope(text, response_format={"type": "json_object"}) == (
        "response_format json_object asked of a task answered as text"
    )
    assert scope(text, top_logprobs=2) == "logprobs requested"


def test_answers_that_must_not_reach_the_client(deployment):
    from slmify.datasets import parse_output

    tool, text = deployment.pool.tasks[TOOL], deployment.pool.tasks[TEXT]
    req = parse_request(deployment.tool_calls[0]["request"])

    def problem(rt: Any, out: str, request: ChatRequest = req) -> str | None:
        return answer_problem(rt, request, out, parse_output(out, _specs(request)))

    ok = '<tool_call>{"name": "get_user_details", "arguments": {"user_id": "mia_li_3668"}}'
    assert problem(tool, ok + "</tool_call>") is None
    assert problem(tool, "<tool_call>{name: get_user_details}</tool_call>") == (
        "a tool call is not JSON: '{name: get_user_details}'"
    )
    assert problem(tool, '<tool_call>{"name": "delete_everything", "arguments": {}}') == (
        "tool 'delete_everything' was not offered"
    )
    assert problem(tool, '<tool_call>{"name": "get_user_details", "arguments": {"id": 1}}') == (
        "the arguments of get_user_details fail its JSON schema"
    )
    assert problem(tool, "Sure, let me look.") == "a tool-calling task answered without a tool call"
    forced = ChatRequest(**{**req.model_dump(), "params": {"tool_choice": {"type": "function",
                         "function": {"name": "cancel_reservation"}}}})  # fmt: skip
    assert (
        problem(tool, ok, forced)
        == "tool_choice forces cancel_reservation and another tool was called"
    )
    plain = parse_request({"messages": [{"role": "user", "content": "hi"}]})
    assert problem(text, "", plain) == "empty answer"
    schema = {"type": "object", "required": ["answer"]}
    wants_json = parse_request({"messages": [{"role": "user", "content": "hi"}], "response_format":
                           {"type": "json_schema", "json_schema": {"schema": schema}}})  # fmt: skip
    assert problem(text, "yes", wants_json) == "the answer is not JSON"
    assert problem(text, '{"reply": "yes"}', wants_json) == (
        "the JSON fails the response_format schema: 'answer' is a required property"
    )
    assert problem(text, '{"answer": "yes"}', wants_json) is None


def _specs(request: ChatRequest) -> list[dict[str, Any]]:
    from slmify.specialists import offered_specs

    return offered_specs(request)


# -- the command --------------------------------------------------------------------------


def test_cli_serves_until_interrupted_and_prints_the_summary(deployment, tmp_path):
    # Without a router every call goes to the LLM; the specialists are still loaded.
    manifest = deployment.manifest.model_copy(update={"router": None})
    path = tmp_path / "manifest.yaml"
    from slmify.manifest import write_manifest

    write_manifest(manifest, path)
    fake = FakeLLM(deployment.fireact)
    with serving(fake.app) as up:
        cmd = [str(Path(sys.executable).parent / "slmify"), "serve", "--manifest", str(path)]
        cmd += ["--upstream", f"{up}/v1", "--port", "0", "--json", "-w", str(tmp_path / "cli")]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        try:
            # Libraries may warn on stderr first (bitsandbytes without its CPU kernels).
            lines = iter(proc.stderr.readline, "")
            line = next((x for x in lines if x.startswith("slmify serve listening")), "")
            assert line.startswith("slmify serve listening on http://127.0.0.1:"), (
                proc.stderr.read()
            )
            url = line.split()[4].rstrip(":").removesuffix("/v1")
            got = post(url, [c["request"] for c in deployment.fireact[:2]])
            assert [h[REASON_HEADER] for _, h, _ in got] == ["no-router: the manifest has none"] * 2
        finally:
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    summary = json.loads(out)
    assert summary["specialists"] == [TEXT, TOOL]
    assert summary["answered_by"] == {"llm": 2} and summary["reasons"] == {"no-router": 2}
    assert summary["recorded"] == 2 and summary["not_recorded"] == 0


def test_cli_names_a_missing_manifest(tmp_path):
    from typer.testing import CliRunner

    from slmify.cli import app

    missing = tmp_path / "nope.yaml"
    result = CliRunner().invoke(
        app, ["serve", "--manifest", str(missing), "--upstream", "http://127.0.0.1:9/v1"]
    )
    assert result.exit_code == 1 and f"error: no such file: {missing}" in result.output


# -- the manifest is the whole deployment contract ------------------------------------------


def test_serve_reads_only_the_manifest_and_what_it_names(demo_trained, tmp_path, tiny_base):
    """`slmify manifest` on the demo as cluster and train left it, one task trained with
    `generate.constrained=false`; then everything the manifest does not name is deleted
    (each specialist's recipe.yaml, pruning.json, splits, dataset, result; the tasks and
    assignments): serve still loads it, each task prompted, capped and decoded as eval's
    runtime built from the train stage's files, and answers as that runtime does."""
    import shutil

    from conftest import TINY_TRAIN, run_cli, sets

    from slmify.evaluate import trained_task
    from slmify.manifest import read_manifest
    from slmify.serve import load_service
    from slmify.workspace import Workspace

    root = tmp_path / "ws"
    shutil.copytree(demo_trained, root)
    ws = Workspace.at(root)
    tasks = ws.tasks()
    lora = [t.id for t in tasks if ws.result(t.id).kind == "lora" and t.output_shape != "text"]
    free = lora[0]
    overrides = [f"model.base={tiny_base}", *TINY_TRAIN, "generate.constrained=false"]
    trained = run_cli("train", "-w", str(root), "--task", free, *sets(overrides))
    # What `--json` printed is the summary train kept, the keys of its dict before the model.
    assert ws.train_summary().model_dump(mode="json") == trained
    assert list(trained)[:4] == ["recipe", "base_model", "device", "plan"]
    assert [t["id"] for t in trained["tasks"]] == [free] and trained["trained"] == 1
    run_cli("manifest", "-w", str(root))
    runtimes = {
        t.id: rt.runtime() for t in tasks if not isinstance(rt := trained_task(root, t), str)
    }
    evals = SpecialistPool(list(runtimes.values()))
    assigned = ws.assigned()
    requests = {}
    with open_store(str(root / "calls.db")) as st:
        for stored in st.iter_calls():
            task_id = assigned.get(stored.record.id)
            if task_id in runtimes and task_id not in requests:
                requests[task_id] = stored.record.request
    for task in tasks:
        folder = ws.specialist_dir(task.id)
        for path in folder.iterdir():
            if path.name not in ("adapter", "head"):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    ws.tasks_file().unlink()
    ws.assignments_file().unlink()

    manifest = read_manifest(root / "manifest.yaml")
    specs = {t.id: t.specialist for t in manifest.tasks if t.specialist}
    assert {t: s.constrained for t, s in specs.items() if s.kind == "lora"} == {
        t: t != free for t in runtimes if runtimes[t].kind == "lora"
    }
    with open_store(str(tmp_path / "served.db")) as st:
        # Shadow mode loads every trained specialist, promoted or not (none is: no eval).
        service = load_service(root / "manifest.yaml", st, "http://127.0.0.1:9/v1", 10, 1.0)
        service.writer.close()
    pool = service.pool
    assert set(pool.tasks) == set(runtimes) and service.router is not None
    assert pool.constrained == evals.constrained and pool.constrained[free] is False
    for task_id, runtime in runtimes.items():
        served = pool.tasks[task_id]
        assert (served.pruning, served.max_new_tokens) == (runtime.pruning, runtime.max_new_tokens)
        answer = pool.answer(task_id, requests[task_id])
        expected = evals.answer(task_id, requests[task_id])
        assert (answer.text, answer.confidence) == (expected.text, expected.confidence)


def test_an_older_manifest_reads_the_train_stages_files_as_serve_did(deployment, tmp_path):
    """A manifest written before it carried the pruning, the cap and `constrained` (the
    deployment fixture's, by hand) is served from the recipe and pruning.json beside the
    adapter; a current entry needs neither."""
    import shutil

    spec = next(t.specialist for t in deployment.manifest.tasks if t.id == TOOL)
    assert spec.pruning is None and spec.max_new_tokens is None and spec.constrained is None
    folder = tmp_path / TOOL
    shutil.copytree(Path(spec.adapter_path).parent, folder)
    recipe = "eval: {max_new_tokens: 5}\ngenerate: {constrained: false}\n"
    (folder / "recipe.yaml").write_text(recipe)
    legacy = spec.model_copy(update={"adapter_path": str(folder / "adapter")})

    def runtime(spec: SpecialistSpec):  # noqa: ANN202
        task = next(t for t in deployment.manifest.tasks if t.id == TOOL)
        entry = task.model_copy(update={"specialist": spec})
        return task_runtimes(deployment.manifest.model_copy(update={"tasks": [entry]}))[0]

    old = runtime(legacy)
    assert (old.max_new_tokens, old.constrained) == (5, False)
    pruning = PromptPruning.model_validate_json((folder / "pruning.json").read_text())
    assert old.pruning == pruning
    current = legacy.model_copy(
        update={"pruning": pruning, "max_new_tokens": 7, "constrained": True}
    )
    (folder / "recipe.yaml").unlink()
    (folder / "pruning.json").unlink()
    new = runtime(current)
    assert (new.pruning, new.max_new_tokens, new.constrained) == (pruning, 7, True)
    with pytest.raises(FileNotFoundError, match="run `slmify manifest` again"):
        runtime(legacy)
