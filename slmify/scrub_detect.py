"""PII and secret detection: where a text holds an email, a phone number, a card, a key...

`find_pii(text)` returns each span's type, normalized value and position; `SpanCache`
keeps what it found for texts a curation run sees again. Detection is regular
expressions plus a checksum or parser where the format has one (Luhn for cards, mod-97
for IBANs, `ipaddress` for IPs), because on real agent logs a false positive mangles a
training example (reservation ids, flight numbers, dates, prices, last-4 card digits must
survive) while a checksum costs nothing. Reads and writes nothing; slmify.scrub replaces
what it finds with placeholders.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable

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
    iban = value.replace(" ", "").upper()
    if not 15 <= len(iban) <= 34:
        return None
    moved = iban[4:] + iban[:4]
    if not moved.isalnum() or not moved.isascii():
        return None
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
def _national_phone(value: str) -> str | None:
    """A national number written the way its country groups it (leading trunk 0, or an
    Indian mobile's 5+5): 9 to 12 digits."""
    digits = re.sub(r"\D", "", value)
    return digits if 9 <= len(digits) <= 12 else None


def _ssn(value: str) -> str | None:
    digits = re.sub(r"\D", "", value)
    area, group, serial = digits[:3], digits[3:5], digits[5:]
    if area in ("000", "666") or area[0] == "9" or group == "00" or serial == "0000":
        return None
    return digits


def _aws_secret(value: str) -> str | None:
    # 40 characters of base64 with both cases and a digit: a lower-case hex digest (a git
    # sha, a content hash) has no upper case and is left alone.
    has = (any(c.isupper() for c in value), any(c.islower() for c in value))
    return value if all(has) and any(c.isdigit() for c in value) else None


_AFTER_DIGIT = r"(?![\w-]|\.\d)"

# (type, pattern with the replaced part in group `v`, validator returning the
# normalized value or None). Order is priority where two could start at one position.
# A JSON key (quoted, possibly escaped inside JSON text) whose string value is PII by its
# name: tool results carry names, street addresses and birth dates this way (tau-airline's
# get_user_details). Free-text names and addresses are not detected (see the README).
KEYED = {
    "NAME": r"(?:first|last|middle|full|given|family|passenger|customer|holder)_?name",
    "ADDRESS": r"address_?(?:line_?)?[12]?|street(?:_?address)?",
    "DOB": r"dob|date_?of_?birth|birth_?date|birthday",
}


def _keyed(kind: str) -> str:
    return (
        rf"(?i:\\?\"(?:{KEYED[kind]})\\?\"\s*:\s*\\?\")"
        r"(?P<v>[^\"\\<>]{1,120}?)(?=\\?\")"
    )


_MONTH = r"(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)[a-z]*\.?"

DETECTORS: list[tuple[str, str, Callable[[str], str | None] | None]] = [
    ("NAME", _keyed("NAME"), str.lower),
    ("ADDRESS", _keyed("ADDRESS"), str.lower),
    ("DOB", _keyed("DOB"), None),
    (
        "DOB",
        r"(?i:\b(?:dob|date of birth|birth ?date|birthday|born on|born)\b)\s*(?:is\s+|:\s*)?"
        rf"(?P<v>\d{{4}}-\d\d-\d\d|\d{{1,2}}[/.]\d{{1,2}}[/.]\d{{2,4}}|{_MONTH} \d{{1,2}},? \d{{4}}"
        rf"|\d{{1,2}} {_MONTH},? \d{{4}})",
        None,
    ),
    ("BEARER_TOKEN", r"(?i:\bbearer)\s+(?P<v>[A-Za-z0-9._~+/-]{16,}=*)", None),
    # A password in a URL's user-info (`postgres://app:pw@10.0.0.5/db`): only the password.
    ("PASSWORD", r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@\"'<>]+:(?P<v>[^\s@/\"'<>]+)@", None),
    ("JWT", _B + r"(?P<v>eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{16,})", None),
    ("API_KEY", _B + r"(?P<v>sk-(?=[A-Za-z0-9_-]*\d)[A-Za-z0-9_-]{20,})", None),
    ("API_KEY", _B + r"(?P<v>(?:AKIA|ASIA)[0-9A-Z]{16})\b", None),
    ("API_KEY", _B + r"(?P<v>gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{22,})", None),
    ("API_KEY", _B + r"(?P<v>xox[abposr]-[A-Za-z0-9-]{10,})", None),
    ("API_KEY", _B + r"(?P<v>[sr]k_(?:live|test)_[0-9A-Za-z]{16,})", None),  # Stripe
    ("API_KEY", _B + r"(?P<v>AIza[0-9A-Za-z_-]{35})(?![\w-])", None),  # Google
    (
        "SECRET",
        r"(?i:\b(?:api[_-]?key|(?:aws[_-]?)?secret(?:[_-]?access)?(?:[_-]?key)?|client[_-]?secret"
        r"|access[_-]?token|auth[_-]?token|password|passwd|pwd))\\?[\"']?\s*[:=]\s*\\?[\"']?"
        r"(?P<v>[^\s\"'\\&,;<>{}\[\]()]{8,})",
        _secret,
    ),
    ("SECRET", r"(?<![A-Za-z0-9/+=])(?P<v>[A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=])", _aws_secret),
    (
        "EMAIL",
        # \w is Unicode: `jörg.müller@beispiel.de`, `josé@exämple.com`.
        _after(r"\w.%+-") + r"(?P<v>\w[\w.%+-]*@\w[\w-]*(?:\.[\w-]+)*\.(?:[^\W\d_]{2,}))\b",
        str.lower,
    ),
    (
        "IBAN",
        _B + r"(?P<v>[A-Za-z]{2}\d{2}(?: ?[A-Za-z0-9]{4}){2,7}(?: ?[A-Za-z0-9]{1,3})?)\b",
        _iban,
    ),
    ("CARD", _after(r"\w.-") + r"(?P<v>\d(?:[ -]?\d){12,18})" + _AFTER_DIGIT, _card),
    ("SSN", _after(r"\w-") + r"(?P<v>\d{3}(?P<ssep>[- ])\d{2}(?P=ssep)\d{4})(?![\w-])", _ssn),
    # Nine bare digits are an SSN only where the text says so: elsewhere they are order
    # numbers and ids.
    (
        "SSN",
        r"(?i:\b(?:ssn|social[ -]security(?:[ -]n(?:o|umber))?)\b)[\s:#.=\"'\\]{0,6}"
        r"(?:is\s+|n(?:o|umber)\.?\s*)?(?P<v>\d{9})(?!\d)",
        _ssn,
    ),
    ("IP", _after(r"\w.") + rf"(?P<v>(?:{_OCTET}\.){{3}}{_OCTET})(?!\w|\.\d)", None),
    ("IP", _after(r"\w:.") + rf"(?P<v>{_H}{{0,4}}(?::{_H}{{0,4}}){{2,7}})(?![\w:])", _ipv6),
    (
        "PHONE",
        # International (+CC ...) or North American 3-3-4 with separators. A bare run
        # of digits, a date (2024-05-15) or a time (15:00:00) has neither shape.
        _after(r"\w+/.-") + r"(?P<v>\+[1-9]\d{0,2}[ .-]?(?:\(\d{1,4}\)[ .-]?)?"
        r"\d{1,4}(?:[ .-]?\d{1,4}){1,5}"
        r"|(?:1[ .-]?)?(?:\([2-9]\d\d\) ?|[2-9]\d\d[-. ])[2-9]\d\d[-. ]\d{4})" + _AFTER_DIGIT,
        _phone,
    ),
    (
        "PHONE",
        # National formats, separators required: FR 01 23 45 67 89 (pairs, one separator),
        # UK 020 7946 0958 / 07700 900123, DE 030 12345678 / 0171-1234567 / 089/1234567,
        # IN 98765 43210 (optionally 0 or 91 first).
        _after(r"\w+/.-") + r"(?P<v>0[1-9](?P<psep>[ .])\d\d(?:(?P=psep)\d\d){3}"
        r"|0\d{2,4} \d{3,4}(?: \d{3,4})?"
        r"|0\d{2,4}[/-]\d{5,8}|0\d{2,4} \d{5,8}"
        r"|(?:(?:0|91)[ -]?)?[6-9]\d{4}[ -]\d{5})" + _AFTER_DIGIT,
        _national_phone,
    ),
]

_SINGLE = [re.compile(pattern) for _, pattern, _ in DETECTORS]


def find_pii(text: str) -> list[tuple[str, str, int, int]]:
    """(type, normalized value, start, end) of each PII span in `text`, left to right.

    The leftmost position where any detector matches is a candidate; its detectors are
    tried there in order (a validator can reject one), and a rejected candidate is
    retried one character on, since it may hide a real one. Each detector keeps the
    start of its next match and searches again only once the scan has passed it: one
    alternation of all the patterns, searched at every step, was a third slower, as the
    single patterns keep `re`'s literal-prefix skipping. Whether a pattern matches at a
    position never depends on where the search began (lookbehinds and `\\b` see the text
    before it), so the scan finds what the alternation found.
    """
    found = []
    pos = 0
    upcoming: list[int | None] = [-1] * len(_SINGLE)  # next match start, None: no more
    while True:
        start, first = None, 0
        for i, at in enumerate(upcoming):
            if at is not None and at < pos:
                m = _SINGLE[i].search(text, pos)
                at = upcoming[i] = m.start() if m else None
            if at is not None and (start is None or at < start):
                start, first = at, i
        if start is None:
            return found
        hit = None
        for i in range(first, len(DETECTORS)):
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


class SpanCache:
    """`find_pii` of texts seen lately, shared by the scrubbers of one curation run: a
    session repeats the system prompt and tool descriptions of every other session, and
    finding spans is a pure function of the text (only the placeholders they get belong to
    a scope). Holds at most `budget` characters of texts; full, it starts over. Also
    the JSON of values found to hold nothing to replace (tool schemas), which then need
    no walk in any scope."""

    def __init__(self, budget: int = 8_000_000):
        self.budget = budget
        self.size = 0
        self.spans: dict[str, list[tuple[str, str, int, int]]] = {}
        self.nothing_to_replace: set[bytes] = set()

    def find(self, text: str) -> list[tuple[str, str, int, int]]:
        spans = self.spans.get(text)
        if spans is None:
            spans = find_pii(text)
            if self._room(len(text)):
                self.spans[text] = spans
        return spans

    def nothing_in(self, value_json: bytes) -> None:
        if self._room(len(value_json)):
            self.nothing_to_replace.add(value_json)

    def _room(self, size: int) -> bool:
        """Whether `size` more characters may be kept (after starting over if full)."""
        if self.size + size > self.budget:
            self.spans.clear()
            self.nothing_to_replace.clear()
            self.size = 0
        if size > self.budget:
            return False
        self.size += size
        return True
