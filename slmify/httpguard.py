"""The HTTP checks `slmify collect proxy` and `slmify serve` share, run before any handler.

Reads the keys once, at startup: clients' keys from SLMIFY_API_KEY and `--api-key-file`
(one per line), the operator's upstream key from SLMIFY_UPSTREAM_API_KEY. Writes nothing;
no key is ever logged, stored or echoed in an error.

Every request passes, in this order, or gets an OpenAI-style error body:
1. Host (421): the `Host` header names this server: the loopback names when it is bound
   to a loopback or wildcard address, the bound name, the IP address the connection came
   in on, or an `--allowed-host`. DNS rebinding: a page on evil.example that re-resolves
   its name to 127.0.0.1 reaches the server, but its requests say `Host: evil.example`.
2. Route (404, 405): the raw path is one the app registered, exactly: no `..`, no
   percent-encoding, no `//`, no trailing slash. What goes upstream is that registered
   path (`upstream_path`), never the client's spelling of it.
3. Client key (401): when keys are configured, `Authorization: Bearer KEY` or `api-key:
   KEY` holds one, compared in constant time. `/health` stays open for load balancers.
4. Body (415): a POST, or any request with a body, is `application/json`. A browser sends a
   cross-site `text/plain` POST without asking first; JSON needs a CORS preflight, which
   fails because no CORS header is ever sent.

Upstream credentials (`credentials`): a caller that passed a client key is forwarded with
SLMIFY_UPSTREAM_API_KEY (or with no key when it is unset), never with its slmify key.
Without client keys, the client's own `Authorization` / `api-key` go upstream and the
operator's key is never added: an unauthenticated caller cannot borrow it.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from slmify.errors import SlmifyError

CLIENT_KEY_ENV = "SLMIFY_API_KEY"
UPSTREAM_KEY_ENV = "SLMIFY_UPSTREAM_API_KEY"
# The headers OpenAI's and Azure's SDKs put a key in; never forwarded as the client sent them.
AUTH_HEADERS = frozenset({"authorization", "api-key"})
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
OPEN_PATHS = frozenset({"/health"})
# Forwarded unchanged and unrecorded by both servers, besides chat completions: the other
# JSON calls an OpenAI client pointed at the base URL makes. Nothing else reaches upstream.
PASSTHROUGH_POSTS = ("/v1/completions", "/v1/embeddings")
# Where the middleware leaves its decision for the handler.
_UPSTREAM_AUTH = web.RequestKey("slmify.upstream_auth", dict[str, str])

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class GuardError(SlmifyError):
    """A key file that cannot be used; the message names it."""


@dataclass(frozen=True)
class Guard:
    """The checks of one server: its clients' keys, its upstream key, its host names."""

    # SHA-256 digests: equal lengths for compare_digest, and no key kept in the clear here.
    client_keys: tuple[bytes, ...] = ()
    upstream_key: str | None = field(default=None, repr=False)
    hosts: frozenset[str] = LOOPBACK_NAMES
    rejected: Counter[str] = field(default_factory=Counter, compare=False)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if refusal := self.refusal(request):
            status, code, message = refusal
            self.rejected[code] += 1
            return error_response(status, code, message)
        request[_UPSTREAM_AUTH] = self.upstream_auth(request)
        return await handler(request)

    def refusal(self, request: web.Request) -> tuple[int, str, str] | None:
        """(status, code, message) for a request that must not be served, else None."""
        host = request.headers.get("Host", "")
        if not self.host_allowed(request, host):
            message = f"Host {host!r} does not name this server (see --allowed-host)"
            return 421, "misdirected_host", message
        path = request.raw_path.split("?", 1)[0]
        if path not in {r.canonical for r in request.app.router.resources()}:
            return 404, "not_found", f"no such route: {request.method} {path}"
        if (exc := request.match_info.http_exception) is not None:
            return exc.status, "method_not_allowed", f"{request.method} is not allowed on {path}"
        if self.client_keys and path not in OPEN_PATHS and not self.key_ok(request):
            message = "a valid slmify API key is required: Authorization: Bearer KEY"
            return 401, "invalid_api_key", message
        has_body = request.method == "POST" or request.body_exists
        if has_body and request.content_type != "application/json":
            message = f"the body must be application/json, not {request.content_type}"
            return 415, "unsupported_media_type", message
        return None

    def host_allowed(self, request: web.Request, host: str) -> bool:
        name = host_name(host)
        if name in self.hosts:
            return True
        # An IP literal naming the very address the connection came in on involves no DNS:
        # a page can only send it from that origin, which is this server.
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        if not name or not sockname:
            return False
        ip = ipaddress.ip_address(str(sockname[0]).split("%", 1)[0])
        # Bound to `::`, an IPv4 client comes in on ::ffff:a.b.c.d and says a.b.c.d.
        return name == str(getattr(ip, "ipv4_mapped", None) or ip)

    def key_ok(self, request: web.Request) -> bool:
        presented = [request.headers.get("api-key", "")]
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            presented.append(token.strip())
        ok = False
        for key in filter(None, presented):
            digest = _digest(key)
            for known in self.client_keys:  # every key is compared: no early exit to time
                ok |= hmac.compare_digest(digest, known)
        return ok

    def upstream_auth(self, request: web.Request) -> dict[str, str]:
        if self.client_keys:
            return {"Authorization": f"Bearer {self.upstream_key}"} if self.upstream_key else {}
        return {k: v for k in ("Authorization", "api-key") if (v := request.headers.get(k))}

    def describe(self) -> str:
        """One line for the operator: who may call, with which upstream key, by which names."""
        hosts = ", ".join(sorted(self.hosts))
        if self.client_keys:
            upstream = UPSTREAM_KEY_ENV if self.upstream_key else "none"
            return (
                f"clients authenticate with {len(self.client_keys)} key(s); upstream key: "
                f"{upstream}; Host: {hosts}"
            )
        unused = (
            f" ({UPSTREAM_KEY_ENV} is set and NOT used: set {CLIENT_KEY_ENV} or --api-key-file)"
            if self.upstream_key
            else ""
        )
        return f"no client keys: each client's own key goes upstream{unused}; Host: {hosts}"


def configure(
    host: str = "127.0.0.1",
    allowed_hosts: Iterable[str] = (),
    api_key_file: Path | None = None,
    environ: Mapping[str, str] = os.environ,
) -> Guard:
    """The guard of a server bound to `host`, with the keys of the environment and file."""
    keys = [k] if (k := environ.get(CLIENT_KEY_ENV, "").strip()) else []
    if api_key_file is not None:
        keys += read_key_file(api_key_file)
    return Guard(
        client_keys=tuple(_digest(k) for k in keys),
        upstream_key=environ.get(UPSTREAM_KEY_ENV) or None,
        hosts=bound_names(host, allowed_hosts),
    )


def read_key_file(path: Path) -> list[str]:
    """The keys of a file, one a line; blank lines and `#` comments skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise GuardError(f"cannot read --api-key-file {path}: {e}") from None
    keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise GuardError(f"--api-key-file {path} holds no key (one a line)")
    return keys


def bound_names(host: str, allowed_hosts: Iterable[str] = ()) -> frozenset[str]:
    """The names a Host header may carry for a server bound to `host`."""
    names = {host_name(h) for h in allowed_hosts}
    bound = host_name(host)
    try:
        ip = ipaddress.ip_address(bound)
        local = ip.is_loopback or ip.is_unspecified
    except ValueError:
        local = bound in ("", "localhost")
    # Bound to every address, the server is reached locally as localhost too; other names
    # it may have on the network are the operator's to list with --allowed-host.
    return frozenset(names | (LOOPBACK_NAMES if local else {bound}))


def host_name(host: str) -> str:
    """The name in a Host header: lowercased, without its port, brackets or final dot."""
    if host.startswith("["):
        name = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        name = host.split(":", 1)[0]
    else:
        name = host  # a bare name, or an IPv6 address without brackets
    return name.rstrip(".").lower()


def credentials(request: web.Request) -> dict[str, str]:
    """The key headers to send upstream for `request`, as the guard decided; none when no
    guard looked at it."""
    return dict(request.get(_UPSTREAM_AUTH, {}))


def upstream_path(request: web.Request) -> str:
    """The path to append to the upstream's base URL: the registered route's own path less
    `/v1`, with the query string."""
    resource = request.match_info.route.resource
    if resource is None or not resource.canonical.startswith("/v1/"):
        raise ValueError(f"{request.raw_path!r} is not a forwarded route")
    query = request.rel_url.raw_query_string
    return resource.canonical.removeprefix("/v1") + (f"?{query}" if query else "")


def error_response(status: int, code: str, message: str) -> web.Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None,
                      "code": code}}  # fmt: skip
    return web.Response(status=status, text=json.dumps(body), content_type="application/json")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()
