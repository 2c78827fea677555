"""The recording proxy against a real fake LLM: both are aiohttp servers on 127.0.0.1.

The fake upstream answers the agent requests of real tau-airline calls with their
recorded gpt-4o responses (plain JSON, or an SSE stream that splits content and tool-call
arguments across chunks), fails on demand (429), or stays silent (timeouts).
"""

from __future__ import annotations

import asyncio
import gzip
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import dataset
from typer.testing import CliRunner

from slmify.cli import app as cli_app
from slmify.proxy import CallWriter, Upstream, make_app
from slmify.sse import assemble_stream, parse_sse
from slmify.store import open_store

SECRET = "sk-test-9f8e7d6c5b4a-DO-NOT-STORE"
RATE_LIMIT = b'{"error": {"message": "Rate limit reached for gpt-4o", "type": "requests"}}'


@pytest.fixture(scope="module")
def tau_calls() -> list[dict[str, Any]]:
    with gzip.open(dataset("tau-airline"), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in itertools.islice(f, 30)]


def _key(messages: list[dict[str, Any]]) -> str:
    return json.dumps(messages, sort_keys=True)


class FakeLLM:
    """An upstream that answers with the recorded response of the matching request."""

    def __init__(self, calls: list[dict[str, Any]]):
        self.answers = {_key(c["request"]["messages"]): c["response"] for c in calls}
        self.seen: list[dict[str, str]] = []  # the headers of each chat request received
        self.sent: list[bytes] = []  # each JSON body or SSE event sent, in order
        self.gate: threading.Event | None = None  # holds a stream after its first event
        self.app = web.Application()
        self.app.router.add_post("/v1/chat/completions", self.chat)
        self.app.router.add_get("/v1/models", self.models)

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "gpt-4o"}]})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(dict(request.headers))
        body = await request.json()
        if body["model"] == "slow":
            await asyncio.sleep(3)
        if body["model"] == "fail":
            self.sent.append(RATE_LIMIT)
            return web.Response(status=429, body=RATE_LIMIT, content_type="application/json")
        answer = {
            **self.answers[_key(body["messages"])],
            "usage": {"prompt_tokens": 812, "completion_tokens": 23, "total_tokens": 835},
        }
        if body["model"] == "reused-id":
            answer["id"] = "chatcmpl-123"
        if body.get("stream"):
            return await self.stream(request, answer, body.get("stream_options") or {})
        # Indented with a trailing newline: a proxy that re-serialized would show.
        data = (json.dumps(answer, indent=2) + "\n").encode()
        self.sent.append(data)
        return web.Response(body=data, content_type="application/json")

    async def stream(
        self, request: web.Request, answer: dict[str, Any], options: dict[str, Any]
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        events = [
            b"data: " + json.dumps(e).encode() + b"\n\n"
            for e in stream_events(answer, options.get("include_usage", False))
        ] + [b"data: [DONE]\n\n"]
        for i, event in enumerate(events):
            self.sent.append(event)
            await resp.write(event)
            if i == 0 and self.gate is not None:
                await asyncio.get_running_loop().run_in_executor(None, self.gate.wait, 5)
        await resp.write_eof()
        return resp


def stream_events(answer: dict[str, Any], include_usage: bool) -> list[dict[str, Any]]:
    """The chunks OpenAI would stream for `answer`: text in 7-char and arguments in
    5-char fragments."""
    base = {"id": answer["id"], "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o"}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    msg = answer["choices"][0]["message"]
    text = msg.get("content")
    events = [chunk({"role": "assistant", "content": "" if text is not None else None})]
    events += [chunk({"content": text[i : i + 7]}) for i in range(0, len(text or ""), 7)]
    for n, call in enumerate(msg.get("tool_calls") or []):
        fn = call["function"]
        head = {"name": fn["name"], "arguments": ""}
        first = {"index": n, "id": call["id"], "type": "function", "function": head}
        events.append(chunk({"tool_calls": [first]}))
        events += [
            chunk(
                {
                    "tool_calls": [
                        {"index": n, "function": {"arguments": fn["arguments"][i : i + 5]}}
                    ]
                }
            )
            for i in range(0, len(fn["arguments"]), 5)
        ]
    events.append(chunk({}, answer["choices"][0]["finish_reason"]))
    if include_usage:
        events.append({**base, "choices": [], "usage": answer["usage"]})
    return events


@contextmanager
def serving(app: web.Application) -> Iterator[str]:
    """Run `app` on 127.0.0.1, on a free port, in a background event loop."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)

    async def start() -> int:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return runner.addresses[0][1]

    port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@contextmanager
def proxy(upstream: str, store: Any, timeout_s: float = 5.0) -> Iterator[tuple[str, CallWriter]]:
    """The proxy in front of `upstream`; leaving it stops the server, then flushes."""
    writer = CallWriter(store)
    try:
        with serving(make_app(Upstream(upstream, timeout_s), writer)) as url:
            yield url, writer
    finally:
        writer.close()


def start_cli_proxy(upstream: str, ws: Path) -> tuple[subprocess.Popen, str]:
    """`slmify collect proxy --json` in its own process on a free port, and its base URL
    once it says it listens."""
    cmd = [str(Path(sys.executable).parent / "slmify"), "collect", "proxy"]
    cmd += ["--upstream", f"{upstream}/v1", "--port", "0", "--json", "-w", str(ws)]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    line = proc.stderr.readline()
    assert line.startswith("slmify proxy listening on http://127.0.0.1:"), line
    return proc, line.split()[4].rstrip(",").removesuffix("/v1")


def send(url: str, bodies: list[dict[str, Any]], headers: dict[str, str] | None = None):
    """POST each body to URL/v1/chat/completions in turn: [(status, body bytes)]."""

    async def go() -> list[tuple[int, bytes]]:
        async with aiohttp.ClientSession() as s:
            out = []
            for body in bodies:
                async with s.post(f"{url}/v1/chat/completions", json=body, headers=headers) as r:
                    out.append((r.status, await r.read()))
            return out

    return asyncio.run(go())


def events(data: bytes) -> list[bytes]:
    return [e + b"\n\n" for e in data.split(b"\n\n") if e]


@pytest.fixture
def store(tmp_path: Path):
    with open_store(str(tmp_path / "ws" / "calls.db")) as st:
        yield st


def test_json_calls_pass_unchanged_and_are_recorded_without_the_key(tau_calls, store, tmp_path):
    fake = FakeLLM(tau_calls)
    headers = {
        "Authorization": f"Bearer {SECRET}",
        "api-key": SECRET,
        "x-slmify-session": "sess-7",
        "x-slmify-agent": "airline-support",
    }
    with serving(fake.app) as up, proxy(f"{up}/v1", store) as (url, writer):
        got = send(url, [c["request"] for c in tau_calls], headers)
    assert got == [(200, body) for body in fake.sent]  # byte for byte
    assert all(
        h["Authorization"] == f"Bearer {SECRET}" and h["api-key"] == SECRET for h in fake.seen
    )
    assert not any(k.lower().startswith("x-slmify") for h in fake.seen for k in h)
    assert writer.counts == {"requests": 30, "recorded": 30, "failed": 0, "not_recorded": 0}

    stored = {c.record.id: c.record for c in store.iter_calls()}
    assert len(stored) == 30
    for call in tau_calls:
        rec = stored[call["response"]["id"]]
        assert rec.source == f"proxy:{up}/v1" and rec.status == "ok"
        assert (rec.session_id, rec.agent) == ("sess-7", "airline-support")
        assert rec.request.messages == call["request"]["messages"]
        assert rec.request.tools == call["request"]["tools"]
        assert rec.response.message == call["response"]["choices"][0]["message"]
        assert rec.usage.total_tokens == 835 and rec.latency_ms > 0 and rec.timestamp
    store.close()
    for path in (tmp_path / "ws").rglob("*"):
        assert SECRET.encode() not in path.read_bytes(), path


def test_stream_is_relayed_chunk_by_chunk_and_reassembled(tau_calls, store):
    fake = FakeLLM(tau_calls)
    fake.gate = threading.Event()
    # One tool call and one text answer; the tool call's arguments span several chunks.
    picks = [
        next(c for c in tau_calls if c["response"]["choices"][0]["message"].get(kind))
        for kind in ("tool_calls", "content")
    ]

    async def stream_one(url: str, body: dict[str, Any]) -> bytes:
        fake.gate.clear()
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{url}/v1/chat/completions", json=body) as r:
                assert r.headers["Content-Type"] == "text/event-stream"
                # The upstream holds the rest until the first event has reached us.
                first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 5)
                fake.gate.set()
                return first + await r.content.read()

    with serving(fake.app) as up, proxy(f"{up}/v1", store) as (url, writer):
        received = [
            asyncio.run(
                stream_one(
                    url, {**c["request"], "stream": True, "stream_options": {"include_usage": True}}
                )
            )
            for c in picks
        ]
    assert events(b"".join(received)) == fake.sent
    assert writer.counts["recorded"] == 2
    for call in picks:
        rec = store.get_call(call["response"]["id"]).record
        assert rec.response.message == call["response"]["choices"][0]["message"]
        assert rec.response.finish_reason == call["response"]["choices"][0]["finish_reason"]
        assert rec.usage.completion_tokens == 23
        assert rec.request.params["stream"] is True


def test_upstream_errors_reach_the_client_and_are_recorded_as_failed(tau_calls, store):
    fake = FakeLLM(tau_calls)
    request = tau_calls[0]["request"]
    with serving(fake.app) as up:
        with proxy(f"{up}/v1", store, timeout_s=0.3) as (url, writer):
            got = send(url, [{**request, "model": "fail"}, {**request, "model": "slow"}])
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
        sock.close()
        with proxy(f"http://127.0.0.1:{closed_port}/v1", store) as (url, unreachable):
            got += send(url, [request])
    assert got[0] == (429, RATE_LIMIT)
    assert got[1][0] == 504 and json.loads(got[1][1])["error"]["type"] == "upstream_timeout"
    assert got[2][0] == 502 and json.loads(got[2][1])["error"]["type"] == "upstream_unreachable"
    assert writer.counts["failed"] == 2 and unreachable.counts["failed"] == 1
    errors = sorted(c.record.error for c in store.iter_calls())
    assert all(c.record.status == "error" and c.record.response is None for c in store.iter_calls())
    assert errors[0] == "HTTP 429: Rate limit reached for gpt-4o"
    assert errors[1].startswith(f"cannot reach upstream http://127.0.0.1:{closed_port}/v1")
    assert errors[2] == f"upstream {up}/v1 sent nothing for 0.3 s"


def test_a_stream_that_stalls_ends_with_an_error_event_and_a_failed_record(tau_calls, store):
    fake = FakeLLM(tau_calls)
    fake.gate = threading.Event()  # never set: the stream stops after its first event
    body = {**tau_calls[0]["request"], "stream": True}
    with serving(fake.app) as up, proxy(f"{up}/v1", store, timeout_s=0.3) as (url, _):
        [(status, data)] = send(url, [body])
        fake.gate.set()
    *relayed, last = events(data)
    assert status == 200 and relayed == fake.sent[:1]
    assert json.loads(last.removeprefix(b"data: "))["error"]["message"] == (
        "upstream stream stalled: nothing for 0.3 s"
    )
    [call] = list(store.iter_calls())
    assert call.record.status == "error" and "stalled" in call.record.error


def test_other_v1_requests_pass_through_unrecorded(tau_calls, store):
    fake = FakeLLM(tau_calls)

    async def models(url: str) -> tuple[int, Any]:
        async with aiohttp.ClientSession() as s, s.get(f"{url}/v1/models") as r:
            return r.status, await r.json()

    with serving(fake.app) as up, proxy(f"{up}/v1", store) as (url, writer):
        assert asyncio.run(models(url)) == (200, {"object": "list", "data": [{"id": "gpt-4o"}]})
    assert writer.counts["requests"] == 0 and store.count_calls() == 0


def test_reused_upstream_ids_get_new_record_ids(tau_calls, store):
    fake = FakeLLM(tau_calls)
    with serving(fake.app) as up, proxy(f"{up}/v1", store) as (url, _):
        send(url, [{**c["request"], "model": "reused-id"} for c in tau_calls[:3]])
    records = [c.record for c in store.iter_calls()]
    assert len({r.id for r in records}) == 3
    assert {r.response.response_id for r in records} == {"chatcmpl-123"}


class GatedStore:
    """A store whose inserts wait until the test opens the gate."""

    def __init__(self, store: Any):
        self.store, self.gate = store, threading.Event()

    def add_calls(self, records):  # noqa: ANN001, ANN201 - the Store.add_calls signature
        assert self.gate.wait(10)
        return self.store.add_calls(records)


def test_writes_never_hold_the_answer_and_shutdown_flushes_them(tau_calls, store, tmp_path):
    gated = GatedStore(store)
    fake = FakeLLM(tau_calls)
    with serving(fake.app) as up:
        writer = CallWriter(gated)
        with serving(make_app(Upstream(f"{up}/v1", 5), writer)) as url:
            got = send(url, [c["request"] for c in tau_calls[:10]])
        assert [s for s, _ in got] == [200] * 10  # answered while no write could happen
        with open_store(str(tmp_path / "ws" / "calls.db")) as reader:
            assert reader.count_calls() == 0
        gated.gate.set()
        writer.close()
    assert store.count_calls() == 10 and writer.counts["recorded"] == 10


def test_sse_parsing_and_parallel_tool_call_merging():
    body = (
        b": keep-alive comment\r\n\r\n"
        b'data: {"id": "c1", "choices": [{"index": 0, "delta": {"role": "assistant", '
        b'"tool_calls": [{"index": 0, "id": "a", "type": "function", '
        b'"function": {"name": "get_", "arguments": "{\\"x\\""}}]}}]}\r\n\r\n'
        b'data: {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 1, "id": "b",'
        b' "type": "function", "function": {"name": "search", "arguments": "{}"}}]}}]}\n\n'
        b'event: message\ndata: {"choices": [{"index": 0, "delta": {"role": "assistant", '
        b'"tool_calls": [{"index": 0, "function": {"name": "user", "arguments": ": 1}"}}]},\n'
        b'data: "finish_reason": "tool_calls"}]}\n\n'
        b"data: [DONE]\n\n"
    )
    completion = assemble_stream(parse_sse(body))
    assert completion["id"] == "c1"
    [choice] = completion["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "a",
                "type": "function",
                "function": {"name": "get_user", "arguments": '{"x": 1}'},
            },
            {"id": "b", "type": "function", "function": {"name": "search", "arguments": "{}"}},
        ],
    }


def test_cli_records_until_interrupted_and_prints_the_summary(tau_calls, tmp_path):
    fake = FakeLLM(tau_calls)
    with serving(fake.app) as up:
        proc, url = start_cli_proxy(up, tmp_path / "cli-ws")
        try:
            bodies = [c["request"] for c in tau_calls[:4]] + [
                {**tau_calls[4]["request"], "stream": True}
            ]
            assert [s for s, _ in send(url, bodies)] == [200] * 5
        finally:
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    summary = json.loads(out)
    assert {k: summary[k] for k in ("requests", "recorded", "failed", "not_recorded")} == {
        "requests": 5,
        "recorded": 5,
        "failed": 0,
        "not_recorded": 0,
    }
    with open_store(str(tmp_path / "cli-ws" / "calls.db")) as st:
        assert st.count_calls() == 5


def test_cli_rejects_an_upstream_that_is_not_a_url():
    result = CliRunner().invoke(cli_app, ["collect", "proxy", "--upstream", "localhost:8000"])
    assert result.exit_code == 1
    assert "error: --upstream must be an http:// or https:// URL, got 'localhost:8000'" in (
        result.output
    )


@pytest.mark.postgres
def test_records_into_a_postgresql_store(tau_calls, postgres_url):
    fake = FakeLLM(tau_calls)
    bodies = [c["request"] for c in tau_calls[:5]] + [{**tau_calls[5]["request"], "stream": True}]
    with open_store(postgres_url) as st:
        with serving(fake.app) as up, proxy(f"{up}/v1", st) as (url, writer):
            assert [s for s, _ in send(url, bodies, {"Authorization": SECRET})] == [200] * 6
        assert writer.counts["recorded"] == st.count_calls() == 6
        rec = st.get_call(tau_calls[5]["response"]["id"]).record
        assert rec.response.message == tau_calls[5]["response"]["choices"][0]["message"]
        dump = st.execute("SELECT string_agg(record, '') FROM calls").fetchone()[0]
        assert SECRET not in dump
