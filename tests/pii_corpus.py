"""A labelled PII corpus, generated (seeded) for tests/test_curate.py and bench/bench_pii.py.

Each sample is a sentence as an agent log would hold it with one value in it: either PII
of a claimed type (the format named too, e.g. PHONE/uk) that must be replaced, or a value
that must survive untouched (order ids, flight numbers, dates, prices, UUIDs, versions...).
Values are random but valid where the format has a check (Luhn, IBAN mod-97, SSN areas).
"""

from __future__ import annotations

import base64
import random
import string
import uuid
from dataclasses import dataclass

PER_FORMAT = 25


@dataclass(frozen=True)
class Sample:
    kind: str  # the PII type, or "KEEP" for a value that must survive
    fmt: str
    text: str
    value: str


def _digits(rng: random.Random, n: int, first: str = "0123456789") -> str:
    return rng.choice(first) + "".join(rng.choice(string.digits) for _ in range(n - 1))


def _luhn_complete(prefix: str) -> str:
    for d in string.digits:
        n = prefix + d
        total = sum(
            (int(c) * 2 - 9 if int(c) * 2 > 9 else int(c) * 2) if i % 2 else int(c)
            for i, c in enumerate(reversed(n))
        )
        if total % 10 == 0:
            return n
    raise AssertionError


def _iban(rng: random.Random, country: str, bban_len: int) -> str:
    bban = _digits(rng, bban_len)
    moved = bban + country + "00"
    check = 98 - int("".join(str(int(c, 36)) for c in moved)) % 97
    return f"{country}{check:02d}{bban}"


def _b64url(rng: random.Random, n: int) -> str:
    raw = bytes(rng.getrandbits(8) for _ in range(n))
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _mixed(rng: random.Random, n: int, alphabet: str) -> str:
    while True:
        v = "".join(rng.choice(alphabet) for _ in range(n))
        if (
            any(c.isupper() for c in v)
            and any(c.islower() for c in v)
            and any(c.isdigit() for c in v)
        ):
            return v


NAMES = ["mia.li", "j.smith", "ana_maria", "kofi99", "lee+tag", "o.brien", "x.y.z"]
DOMAINS = ["example.com", "mail.co.uk", "corp.example.org", "uni.edu"]
UNICODE_EMAILS = ["jörg.müller", "josé", "zoë.ñúñez", "françois", "łukasz"]
UNICODE_DOMAINS = ["beispiel.de", "exämple.com", "correo.es", "société.fr"]


def _pii(rng: random.Random) -> list[tuple[str, str, str, str]]:
    """(type, format, template with {v}, value) for every claimed format."""
    out: list[tuple[str, str, str, str]] = []

    def add(kind: str, fmt: str, template: str, make) -> None:  # noqa: ANN001
        for _ in range(PER_FORMAT):
            out.append((kind, fmt, template, make()))

    add(
        "EMAIL",
        "ascii",
        "Contact me at {v} please.",
        lambda: f"{rng.choice(NAMES)}{rng.randint(1, 99)}@{rng.choice(DOMAINS)}",
    )
    add(
        "EMAIL",
        "unicode",
        "Her address is {v}.",
        lambda: f"{rng.choice(UNICODE_EMAILS)}@{rng.choice(UNICODE_DOMAINS)}",
    )
    add(
        "PHONE", "intl", "Call +{v} tomorrow.", lambda: f"44 20 {_digits(rng, 4)} {_digits(rng, 4)}"
    )
    add(
        "PHONE",
        "us",
        "Phone: {v}",
        lambda: f"({_digits(rng, 3, '2345678')}) {_digits(rng, 3, '2345678')}-{_digits(rng, 4)}",
    )
    add(
        "PHONE",
        "uk",
        "ring me on {v} after 5",
        lambda: rng.choice(
            [
                f"020 {_digits(rng, 4)} {_digits(rng, 4)}",
                f"07{_digits(rng, 3)} {_digits(rng, 6)}",
                f"0161 {_digits(rng, 3)} {_digits(rng, 4)}",
            ]
        ),
    )
    add(
        "PHONE",
        "de",
        "Telefon: {v}",
        lambda: rng.choice(
            [
                f"030 {_digits(rng, 8)}",
                f"0171-{_digits(rng, 7)}",
                f"089/{_digits(rng, 7)}",
                f"0151 {_digits(rng, 8)}",
            ]
        ),
    )
    add(
        "PHONE",
        "fr",
        "Appelez le {v} svp",
        lambda: (
            "0"
            + rng.choice("1234567")
            + rng.choice(" .").join([""] + [_digits(rng, 2) for _ in range(4)])
        ),
    )
    add(
        "PHONE",
        "in",
        "mobile {v}",
        lambda: rng.choice(["", "0", "91 "]) + f"{_digits(rng, 5, '6789')} {_digits(rng, 5)}",
    )
    add(
        "SSN",
        "dashes",
        "SSN on file: {v}",
        lambda: f"{rng.randint(1, 665):03d}-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}",
    )
    add(
        "SSN",
        "spaces",
        "my social is {v}",
        lambda: f"{rng.randint(1, 665):03d} {rng.randint(1, 99):02d} {rng.randint(1, 9999):04d}",
    )
    add(
        "SSN",
        "bare",
        "SSN: {v}",
        lambda: f"{rng.randint(1, 665):03d}{rng.randint(1, 99):02d}{rng.randint(1, 9999):04d}",
    )
    add(
        "JWT",
        "standalone",
        "token={v}",
        lambda: "eyJ" + _b64url(rng, 24) + ".eyJ" + _b64url(rng, 48) + "." + _b64url(rng, 32),
    )
    add(
        "API_KEY",
        "aws-access",
        "key id {v}",
        lambda: (
            "AKIA" + "".join(rng.choice(string.ascii_uppercase + string.digits) for _ in range(16))
        ),
    )
    add(
        "API_KEY",
        "stripe",
        "stripe {v}",
        lambda: "sk_live_" + _mixed(rng, 24, string.ascii_letters + string.digits),
    )
    add(
        "API_KEY",
        "google",
        "maps key {v}",
        lambda: "AIza" + _mixed(rng, 35, string.ascii_letters + string.digits + "_-"),
    )
    add(
        "API_KEY",
        "openai",
        "OPENAI {v}",
        lambda: "sk-proj-" + _mixed(rng, 32, string.ascii_letters + string.digits),
    )
    add(
        "SECRET",
        "aws-secret",
        "aws secret {v} rotated",
        lambda: _mixed(rng, 40, string.ascii_letters + string.digits + "/+"),
    )
    add(
        "PASSWORD",
        "db-url",
        "DATABASE_URL=postgres://app:{v}@10.0.{n}.5:5432/prod".replace(
            "{n}", str(rng.randint(0, 255))
        ),
        lambda: _mixed(rng, 14, string.ascii_letters + string.digits),
    )
    add("IBAN", "upper", "IBAN {v}", lambda: _iban(rng, rng.choice(["DE", "FR", "GB", "NL"]), 18))
    add(
        "IBAN",
        "lower",
        "pay to {v} today",
        lambda: _iban(rng, rng.choice(["DE", "FR", "NL"]), 18).lower(),
    )
    add("CARD", "visa", "card {v} exp 12/27", lambda: _luhn_complete("4" + _digits(rng, 14)))
    add(
        "IP",
        "v4",
        "from {v}:8080",
        lambda: ".".join(
            str(rng.randint(lo, hi)) for lo, hi in [(11, 223), (0, 255), (0, 255), (1, 254)]
        ),
    )
    return out


def _keep(rng: random.Random) -> list[tuple[str, str, str]]:
    """(format, template, value) of values that must survive."""
    out: list[tuple[str, str, str]] = []

    def add(fmt: str, template: str, make) -> None:  # noqa: ANN001
        for _ in range(PER_FORMAT):
            out.append((fmt, template, make()))

    up = string.ascii_uppercase
    add("order-id", "order {v} shipped", lambda: rng.choice(["#W", "ORD-", ""]) + _digits(rng, 7))
    add(
        "reservation",
        "reservation {v} confirmed",
        lambda: "".join(rng.choice(up + string.digits) for _ in range(6)),
    )
    add(
        "flight",
        "flight {v} departs",
        lambda: rng.choice(["HAT", "UA ", "LH", "BA"]) + str(rng.randint(1, 9999)),
    )
    add(
        "date",
        "on {v} at noon",
        lambda: rng.choice(
            [
                f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
                f"{rng.randint(1, 28):02d}.{rng.randint(1, 12):02d}.2024",
                f"{rng.randint(1, 12):02d}/{rng.randint(1, 28):02d}/2025",
                f"2024-05-{rng.randint(10, 28)} 15:{rng.randint(10, 59)}:00",
            ]
        ),
    )
    add(
        "price",
        "total {v} incl. tax",
        lambda: rng.choice(
            [
                f"${rng.randint(1, 9)},{rng.randint(100, 999)}.{rng.randint(10, 99)}",
                f"€{rng.randint(1, 999)}.{rng.randint(10, 99)}",
                f"{rng.randint(1, 99)} {rng.randint(100, 999)},{rng.randint(10, 99)} €",
            ]
        ),
    )
    add("uuid", "request id {v}", lambda: str(uuid.UUID(int=rng.getrandbits(128))))
    add(
        "version",
        "upgraded to {v}",
        lambda: rng.choice(
            [
                f"v{rng.randint(0, 9)}.{rng.randint(0, 20)}.{rng.randint(0, 99)}",
                f"10.0.{rng.randint(10000, 22999)}.{rng.randint(100, 9999)}",
                f"{rng.randint(1, 3)}.{rng.randint(0, 14)}.{rng.randint(0, 9)}",
            ]
        ),
    )
    add("git-sha", "commit {v}", lambda: "".join(rng.choice("0123456789abcdef") for _ in range(40)))
    add("count", "{v} passengers in 3 bags", lambda: str(rng.randint(1, 99999)))
    add(
        "tracking",
        "tracking {v}",
        lambda: "1Z" + "".join(rng.choice(up + string.digits) for _ in range(16)),
    )
    add("zip", "ZIP {v}", lambda: _digits(rng, 5))
    return out


def build(seed: int = 7) -> list[Sample]:
    rng = random.Random(seed)
    samples = [Sample(k, f, t.replace("{v}", v), v) for k, f, t, v in _pii(rng)]
    samples += [Sample("KEEP", f, t.replace("{v}", v), v) for f, t, v in _keep(rng)]
    return samples
