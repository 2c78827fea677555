"""`slmify serve` and `slmify collect proxy` as an attacker meets them, on loopback.

Each server runs for real in front of a small upstream that records every request that
reaches it (method, raw path, headers) and answers any of them. Requests are sent with
http.client, which sends the path and the headers as written: no client-side path
normalisation, no Host header of its own. The serve instance has a manifest without a
router or specialists, so every chat call takes the LLM's path: the one that forwards.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from test_proxy import serving
from typer.testing import CliRunner

from slmify import proxy, serve
from slmify.cli import app as cli_app
from slmify.httpguard import Guard, GuardError, bound_names, configure, host_name
from slmify.proxy import CallWriter, Upstream
from slmify.schema import FallbackLLM, Manifest, Savings
from slmify.specialists import SpecialistPool
from slmify.store import open_store

CLIENT_KEY = "slm-client-3c1f9a77e2-CALLER"
OTHER_CLIENT_KEY = "slm-client-b04d6e5511-SECOND"
OPERATOR_KEY = "sk-operator-77aa1f0c9d-NEVER-LENT"
OWN_KEY = "sk-callers-own-5150e2"
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Where is my bag?"}]}
ANSWER = {
    "id": "chatcmpl-sec-1",
    "object": "chat.completion",
    "created": 1,
    "model": "gpt-4o",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "In Denver."},
            "finish_reason": "stop",
        }
    ],  # fmt: skip
    "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12},
}


@dataclass
class Seen:
    method: str
    path: str  # raw, with the query string
    headers: dict[str, str]


@dataclass
class RecordingLLM:
    """An upstream that answers anything and remembers what reached it."""

    seen: list[Seen] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.any)
        return app

    async def any(self, request: web.Request) -> web.Response:
        self.seen.append(Seen(request.method, request.raw_path, dict(request.headers)))
        await request.read()
        if request.path.endswith("/chat/completions"):
            return web.json_response(ANSWER)
        return web.json_response({"object": "list", "data": []})

    def header_values(self) -> str:
        return json.dumps([s.headers for s in self.seen])


def _manifest() -> Manifest:
    return Manifest(
        created_at=datetime.now(timezone.utc),
        router=None,
        fallback=FallbackLLM(model="gpt-4o", endpoint=None),
        tasks=[],
        savings=Savings(specialist_share=0.0, specialist_calls=0, llm_cost_usd=0.0,
                        llm_cost_usd_moved=0.0, llm_latency_s_moved=None, prices="test"),
    )  # fmt: skip


@contextmanager
def running(kind: str, guard: Guard, store: Any) -> Iterator[tuple[int, RecordingLLM]]:
    """`kind` ("proxy" or "serve") in front of a recording upstream: (port, upstream)."""
    llm = RecordingLLM()
    writer = CallWriter(store)
    try:
        with serving(llm.app()) as up:
            upstream = Upstream(f"{up}/v1", 5)
            if kind == "proxy":
                app = proxy.make_app(upstream, writer, guard)
            else:
                service = serve.Service(_manifest(), None, SpecialistPool([]), upstream, writer)
                app = serve.make_app(service, guard)
            with serving(app) as url:
                yield int(url.rsplit(":", 1)[1]), llm
    finally:
        writer.close()


def send(
    port: int,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    host: str | None = "default",
) -> tuple[int, dict[str, Any]]:
    """One request exactly as written; `host=None` sends no Host header at all."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        if host is not None:
            conn.putheader("Host", f"127.0.0.1:{port}" if host == "default" else host)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        data = resp.read()
        is_json = resp.getheader("Content-Type", "").startswith("application/json")
        return resp.status, json.loads(data) if is_json else {"text": data.decode()}
    finally:
        conn.close()


def post_chat(port: int, headers: dict[str, str] | None = None, **kw: Any) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **(headers or {})}
    return send(port, "POST", "/v1/chat/completions", headers, json.dumps(CHAT).encode(), **kw)


@pytest.fixture
def store(tmp_path: Path):
    with open_store(str(tmp_path / "ws" / "calls.db")) as st:
        yield st


@pytest.fixture
def keyed() -> Guard:
    """Clients authenticate; the operator has an upstream key."""
    return configure(
        environ={"SLMIFY_API_KEY": CLIENT_KEY, "SLMIFY_UPSTREAM_API_KEY": OPERATOR_KEY}
    )


@pytest.fixture
def open_guard() -> Guard:
    """No client keys, but the operator's key is in the environment all the same."""
    return configure(environ={"SLMIFY_UPSTREAM_API_KEY": OPERATOR_KEY})


BOTH = pytest.mark.parametrize("kind", ["proxy", "serve"])


# -- keys -----------------------------------------------------------------------------------


@BOTH
def test_only_authenticated_callers_are_forwarded_with_the_operators_key(kind, keyed, store):
    bearer = {"Authorization": f"Bearer {CLIENT_KEY}"}
    with running(kind, keyed, store) as (port, llm):
        refused = [
            post_chat(port),
            post_chat(port, {"Authorization": "Bearer slm-guessed"}),
            post_chat(port, {"Authorization": f"Basic {CLIENT_KEY}"}),  # not a bearer token
            post_chat(port, {"Authorization": f"Bearer {CLIENT_KEY[:-1]}"}),
            post_chat(port, {"api-key": OWN_KEY}),  # a key of the caller's own: not ours
            send(port, "GET", "/v1/models"),
        ]
        assert llm.seen == []  # nothing unauthenticated reached the upstream
        ok = [post_chat(port, bearer), post_chat(port, {"api-key": CLIENT_KEY})]
    assert [s for s, _ in refused] == [401] * 6
    assert refused[0][1]["error"] == {
        "message": "a valid slmify API key is required: Authorization: Bearer KEY",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }
    assert [(s, b["choices"]) for s, b in ok] == [(200, ANSWER["choices"])] * 2
    assert [s.headers["Authorization"] for s in llm.seen] == [f"Bearer {OPERATOR_KEY}"] * 2
    # The caller's slmify key never travels on, in either header.
    assert CLIENT_KEY not in llm.header_values()
    assert not any("api-key" in {k.lower() for k in s.headers} for s in llm.seen)
    assert keyed.rejected == {"invalid_api_key": 6}


@BOTH
def test_without_client_keys_the_operators_key_is_never_added(kind, open_guard, store):
    with running(kind, open_guard, store) as (port, llm):
        got = [
            post_chat(port)[0],
            post_chat(port, {"Authorization": f"Bearer {OWN_KEY}"})[0],
            post_chat(port, {"api-key": OWN_KEY})[0],
        ]
    assert got == [200, 200, 200]
    assert "authorization" not in {k.lower() for k in llm.seen[0].headers}
    assert llm.seen[1].headers["Authorization"] == f"Bearer {OWN_KEY}"
    assert llm.seen[2].headers["api-key"] == OWN_KEY
    assert OPERATOR_KEY not in llm.header_values()


def test_an_upstream_key_without_client_keys_is_called_out_at_startup(open_guard, keyed):
    assert open_guard.describe() == (
        "no client keys: each client's own key goes upstream (SLMIFY_UPSTREAM_API_KEY is set "
        "and NOT used: set SLMIFY_API_KEY or --api-key-file); Host: 127.0.0.1, ::1, localhost"
    )
    assert keyed.describe() == (
        "clients authenticate with 1 key(s); upstream key: SLMIFY_UPSTREAM_API_KEY; "
        "Host: 127.0.0.1, ::1, localhost"
    )
    for text in (repr(keyed), keyed.describe(), repr(open_guard)):
        assert CLIENT_KEY not in text and OPERATOR_KEY not in text


def test_health_stays_open_for_load_balancers_and_models_do_not(keyed, store):
    with running("serve", keyed, store) as (port, llm):
        health, models = send(port, "GET", "/health"), send(port, "GET", "/v1/models")
        authed = send(port, "GET", "/v1/models", {"Authorization": f"Bearer {CLIENT_KEY}"})
    assert health[0] == 200 and health[1]["status"] == "ok"
    assert models[0] == 401 and authed[0] == 200
    assert [m["id"] for m in authed[1]["data"]] == ["gpt-4o"] and llm.seen == []


def test_a_key_file_holds_one_key_a_line(tmp_path, store):
    path = tmp_path / "keys.txt"
    path.write_text(f"# agents\n{CLIENT_KEY}\n\n  {OTHER_CLIENT_KEY}  \n# slm-revoked-01\n")
    guard = configure(api_key_file=path, environ={})
    with running("proxy", guard, store) as (port, llm):
        got = [
            post_chat(port, {"Authorization": f"Bearer {key}"})[0]
            for key in (CLIENT_KEY, OTHER_CLIENT_KEY, "slm-revoked-01", "# agents")
        ]
    assert got == [200, 200, 401, 401] and len(llm.seen) == 2
    # Without an upstream key, an authenticated call goes upstream with no key at all.
    assert not any("authorization" in {k.lower() for k in s.headers} for s in llm.seen)


def test_a_key_file_that_cannot_be_used_is_refused_at_startup(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# none yet\n\n")
    with pytest.raises(GuardError) as e:
        configure(api_key_file=empty, environ={})
    assert str(e.value) == f"--api-key-file {empty} holds no key (one a line)"
    with pytest.raises(GuardError, match=r"^cannot read --api-key-file .*nope\.txt: "):
        configure(api_key_file=tmp_path / "nope.txt", environ={})
    for command in (["collect", "proxy"], ["serve", "--manifest", str(empty)]):
        result = CliRunner().invoke(
            cli_app, [*command, "--upstream", "http://127.0.0.1:9/v1", "--api-key-file", str(empty)]
        )
        assert result.exit_code == 1
        assert f"error: --api-key-file {empty} holds no key (one a line)" in result.output


def test_keys_are_never_logged_or_stored(keyed, store, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    with running("proxy", keyed, store) as (port, _):
        post_chat(port, {"Authorization": f"Bearer {CLIENT_KEY}"})
        post_chat(port, {"Authorization": f"Bearer {OPERATOR_KEY}"})  # refused, not echoed
    assert store.count_calls() == 1
    store.close()
    for path in (tmp_path / "ws").rglob("*"):
        data = path.read_bytes()
        assert CLIENT_KEY.encode() not in data and OPERATOR_KEY.encode() not in data, path
    assert CLIENT_KEY not in caplog.text and OPERATOR_KEY not in caplog.text


# -- routes and paths -----------------------------------------------------------------------

ESCAPES = [
    "/v1/../../etc/passwd",
    "/v1/../v1/chat/completions",
    "/v1/%2e%2e/%2e%2e/etc/passwd",
    "/v1/%2E%2E/admin",
    "/v1/..%2f..%2fetc%2fpasswd",
    "/v1/chat/completions/../../../admin",
    "/v1/./chat/completions",
    "/v1//chat/completions",
    "//v1/chat/completions",
    "/v1/chat/completions/",
    "/v1/chat%2fcompletions",
    "/v1/%63hat/completions",
    "/v1/chat/completions%00",
    "/v1/chat/completions;x=1",
    "/v1/files",
    "/v1/fine_tuning/jobs",
    "/v1/models/../../etc/passwd",
    "/etc/passwd",
    "/V1/chat/completions",
]


@BOTH
def test_path_escapes_and_unlisted_routes_never_reach_upstream(kind, keyed, store):
    headers = {"Authorization": f"Bearer {CLIENT_KEY}", "Content-Type": "application/json"}
    body = json.dumps(CHAT).encode()
    with running(kind, keyed, store) as (port, llm):
        got = {p: send(port, "POST", p, headers, body) for p in ESCAPES}
        wrong_method = [
            send(port, "GET", "/v1/chat/completions", headers)[0],
            send(port, "DELETE", "/v1/models", headers)[0],
            send(port, "OPTIONS", "/v1/chat/completions", headers)[0],
        ]
    assert llm.seen == []
    assert {p: s for p, (s, _) in got.items()} == dict.fromkeys(ESCAPES, 404)
    assert got["/v1/../../etc/passwd"][1]["error"]["message"] == (
        "no such route: POST /v1/../../etc/passwd"
    )
    assert wrong_method == [405, 405, 405]


@BOTH
def test_listed_routes_reach_upstream_at_their_own_path(kind, keyed, store):
    headers = {"Authorization": f"Bearer {CLIENT_KEY}", "Content-Type": "application/json"}
    embed = json.dumps({"model": "text-embedding-3-small", "input": "bag"}).encode()
    with running(kind, keyed, store) as (port, llm):
        statuses = [
            send(port, "POST", "/v1/chat/completions?api-version=2024-10-21", headers,
                 json.dumps(CHAT).encode())[0],
            send(port, "POST", "/v1/embeddings", headers, embed)[0],
            send(port, "POST", "/v1/completions", headers, b'{"prompt": "hi"}')[0],
            send(port, "GET", "/v1/models", headers)[0],
        ]  # fmt: skip
    assert statuses == [200] * 4
    forwarded = [(s.method, s.path) for s in llm.seen]
    expected = [
        ("POST", "/v1/chat/completions?api-version=2024-10-21"),
        ("POST", "/v1/embeddings"),
        ("POST", "/v1/completions"),
    ]
    # The proxy forwards the model list; serve answers it itself.
    assert forwarded == expected + ([("GET", "/v1/models")] if kind == "proxy" else [])


# -- bodies ---------------------------------------------------------------------------------


@BOTH
def test_cross_site_form_posts_are_refused(kind, open_guard, store):
    """What a page on another site can send without a CORS preflight: text/plain, a form,
    multipart. Without client keys nothing else stands in its way."""
    body = json.dumps(CHAT).encode()
    with running(kind, open_guard, store) as (port, llm):
        refused = {
            ctype: send(port, "POST", "/v1/chat/completions", {"Content-Type": ctype}, body)
            for ctype in (
                "text/plain",
                "text/plain;charset=UTF-8",
                "application/x-www-form-urlencoded",
                "multipart/form-data; boundary=x",
            )
        }
        bare = send(port, "POST", "/v1/chat/completions", {}, body)
        assert llm.seen == []
        ok = send(port, "POST", "/v1/chat/completions",
                  {"Content-Type": "application/json; charset=utf-8"}, body)  # fmt: skip
    assert {c: s for c, (s, _) in refused.items()} == dict.fromkeys(refused, 415)
    assert refused["text/plain"][1]["error"]["message"] == (
        "the body must be application/json, not text/plain"
    )
    assert bare[0] == 415 and ok[0] == 200 and len(llm.seen) == 1


# -- Host -----------------------------------------------------------------------------------


@BOTH
def test_a_foreign_host_is_refused_dns_rebinding(kind, open_guard, store):
    with running(kind, open_guard, store) as (port, llm):
        foreign = {
            h: post_chat(port, host=h)[0]
            for h in (
                f"evil.example:{port}",
                "evil.example",
                f"localhost.evil.example:{port}",
                f"127.0.0.1.nip.io:{port}",
                f"evil.example:{port}@127.0.0.1",
                "",
            )
        }
        missing = post_chat(port, host=None)[0]
        assert llm.seen == []
        local = [
            post_chat(port, host=h)[0]
            for h in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST.", f"[::1]:{port}")
        ]
    assert foreign == dict.fromkeys(foreign, 421)
    assert missing == 400  # aiohttp's parser refuses HTTP/1.1 without Host before the guard
    assert local == [200] * 4 and len(llm.seen) == 4
    assert open_guard.rejected == {"misdirected_host": 6}


def test_allowed_hosts_add_names_and_the_bound_address_counts(store):
    guard = configure("127.0.0.1", ["api.internal.example", "GW.example:443"], environ={})
    with running("proxy", guard, store) as (port, _):
        got = [
            post_chat(port, host=h)[0]
            for h in ("api.internal.example", f"gw.example:{port}", "other.internal.example")
        ]
    assert got == [200, 200, 421]


def test_the_ip_a_connection_came_in_on_names_the_server(store):
    """No DNS is involved in an IP literal: a page can only send it from this origin."""
    guard = Guard(hosts=frozenset({"api.example"}))  # not even the loopback names
    with running("proxy", guard, store) as (port, _):
        got = [post_chat(port, host=h)[0] for h in (f"127.0.0.1:{port}", "localhost", "127.0.0.2")]
    assert got == [200, 421, 421]


def test_the_names_a_bound_address_answers_to():
    loopback = {"localhost", "127.0.0.1", "::1"}
    assert bound_names("127.0.0.1") == bound_names("localhost") == bound_names("::1") == loopback
    # Bound to every address: loopback, plus what the operator lists (and, per connection,
    # the IP address it came in on).
    assert bound_names("0.0.0.0", ["slm.example"]) == loopback | {"slm.example"}
    assert bound_names("10.1.2.3") == {"10.1.2.3"}
    assert bound_names("Box.Example") == {"box.example"}
    assert [host_name(h) for h in ("[::1]:8901", "::1", "Example.COM.:80", "a:b:c")] == [
        "::1",
        "::1",
        "example.com",
        "a:b:c",
    ]


# -- the command ----------------------------------------------------------------------------


def test_cli_proxy_takes_a_key_file_and_allowed_hosts(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text(CLIENT_KEY + "\n")
    llm = RecordingLLM()
    with serving(llm.app()) as up:
        cmd = [str(Path(sys.executable).parent / "slmify"), "collect", "proxy"]
        cmd += ["--upstream", f"{up}/v1", "--port", "0", "--json", "-w", str(tmp_path / "ws")]
        cmd += ["--api-key-file", str(keys), "--allowed-host", "agents.example"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "SLMIFY_UPSTREAM_API_KEY": OPERATOR_KEY}
        env.pop("SLMIFY_API_KEY", None)
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        try:
            line, guard_line = proc.stderr.readline(), proc.stderr.readline()
            port = int(line.split()[4].rstrip(",").removesuffix("/v1").rsplit(":", 1)[1])
            auth = {"Authorization": f"Bearer {CLIENT_KEY}"}
            got = [
                post_chat(port)[0],
                post_chat(port, auth)[0],
                post_chat(port, auth, host="agents.example")[0],
                post_chat(port, auth, host="evil.example")[0],
            ]
        finally:
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert got == [401, 200, 200, 421]
    assert [s.headers["Authorization"] for s in llm.seen] == [f"Bearer {OPERATOR_KEY}"] * 2
    summary = json.loads(out)
    assert summary["recorded"] == 2
    assert summary["rejected"] == {"invalid_api_key": 1, "misdirected_host": 1}
    assert guard_line == (
        "clients authenticate with 1 key(s); upstream key: SLMIFY_UPSTREAM_API_KEY; "
        "Host: 127.0.0.1, ::1, agents.example, localhost\n"
    )
    assert all(k not in line + guard_line + err + out for k in (CLIENT_KEY, OPERATOR_KEY))
