"""S2 scrubbing: find PII and secrets in a call and replace them with typed placeholders.

A `Scrubber` holds one consistency scope (a session): the same value always gets the
same placeholder there (`mia.li@example.com` -> `<EMAIL_1>` in every call of the
session), different values get different numbers, and values are compared in a
normalized form (a phone's digits, an email in lower case). It reads a `CallRecord`
and returns a scrubbed copy; it writes nothing.

Detection is regular expressions plus a checksum or parser where the format has one
(Luhn for cards, mod-97 for IBANs, `ipaddress` for IPs), because on real agent logs
a false positive mangles a training example (reservation ids, flight numbers, dates,
prices, last-4 card digits must survive) while a checksum costs nothing.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections import Counter
from collections.abc import Callable
from typing import Any

from slmify.schema import CallRecord

# A placeholder as written into text; JSON-safe (no quote, no backslash) so replacing
# inside a JSON document keeps it valid.
PLACEHOLDER = re.compile(r"<([A-Z]+(?:_[A-Z]+)*)_(\d+)>")

_CARD_ISSUER = re.compile(
    r"4\d{12}(?:\d{3}){0,2}|5[1-5]\d{14}|2[2-7]\d{14}|3[47]\d{13}|3[0689]\d{12}"
    r"|6(?:011|5\d\d|4[4-9]\d|2\d\d)\d{12,15}|35\d{14,17}"
)


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def _card(value: str) -> str | None:
    digits = re.sub(r"[ -]", "", value)
    groups = [len(g) for g in re.split(r"[ -]", value)]
    # Grouped numbers must be grouped like a card (4-4-4-4..., Amex 4-6-5, Diners 4-6-4):
    # a run of unrelated numbers separated by spaces is not a card.
    grouped_ok = len(groups) == 1 or groups[:2] == [4, 6] or all(g == 4 for g in groups[:-1])
    if grouped_ok and _CARD_ISSUER.fullmatch(digits) and _luhn(digits):
        return digits
    return None


def _iban(value: str) -> str | None:
    iban = value.replace(" ", "")
    if not 15 <= len(iban) <= 34:
        return None
    moved = iban[4:] + iban[:4]
    number = "".join(str(int(ch, 36)) for ch in moved)
    return iban if int(number) % 97 == 1 else None


def _ipv6(value: str) -> str | None:
    try:
        addr = ipaddress.IPv6Address(value)
    except ValueError:
        return None
    groups = [g for g in value.split(":") if g]
    # `1::2` or `[::2]` (a slice) parse as IPv6; an address has 3+ groups or a full one.
    if len(groups) >= 3 or (len(groups) == 2 and any(len(g) >= 3 for g in groups)):
        return addr.compressed
    return None


def _phone(value: str) -> str | None:
    digits = re.sub(r"\D", "", value)
    return digits if 8 <= len(digits) <= 15 else None


def _secret(value: str) -> str | None:
    # `password: required`, `api_key: string` are documentation, not secrets.
    return value if any(c.isdigit() for c in value) or len(value) >= 16 else None


_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
# Tool results are often JSON text: a value right after an escaped newline (`\nann@x.com`)
# starts a match, though the `n` before it is a word character.
_ESCAPE = r"(?<=\\[nrt])"
_B = rf"(?:{_ESCAPE}|\b)"


def _after(chars: str) -> str:
    """Match start: not after one of `chars`, or right after an escaped newline/tab."""
    return rf"(?:{_ESCAPE}|(?<![\\{chars}]))"


_H = r"[0-9A-Fa-f]"

# (type, pattern with the replaced part in group `v`, validator returning the
# normalized value or None). Order is priority where two could start at one position.
DETECTORS: list[tuple[str, str, Callable[[str], str | None] | None]] = [
    ("BEARER_TOKEN", r"(?i:\bbearer)\s+(?P<v>[A-Za-z0-9._~+/-]{16,}=*)", None),
    ("API_KEY", _B + r"(?P<v>sk-(?=[A-Za-z0-9_-]*\d)[A-Za-z0-9_-]{20,})", None),
    ("API_KEY", _B + r"(?P<v>(?:AKIA|ASIA)[0-9A-Z]{16})\b", None),
    ("API_KEY", _B + r"(?P<v>gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{22,})", None),
    ("API_KEY", _B + r"(?P<v>xox[abposr]-[A-Za-z0-9-]{10,})", None),
    (
        "SECRET",
        r"(?i:\b(?:api[_-]?key|secret(?:[_-]?key)?|client[_-]?secret|access[_-]?token"
        r"|auth[_-]?token|password|passwd))\\?[\"']?\s*[:=]\s*\\?[\"']?"
        r"(?P<v>[^\s\"'\\&,;<>{}\[\]()]{8,})",
        _secret,
    ),
    (
        "EMAIL",
        _after(r"\w.%+-") + r"(?P<v>[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
        r"\.[A-Za-z]{2,})\b",
        str.lower,
    ),
    ("IBAN", _B + r"(?P<v>[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?)\b", _iban),
    ("CARD", _after(r"\w.-") + r"(?P<v>\d(?:[ -]?\d){12,18})(?![\w-]|\.\d)", _card),
    ("SSN", _after(r"\w-") + r"(?P<v>(?!000|666|9)\d{3}-(?!00)\d{2}-(?!0000)\d{4})(?![\w-])", None),
    ("IP", _after(r"\w.") + rf"(?P<v>(?:{_OCTET}\.){{3}}{_OCTET})(?!\w|\.\d)", None),
    ("IP", _after(r"\w:.") + rf"(?P<v>{_H}{{0,4}}(?::{_H}{{0,4}}){{2,7}})(?![\w:])", _ipv6),
    (
        "PHONE",
        # International (+CC ...) or North American 3-3-4 with separators. A bare run
        # of digits, a date (2024-05-15) or a time (15:00:00) has neither shape.
        _after(r"\w+/.-") + r"(?P<v>\+[1-9]\d{0,2}[ .-]?(?:\(\d{1,4}\)[ .-]?)?"
        r"\d{1,4}(?:[ .-]?\d{1,4}){1,5}"
        r"|(?:1[ .-]?)?(?:\([2-9]\d\d\) ?|[2-9]\d\d[-. ])[2-9]\d\d[-. ]\d{4})(?![\w-]|\.\d)",
        _phone,
    ),
]

_SINGLE = [re.compile(pattern) for _, pattern, _ in DETECTORS]
# One pass over the text finds the leftmost candidate of any type; the single patterns
# then retry a rejected candidate's position with the remaining types.
_COMBINED = re.compile(
    "|".join(
        f"(?P<d{i}>{pattern.replace('(?P<v>', f'(?P<v{i}>')})"
        for i, (_, pattern, _) in enumerate(DETECTORS)
    )
)


def find_pii(text: str) -> list[tuple[str, str, int, int]]:
    """(type, normalized value, start, end) of each PII span in `text`, left to right."""
    found = []
    pos = 0
    while m := _COMBINED.search(text, pos):
        start = m.start()
        hit = None
        for i in range(int(m.lastgroup[1:]), len(DETECTORS)):
            mi = _SINGLE[i].match(text, start)
            kind, _, validate = DETECTORS[i]
            key = mi and (validate(mi.group("v")) if validate else mi.group("v"))
            if key:
                hit = (kind, key, *mi.span("v"))
                break
        if hit is None:
            # A rejected candidate (a Luhn-invalid number...) may hide a real one inside.
            pos = start + 1
            continue
        found.append(hit)
        pos = max(hit[3], start + 1)
    return found


class Scrubber:
    """Replaces PII with placeholders consistent within one scope (a session).

    `start` gives the highest number already used per type in this scope (by an earlier
    run), so new placeholders never reuse one that means another value.
    """

    def __init__(self, start: dict[str, int] | None = None):
        self._numbers: Counter[str] = Counter(start or {})
        self._placeholders: dict[tuple[str, str], str] = {}
        self._seen: dict[str, tuple[str, Counter[str]]] = {}
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

    def _replace(self, text: str) -> tuple[str, Counter[str]]:
        pieces, types, pos = [], Counter(), 0
        for kind, key, start, end in find_pii(text):
            placeholder = self._placeholders.get((kind, key))
            if placeholder is None:
                self._numbers[kind] += 1
                placeholder = f"<{kind}_{self._numbers[kind]}>"
                self._placeholders[kind, key] = placeholder
            pieces += [text[pos:start], placeholder]
            types[kind] += 1
            pos = end
        pieces.append(text[pos:])
        return "".join(pieces), types

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

    def _walk(self, value: Any, field: str) -> Any:
        if isinstance(value, str):
            return self.text(value, field)
        if isinstance(value, list):
            return [self._walk(v, field) for v in value]
        if isinstance(value, dict):
            return {k: self._walk(v, field) for k, v in value.items()}
        return value

    def record(self, rec: CallRecord) -> CallRecord:
        """A scrubbed copy of `rec`: message contents, tool-call arguments, response."""
        # A JSON round trip in pydantic-core is ~10x faster than `model_copy(deep=True)`.
        out = CallRecord.model_validate_json(rec.model_dump_json())
        for msg in out.request.messages:
            self._message(msg, "request.messages")
        if out.response is not None:
            self._message(out.response.message, "response")
        if out.error:
            out.error = self.text(out.error, "error")
        return out

    def _message(self, msg: dict[str, Any], field: str) -> None:
        content = msg.get("content")
        if isinstance(content, str):
            msg["content"] = self.text(content, f"{field}.content")
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    part["text"] = self.text(part["text"], f"{field}.content")
        for call in msg.get("tool_calls") or []:
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                fn["arguments"] = self.json_text(fn["arguments"], f"{field}.tool_calls.arguments")
        fc = msg.get("function_call")
        if isinstance(fc, dict) and isinstance(fc.get("arguments"), str):
            fc["arguments"] = self.json_text(fc["arguments"], f"{field}.function_call.arguments")


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
