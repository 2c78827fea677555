"""S2 scrubbing: find PII and secrets in a call and replace them with typed placeholders.

A `Scrubber` holds one consistency scope (a session): the same value always gets the
same placeholder there (`mia.li@example.com` -> `<EMAIL_1>` in every call of the
session), different values get different numbers, and values are compared in a
normalized form (a phone's digits, an email in lower case). It reads a `CallRecord`
and returns a scrubbed copy; it writes nothing.

What to replace is found by slmify.scrub_detect (`find_pii`, regular expressions checked
by checksums and parsers); this module decides the placeholders.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import re
from collections import Counter
from typing import Any

from slmify.schema import CallRecord
from slmify.scrub_detect import KEYED, SpanCache

# A placeholder as written into text; JSON-safe (no quote, no backslash) so replacing
# inside a JSON document keeps it valid.
PLACEHOLDER = re.compile(r"<([A-Z]+(?:_[A-Z]+)*)_(\d+)>")


class Scrubber:
    """Replaces PII with placeholders consistent within one scope (a session).

    `start` gives the highest number already used per type in this scope (by an earlier
    run), so new placeholders never reuse one that means another value; `known` maps the
    keyed hashes (`value_hash`) of values an earlier run replaced to their placeholders, so
    an incremental or interrupted run gives a value the placeholder it already has.
    `spans` is a cache of found spans to share with the other scopes of a run.
    """

    def __init__(
        self,
        start: dict[str, int] | None = None,
        key: bytes = b"",
        known: dict[str, str] | None = None,
        spans: SpanCache | None = None,
    ):
        self._numbers: Counter[str] = Counter(start or {})
        self._key = key
        self._known = known or {}  # value hash -> placeholder, from earlier runs
        self.assigned: dict[str, str] = {}  # value hash -> placeholder, new in this run
        self._placeholders: dict[tuple[str, str], str] = {}
        self._seen: dict[str, tuple[str, dict[str, int]]] = {}
        self._spans = spans or SpanCache()
        # (field, JSON of a value) -> (its scrubbed JSON or None if unchanged, the counts)
        self._walked: dict[tuple[str, bytes], tuple[bytes | None, Counter[tuple[str, str]]]] = {}
        self.counts: Counter[tuple[str, str]] = Counter()  # (field, type) -> replaced

    def text(self, text: str, field: str) -> str:
        """`text` with its PII replaced; counts each replacement under `field`."""
        if text in self._seen:
            # A session repeats its history in every call: the result is the same.
            out, types = self._seen[text]
        else:
            out, types = self._replace(text)
            self._seen[text] = (out, types)
        for kind, n in types.items():
            self.counts[field, kind] += n
        return out

    def _replace(self, text: str) -> tuple[str, dict[str, int]]:
        pieces: list[str] = []
        types: dict[str, int] = {}
        pos = 0
        for kind, key, start, end in self._spans.find(text):
            pieces += [text[pos:start], self._placeholder(kind, key)]
            types[kind] = types.get(kind, 0) + 1
            pos = end
        pieces.append(text[pos:])
        return "".join(pieces), types

    def _placeholder(self, kind: str, key: str) -> str:
        """The placeholder of a value: the scope's own, one an earlier run gave it (found by
        its keyed hash), else the next number of its type."""
        placeholder = self._placeholders.get((kind, key))
        if placeholder is None:
            digest = self.value_hash(kind, key) if self._key else None
            placeholder = self._known.get(digest) if digest else None
            if placeholder is None:
                self._numbers[kind] += 1
                placeholder = f"<{kind}_{self._numbers[kind]}>"
                if digest:
                    self.assigned[digest] = placeholder
            self._placeholders[kind, key] = placeholder
        return placeholder

    def value_hash(self, kind: str, key: str) -> str:
        """HMAC-SHA256 of a normalized value under the workspace key: what is stored to
        find a value's placeholder again, the value itself never is."""
        return hmac.new(self._key, f"{kind}\0{key}".encode(), hashlib.sha256).hexdigest()[:32]

    def json_text(self, text: str, field: str) -> str:
        """Scrub a JSON document's string values, keeping it valid JSON."""
        try:
            doc = json.loads(text)
        except (json.JSONDecodeError, TypeError):
            return self.text(text, field)
        clean = self._walk(doc, field)
        if clean == doc:
            return text
        compact = ", " not in text and ": " not in text
        return json.dumps(clean, ensure_ascii=False, separators=(",", ":") if compact else None)

    def _walk(self, value: Any, field: str, key: str | None = None) -> Any:
        if isinstance(value, str):
            kind = _keyed_kind(key) if key else None
            if kind and value.strip():
                self.counts[field, kind] += 1
                return self._placeholder(kind, value.strip().lower())
            return self.text(value, field)
        if isinstance(value, list):
            return [self._walk(v, field, key) for v in value]
        if isinstance(value, dict):
            return {k: self._walk(v, field, k) for k, v in value.items()}
        return value

    def _walk_field(self, value: Any, field: str) -> Any:
        """`_walk(value, field)`, replayed from this scope's memo for a value walked before:
        every call of a session sends the same tool schemas, and walking them was a third of
        curation's time. The same value gets the same placeholders in a scope, and the memo
        replays the counts too. Records share no objects: a value scrubbing changed is
        rebuilt from its JSON each time, an unchanged one is the record's own."""
        import orjson

        try:
            memo_key = (field, orjson.dumps(value))
        except TypeError:  # orjson refuses it (an integer over 64 bits): no memo
            return self._walk(value, field)
        if b"null" in memo_key[1] and orjson.loads(memo_key[1]) != value:
            return self._walk(value, field)  # NaN or infinity, which orjson writes as null
        if memo_key[1] in self._spans.nothing_to_replace:
            return value
        hit = self._walked.get(memo_key)
        if hit is None:
            before = self.counts.copy()
            clean = self._walk(value, field)
            changed = orjson.dumps(clean) if clean != value else None
            counted = self.counts - before
            self._walked[memo_key] = (changed, counted)
            if changed is None and not counted:
                self._spans.nothing_in(memo_key[1])
            return clean
        self.counts.update(hit[1])
        # Unchanged (tool schemas nearly always are): the record keeps its own value.
        return value if hit[0] is None else orjson.loads(hit[0])

    def record(self, rec: CallRecord) -> CallRecord:
        """A scrubbed copy of `rec`: every free-text field an agent or a user can fill."""
        # A JSON round trip in pydantic-core is ~10x faster than `model_copy(deep=True)`.
        return self.scrub(CallRecord.model_validate_json(rec.model_dump_json()))

    def scrub(self, out: CallRecord) -> CallRecord:
        """`out` scrubbed in place (a record no one else holds), and returned."""
        if out.session_id is not None:
            out.session_id = self.text(out.session_id, "session_id")
        for msg in out.request.messages:
            self._message(msg, "request.messages")
        if out.response is not None:
            self._message(out.response.message, "response")
        if out.error:
            out.error = self.text(out.error, "error")
        # `user`, `metadata` and the rest of the parameters; tool descriptions and examples.
        out.request.params = self._walk_field(out.request.params, "request.params")
        if out.request.tools:
            out.request.tools = self._walk_field(out.request.tools, "request.tools")
        if out.request.functions:
            out.request.functions = self._walk_field(out.request.functions, "request.functions")
        out.metadata = self._walk_field(out.metadata, "metadata")
        return out

    def _message(self, msg: dict[str, Any], field: str) -> None:
        content = msg.get("content")
        if isinstance(content, str):
            msg["content"] = self.text(content, f"{field}.content")
        elif isinstance(content, list):
            for part in content:
                if not isinstance(part, dict):
                    continue
                if isinstance(part.get("text"), str):
                    part["text"] = self.text(part["text"], f"{field}.content")
                image = part.get("image_url")
                url = image.get("url") if isinstance(image, dict) else image
                # A data: URL is the image itself (base64), not text that names anyone.
                if isinstance(url, str) and not url.startswith("data:"):
                    clean = self.text(url, f"{field}.image_url")
                    if isinstance(image, dict):
                        image["url"] = clean
                    else:
                        part["image_url"] = clean
        if isinstance(msg.get("refusal"), str):
            msg["refusal"] = self.text(msg["refusal"], f"{field}.refusal")
        for call in msg.get("tool_calls") or []:
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                fn["arguments"] = self.json_text(fn["arguments"], f"{field}.tool_calls.arguments")
        fc = msg.get("function_call")
        if isinstance(fc, dict) and isinstance(fc.get("arguments"), str):
            fc["arguments"] = self.json_text(fc["arguments"], f"{field}.function_call.arguments")


_KEYED_FULL = [(kind, re.compile(pattern, re.IGNORECASE)) for kind, pattern in KEYED.items()]


@functools.lru_cache(maxsize=4096)
def _keyed_kind(key: str) -> str | None:
    # Cached: a call's tool schemas repeat the same few keys thousands of times, and this
    # was a third of curation's time while it went through `re`'s pattern cache each time.
    for kind, pattern in _KEYED_FULL:
        if pattern.fullmatch(key):
            return kind
    return None


def highest_placeholders(texts: list[str]) -> dict[str, int]:
    """The highest placeholder number per type found in already-scrubbed texts."""
    top: dict[str, int] = {}
    for text in texts:
        for kind, n in PLACEHOLDER.findall(text):
            top[kind] = max(top.get(kind, 0), int(n))
    return top


def masked(text: str) -> str:
    """`text` with placeholder numbers dropped: the same call scrubbed in any session."""
    return PLACEHOLDER.sub(r"<\1>", text)
