"""Recording never loses a call: poisoned requests, a killed proxy, a locked store, a client
that hung up. The proxy runs as a real process (kill -9) or in-process in front of a small
aiohttp upstream, both on 127.0.0.1; the store is a real SQLite file.
"""

from __future__ import annotations

import asyncio
import gzip
import itertools
import json
import signal
import sqlite3
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import dataset
from test_proxy import FakeLLM, serving, start_cli_proxy

from slmify import recording as recording_module
from slmify import store as store_module
from slmify.forwarding import Exchange, Upstream
from slmify.journal import read_entries
from slmify.proxy import make_app
from slmify.recording import CallWriter
from slmify.store import open_store


@pytest.fixture(scope="module")
def tau_calls() -> list[dict[str, Any]]:
    with gzip.open(dataset("tau-airline"), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in itertools.islice(f, 30)]


def exchange(call: dict[str, Any], request_body: bytes | None = None) -> Exchange:
    return Exchange(
        source="proxy:test",
        request_body=request_body or json.dumps(call["request"]).encode(),
        started=datetime.now(timezone.utc),
        status=200,
        body=json.dumps(call["response"]).encode(),
        latency_ms=1.0,
    )


def deep_body(depth: int) -> bytes:
    """A chat request whose message content is a list nested `depth` levels deep."""
    content = "[" * depth + '"x"' + "]" * depth
    return f'{{"model": "m", "messages": [{{"role": "user", "content": {content}}}]}}'.encode()


def test_a_poisoned_request_takes_no_other_call_with_it(tau_calls, tmp_path: Path) -> None:
    """Requests that parse but cannot be stored (nested 300 levels, a lone surrogate) among
    200 normal ones: each is a reject with its reason, the 200 are all recorded."""
    poisons = [deep_body(300), b'{"messages": [{"role": "user", "content": "\\ud800"}]}']
    with open_store(str(tmp_path / "ws" / "calls.db")) as store:
        writer = CallWriter(store)
        for i in range(200):
            writer.submit(exchange(tau_calls[i % 30]))
            if i in (50, 150):
                writer.submit(exchange(tau_calls[0], poisons[i // 100]))
        writer.close()
        assert store.count_calls() == 200
    assert writer.counts == {"requests": 202, "recorded": 200, "failed": 0, "not_recorded": 2}
    rejects = [json.loads(line) for line in (tmp_path / "ws" / "rejects.jsonl").open()]
    assert [r["reason"] for r in rejects] == [
        "invalid record: nested too deeply to serialize",
        "invalid record: text that is not valid Unicode (a lone surrogate)",
    ]
    assert not list((tmp_path / "ws").glob("recording-*.journal"))  # all done, all deleted


def test_kill_9_after_a_burst_loses_no_answered_call(tau_calls, tmp_path: Path) -> None:
    """The proxy process answers 200 calls while the store is locked (so none can be
    written), then is killed with SIGKILL; the next writer on the workspace stores all 200."""
    ws = tmp_path / "ws"
    db = ws / "calls.db"
    open_store(str(db)).close()
    lock = sqlite3.connect(db, isolation_level=None)
    fake = FakeLLM(tau_calls)
    with serving(fake.app) as up:
        proc, url = start_cli_proxy(up, ws)
        try:
            lock.execute("BEGIN IMMEDIATE")  # from here on the proxy cannot commit
            statuses = asyncio.run(burst(url, [c["request"] for c in tau_calls] * 7, 200))
            assert statuses == [200] * 200
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=20)
    lock.execute("ROLLBACK")
    lock.close()
    with open_store(str(db)) as store:
        assert store.count_calls() == 0
        writer = CallWriter(store)
        writer.close()
        assert writer.replayed == 200 and store.count_calls() == 200
        records = [c.record for c in store.iter_calls()]
    # Each call once: 30 distinct answers, each id reused by 6-7 calls, rekeyed apart.
    assert len({r.id for r in records}) == 200
    assert {r.response.response_id for r in records} == {c["response"]["id"] for c in tau_calls}
    assert not list(ws.glob("recording-*.journal"))
    with open_store(str(db)) as store:  # a second start replays nothing again
        again = CallWriter(store)
        again.close()
        assert again.replayed == 0 and store.count_calls() == 200


async def burst(url: str, bodies: list[dict[str, Any]], n: int) -> list[int]:
    async with aiohttp.ClientSession() as s:

        async def one(body: dict[str, Any]) -> int:
            async with s.post(f"{url}/v1/chat/completions", json=body) as r:
                await r.read()
                return r.status

        return await asyncio.gather(*(one(b) for b in bodies[:n]))


def test_replay_after_commit_stores_nothing_twice(tau_calls, tmp_path: Path) -> None:
    """A crash between the commit and the journal's cleanup: replaying stored calls (ids
    reused by the upstream included) adds nothing."""
    ws = tmp_path / "ws"
    with open_store(str(ws / "calls.db")) as store:
        writer = CallWriter(store)
        kept = []
        real_done = writer.journal.done
        writer.journal.done = lambda n, count=1: kept.append(n)  # the cleanup never happens
        for i in range(40):
            writer.submit(exchange(tau_calls[i % 30]))
        writer.close()
        writer.journal.done = real_done
        assert store.count_calls() == 40 and len(list(ws.glob("recording-*.journal"))) == 1
        again = CallWriter(store)
        again.close()
        assert again.replayed == 40 and store.count_calls() == 40


def test_a_store_locked_past_every_retry_keeps_calls_for_the_next_start(
    tau_calls, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws = tmp_path / "ws"
    monkeypatch.setattr(recording_module, "_retrying", fast_retrying(recording_module._retrying))
    monkeypatch.setattr(store_module, "with_retry", fast_retrying(store_module.with_retry))
    with open_store(str(ws / "calls.db")) as store:
        store.conn.execute("PRAGMA busy_timeout=20")
        lock = sqlite3.connect(ws / "calls.db", isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")
        writer = CallWriter(store)
        for call in tau_calls[:5]:
            writer.submit(exchange(call))
        writer.close()
        assert writer.counts["not_recorded"] == 5 and store.count_calls() == 0
        lock.execute("ROLLBACK")
        again = CallWriter(store)
        again.close()
        assert again.replayed == 5 and store.count_calls() == 5


def fast_retrying(real: Any) -> Any:
    """The same backoff, shortened from seconds to milliseconds."""
    return lambda fn, **_: real(fn, attempts=3, first_wait_s=0.01)


def test_a_cut_journal_entry_is_skipped_and_the_rest_replayed(tau_calls, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    with open_store(str(ws / "calls.db")) as store:
        writer = CallWriter(store)
        writer.journal.done = lambda n, count=1: None
        for call in tau_calls[:3]:
            writer.submit(exchange(call))
        writer.close()
    (seg,) = ws.glob("recording-*.journal")
    data = seg.read_bytes()
    assert len(list(read_entries(data))) == 3
    seg.write_bytes(data[:-10])  # the crash cut the last write
    with open_store(str(ws / "calls2.db")) as other:
        again = CallWriter(other, journal_dir=ws)
        again.close()
        assert again.replayed == 2 and other.count_calls() == 2


def test_a_client_that_hung_up_is_recorded_as_such(tmp_path: Path) -> None:
    async def slow_llm(request: web.Request) -> web.Response:
        await asyncio.sleep(0.6)
        return web.json_response(
            {"id": "c1", "choices": [{"message": {"role": "assistant", "content": "late"}}]}
        )

    upstream = web.Application()
    upstream.router.add_post("/v1/chat/completions", slow_llm)

    async def impatient(url: str) -> None:
        timeout = aiohttp.ClientTimeout(total=0.2)
        async with aiohttp.ClientSession(timeout=timeout) as s:
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
            with pytest.raises(TimeoutError):
                async with s.post(f"{url}/v1/chat/completions", json=body) as r:
                    await r.read()
        await asyncio.sleep(0.8)  # the upstream answers meanwhile

    with open_store(str(tmp_path / "ws" / "calls.db")) as store:
        writer = CallWriter(store)
        with serving(upstream) as up, serving(make_app(Upstream(f"{up}/v1", 5), writer)) as url:
            asyncio.run(impatient(url))
        writer.close()
        (call,) = store.iter_calls()
    assert call.record.status == "error"
    assert call.record.error == "the client went away before the answer was sent"
