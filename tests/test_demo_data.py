"""The bundled demo data: reproducible, shaped as designed, answers true to the inputs.

`data/demo/calls.jsonl.gz` is written by `scripts/make_demo_data.py`; `make demo` runs
the whole pipeline on it, so its counts and warts are asserted here as a spec.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from slmify.collect import import_files
from slmify.store import open_store

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "make_demo_data.py"
DEMO = ROOT / "data" / "demo" / "calls.jsonl.gz"

_spec = importlib.util.spec_from_file_location("make_demo_data", SCRIPT)
gen = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = gen  # dataclasses look their module up there
_spec.loader.exec_module(gen)

TASK_OF_SYSTEM = {prompt: task for task, prompt in gen.SYSTEM.items()}
EMAIL = re.compile(r"[\w.+-]+@[\w-]+\.[\w.]+")
PHONE = re.compile(r"\(\d{3}\) \d{3}-\d{4}|\b\d{3}-\d{3}-\d{4}\b")
ORDER_ID = re.compile(r"\bAC-\d{6}\b")
QUANTITY = re.compile(r"\b(\d+) x |\b(\d+) units of |\(x(\d+)\)|\bone ")


@pytest.fixture(scope="module")
def records() -> list[dict]:
    with gzip.open(DEMO, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def task(r: dict) -> str:
    return TASK_OF_SYSTEM[r["request"]["messages"][0]["content"]]


def user(r: dict) -> str:
    return r["request"]["messages"][1]["content"]


def good(records: list[dict]) -> list[dict]:
    """Answered calls that ran to the end, each once (double-logged copies dropped)."""
    seen, out = set(), []
    for r in records:
        key = json.dumps([r["request"], r["response"]], sort_keys=True)
        choices = r["response"].get("choices")
        if choices and choices[0]["finish_reason"] != "length" and key not in seen:
            seen.add(key)
            out.append(r)
    return out


def test_script_is_deterministic_and_matches_committed_file(tmp_path: Path) -> None:
    outs = [tmp_path / "a.jsonl.gz", tmp_path / "b.jsonl.gz"]
    for out in outs:
        subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], check=True)
    assert outs[0].read_bytes() == outs[1].read_bytes()
    # The records, not the gzip bytes: another zlib build (zlib-ng) deflates differently.
    assert gzip.decompress(outs[0].read_bytes()) == gzip.decompress(DEMO.read_bytes())
    assert DEMO.stat().st_size < 200_000


def test_counts_per_task_and_session_as_designed(records: list[dict]) -> None:
    assert len(records) == 1208
    assert len({r["id"] for r in records}) == 1208
    # 300 good calls per task, plus one double-logged copy and one failed attempt each.
    assert Counter(task(r) for r in records) == dict.fromkeys(gen.TASKS, 302)
    assert Counter(task(r) for r in good(records)) == dict.fromkeys(gen.TASKS, 300)
    per_session = Counter(r["metadata"]["session_id"] for r in good(records))
    assert set(per_session.values()) == {1, 2, 3, 4}
    assert {r["metadata"]["agent"] for r in records} == {"acme-support"}


def test_exact_duplicates_and_failed_calls(records: list[dict]) -> None:
    groups = defaultdict(list)
    for r in records:
        groups[json.dumps([r["request"], r["response"]], sort_keys=True)].append(r["id"])
    assert sorted(len(ids) for ids in groups.values() if len(ids) > 1) == [2, 2, 2, 2]

    errors = [r for r in records if "choices" not in r["response"]]
    assert sorted(r["response"]["error"]["code"] or "none" for r in errors) == [
        "none",
        "rate_limit_exceeded",
    ]
    assert all(r["response"]["error"]["message"] for r in errors)
    cut = [
        r for r in records if r["response"].get("choices", [{}])[0].get("finish_reason") == "length"
    ]
    assert sorted(task(r) for r in cut) == ["extract", "reply"]
    for r in cut + errors:
        # The agent retried: the same step's good call follows in the same session.
        retry = next(
            g
            for g in good(records)
            if g["metadata"] == r["metadata"]
            and task(g) == task(r)
            and g["timestamp"] > r["timestamp"]
        )
        if r in cut:
            full = retry["response"]["choices"][0]["message"]["content"]
            partial = r["response"]["choices"][0]["message"]["content"]
            assert full.startswith(partial) and len(partial) < len(full)
            assert r["response"]["usage"]["completion_tokens"] == r["request"]["max_tokens"]


def rederive(text: str) -> dict:
    """The order fields of a customer email, read back without the generator's state."""
    (order_id,) = set(ORDER_ID.findall(text))
    (product,) = [p for p in gen.PRODUCTS if p in text]
    (m,) = QUANTITY.findall(text)
    (issue,) = [
        i for i, (_, phrasings, _) in gen.ISSUES.items() if any(p in text for p in phrasings)
    ]
    quantity = int(next((g for g in m if g), "1"))
    return {"order_id": order_id, "product": product, "quantity": quantity, "issue": issue}


def test_answers_are_consistent_with_inputs(records: list[dict]) -> None:
    sessions = defaultdict(set)
    for r in good(records):
        msg, text = r["response"]["choices"][0]["message"], user(r)
        if task(r) == "extract":
            assert json.loads(msg["content"]) == rederive(text)
        elif task(r) == "lookup":
            (call,) = msg["tool_calls"]
            assert call["function"]["name"] == "lookup_order"
            assert json.loads(call["function"]["arguments"]) == {
                "order_id": rederive(text)["order_id"]
            }
            assert r["response"]["choices"][0]["finish_reason"] == "tool_calls"
        elif task(r) == "classify":
            account = any(t in text for t in gen.ACCOUNT_TICKETS)
            expected = "account" if account else gen.ISSUES[rederive(text)["issue"]][0]
            assert msg["content"] == expected
        else:
            facts = dict(line.split(": ", 1) for line in text.splitlines())
            first = facts["Customer"].split()[0]
            assert msg["content"].startswith(f"Hi {first},")
            for key in ("Order", "Expected by", "Delivered on", "Amount"):
                assert facts.get(key, "") in msg["content"]
            assert 1 <= msg["content"].count(". ") + 1 <= 3
        sessions[r["metadata"]["session_id"]].update(ORDER_ID.findall(text))
    # One conversation is about one order (or, for an account question, none).
    assert max(len(ids) for ids in sessions.values()) == 1


def test_pii_only_in_customer_text_never_needed_in_answers(records: list[dict]) -> None:
    def has_pii(text: str) -> bool:
        return bool(EMAIL.search(text) or PHONE.search(text))

    pii = [r for r in good(records) if has_pii(user(r))]
    assert len(pii) == 12
    assert {task(r) for r in pii} <= {"classify", "extract", "lookup"}
    assert not any(has_pii(json.dumps(r["response"])) for r in records)


def test_usage_timestamps_and_latency_are_plausible(records: list[dict]) -> None:
    for r in records:
        usage = r["response"].get("usage")
        if "choices" in r["response"]:
            assert usage["prompt_tokens"] + usage["completion_tokens"] == usage["total_tokens"]
            assert usage["prompt_tokens"] < 300
    answered = [r["latency_ms"] for r in good(records)]
    assert 400 <= min(answered) and max(answered) <= 2500
    stamps = [r["timestamp"] for r in records]
    assert stamps == sorted(stamps)
    assert len({s[:10] for s in stamps}) == 3


def test_imports_with_no_rejects(tmp_path: Path) -> None:
    with open_store(str(tmp_path / "calls.db")) as store:
        summary = import_files(store, [DEMO], tmp_path / "rejects.jsonl")
        statuses = Counter(c.record.status for c in store.iter_calls())
        hashes = {c.record.content_hash() for c in store.iter_calls()}
    assert (summary["read"], summary["imported"], summary["rejected"]) == (1208, 1208, 0)
    # Error responses are kept as failed calls; the 4 double-logged calls hash alike.
    assert statuses == {"ok": 1206, "error": 2}
    assert len(hashes) == 1204
