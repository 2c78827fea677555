"""Generate slmify's bundled demo data: three days of logs of a small support agent.

Writes `data/demo/calls.jsonl.gz` (or `--out PATH`): one OpenAI chat-completions log
record per line, the shape of `../shared/datasets/*/calls.jsonl.gz`, from the agent
"acme-support", which runs up to four LLM steps per customer conversation (a session):

1. `classify`: label a support ticket (billing, shipping, returns, product_defect,
   cancellation, account);
2. `extract`: the order fields of a customer email as JSON (order_id, product, quantity,
   issue);
3. `lookup`: call the `lookup_order` tool with the order id;
4. `reply`: a short polite reply to the customer, given the order status.

The inputs are templates filled from seeded lists, and the "teacher" answers are computed
by rule from the same values, so every answer is correct and consistent and a small model
can learn them. Token usage is an estimate (4 characters a token), not a GPT-4o count.
On top of 300 good calls per task come the warts curation must handle: 12 calls with an
e-mail address or phone number in the customer's text, 4 calls logged twice (one per
task: same request and response, another id), 2 answers cut off at `max_tokens`
(finish_reason `length`) and 2 error responses (rate limit, server error), each followed
by its retry.

Same seed, same bytes: the gzip header carries no file name and mtime 0.
Run: .venv/bin/python scripts/make_demo_data.py [--out data/demo/calls.jsonl.gz]
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import random
import string
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

SEED = 20261124
OUT = Path(__file__).resolve().parents[1] / "data" / "demo" / "calls.jsonl.gz"
AGENT = "acme-support"
MODEL, SERVED_MODEL = "gpt-4o", "gpt-4o-2024-08-06"
TASKS = ("classify", "extract", "lookup", "reply")
PER_TASK = 300
PII_CALLS = 12
START = datetime(2026, 11, 16, tzinfo=timezone.utc)
DAYS = 3
# Per-task limits the agent sends; the two `length` failures came from a deploy that
# sent max_tokens=20 (TRUNCATED_LIMIT) before it was rolled back.
MAX_TOKENS = {"classify": 10, "extract": 80, "lookup": 60, "reply": 120}
TRUNCATED_LIMIT = 20
TEMPERATURE = {"classify": 0.0, "extract": 0.0, "lookup": 0.0, "reply": 0.7}
# Median latency in ms of a GPT-4o call per task; the spread is log-normal.
LATENCY_MEDIAN = {"classify": 620, "extract": 950, "lookup": 760, "reply": 1450}
# fmt: off
ERRORS = {
    "rate_limit": {"message": "Rate limit reached for gpt-4o in organization org-acme on "
                   "tokens per min (TPM): Limit 30000, Used 29870, Requested 412. Please try "
                   "again in 1.2s.", "type": "tokens", "param": None,
                   "code": "rate_limit_exceeded"},
    "server_error": {"message": "The server had an error while processing your request. "
                     "Sorry about that!", "type": "server_error", "param": None, "code": None},
}
# task -> the failed attempt logged before the good call, in one random conversation each.
FAILURES = {"extract": "length", "reply": "length", "classify": "rate_limit",
            "lookup": "server_error"}

SYSTEM = {
    "classify": "You are the ticket triage step of Acme's support desk. Classify the "
    "customer's ticket into exactly one label: billing, shipping, returns, product_defect, "
    "cancellation, account. Answer with the label only.",
    "extract": "You extract order details from customer emails for Acme support. Return "
    'only a JSON object with the keys "order_id" (like AC-123456), "product", "quantity" '
    '(an integer) and "issue" (one of: damaged, defective, wrong_item, return_request, '
    "late, not_delivered, double_charge, refund_missing, cancel).",
    "lookup": "You are Acme's order assistant. Before answering a customer, look the "
    "order up with the lookup_order tool.",
    "reply": "You write replies to Acme customers. Given the order status, write a short, "
    "polite reply of one to three sentences. Address the customer by first name.",
}
LOOKUP_TOOL = {"type": "function", "function": {
    "name": "lookup_order",
    "description": "Get the status, items and shipping details of an Acme order.",
    "parameters": {"type": "object", "required": ["order_id"], "properties": {
        "order_id": {"type": "string", "description": "The order id, such as 'AC-123456'."}}}}}

FIRST = ["Maria", "James", "Aisha", "Chen", "Lucas", "Sofia", "Omar", "Emma", "Ravi", "Hannah",
         "Diego", "Yuki", "Noah", "Fatima", "Liam", "Elena", "Kwame", "Grace", "Mateo", "Priya",
         "Jonas", "Amara", "Ethan", "Leila"]
LAST = ["Lopez", "Smith", "Khan", "Wei", "Martin", "Rossi", "Haddad", "Brown", "Patel", "Fischer",
        "Garcia", "Tanaka", "Miller", "Okafor", "Nguyen", "Silva", "Mensah", "Kim", "Novak", "Berg"]
# Product name -> unit price in USD (refund amounts are quantity x price).
PRODUCTS = {"Bamboo Cutting Board": 24.0, "Wireless Earbuds": 59.0, "Ceramic Mug Set": 32.0,
            "Desk Lamp": 45.0, "Yoga Mat": 29.0, "Stainless Water Bottle": 19.0,
            "Bluetooth Speaker": 79.0, "Cast Iron Skillet": 39.0, "Phone Charger": 15.0,
            "Wool Throw Blanket": 64.0, "Espresso Grinder": 129.0, "Running Shoes": 89.0,
            "Backpack": 54.0, "Smart Thermostat": 149.0, "Chef Knife": 69.0,
            "Laptop Stand": 38.0, "LED Strip Lights": 22.0, "Air Purifier Filter": 27.0}
# issue -> (ticket label, phrasings of the problem, statuses the order can have then)
ISSUES: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "damaged": ("product_defect", ("It arrived damaged, the box was crushed.",
                "It came broken and cannot be used.", "It was cracked when I opened the box."),
                ("replacement_shipped", "refund_issued")),
    "defective": ("product_defect", ("It stopped working after two days.",
                  "It does not turn on at all.", "It keeps shutting off, it seems faulty."),
                  ("replacement_shipped", "refund_issued")),
    "wrong_item": ("returns", ("You sent me the wrong item.",
                   "The package had a different product in it.",
                   "What arrived is not what I ordered."), ("replacement_shipped",)),
    "return_request": ("returns", ("I would like to return it.",
                       "It is not what I expected and I want to send it back.",
                       "How do I return it for a refund?"), ("refund_issued",)),
    "late": ("shipping", ("It still has not arrived and it is past the delivery date.",
             "It is taking much longer than promised.", "Where is my package? It is late."),
             ("processing", "shipped", "delayed")),
    "not_delivered": ("shipping", ("Tracking says delivered but I never got it.",
                      "The package was marked delivered but is not here.",
                      "I was told it was delivered, yet nothing arrived."), ("delivered",)),
    "double_charge": ("billing", ("I was charged twice for it.",
                      "My card shows two charges for this order.",
                      "You billed me two times for the same order."), ("refund_issued",)),
    "refund_missing": ("billing", ("I returned it two weeks ago and still have no refund.",
                       "My refund has not shown up yet.",
                       "I am still waiting for the refund you promised."), ("refund_issued",)),
    "cancel": ("cancellation", ("Please cancel it, I no longer need it.",
               "I want to cancel this order before it ships.",
               "Can you cancel it? I ordered by mistake."), ("cancelled",)),
}
ACCOUNT_TICKETS = (
    "I can't log in to my account, the password reset email never arrives.",
    "How do I change the shipping address saved in my profile?",
    "My account got locked after too many login attempts.",
    "Please delete my account and all the data you have about me.",
    "I want to unsubscribe from your marketing emails.",
    "Two-factor authentication keeps rejecting my code.",
)
GREETINGS = ("Hi,", "Hello,", "Hello Acme team,", "Hi there,", "Dear support,", "")
ORDER_SENTENCES = (
    "I ordered {item} ({ref}).",
    "I placed {ref} for {item}.",
    "Regarding {ref}: I bought {item}.",
    "Last week I purchased {item}, {ref}.",
)
ASKS = ("Can you help?", "Please advise.", "What can you do about it?", "Thanks in advance.", "")
SIGNOFFS = (
    "{first}",
    "Thanks, {first}",
    "Best, {first} {last}",
    "- {first} {last}",
    "Regards, {first}",
)
REPLIES = {
    "processing": "Hi {first}, thank you for reaching out. Your order {oid} is being prepared "
    "and will ship within 2 business days.",
    "shipped": "Hi {first}, thanks for your patience. Your order {oid} has shipped and should "
    "arrive by {date}.",
    "delayed": "Hi {first}, we're sorry your order {oid} is running late. It is now expected by "
    "{date}, and we appreciate your patience.",
    "delivered": "Hi {first}, our records show order {oid} was delivered on {date}. If you "
    "can't find it, please reply and we will open an investigation right away.",
    "replacement_shipped": "Hi {first}, we're sorry about the trouble with your {product}. A "
    "replacement for order {oid} has shipped and should arrive by {date}.",
    "refund_issued": "Hi {first}, we have issued a refund of ${amount} for order {oid}. It "
    "should appear on your original payment method within 5-7 business days.",
    "cancelled": "Hi {first}, your order {oid} has been cancelled as requested. A refund of "
    "${amount} will reach your original payment method within 5-7 business days.",
}
# fmt: on


@dataclass
class Conversation:
    """One customer's ticket and the facts every step of the agent derives from."""

    session_id: str
    start: datetime
    tasks: list[str]
    first: str
    last: str
    issue: str  # a key of ISSUES, or "account"
    order_id: str = ""
    product: str = ""
    quantity: int = 1
    status: str = ""
    email: str = ""
    pii: str = ""
    failures: dict[str, str] = field(default_factory=dict)  # task -> failed attempt first
    records: list[dict[str, Any]] = field(default_factory=list)


# -- planning: who writes in, when, about what ------------------------------------------


def plan_sessions(rng: random.Random) -> list[list[str]]:
    """The steps each conversation runs, in pipeline order; each task gets PER_TASK calls."""
    left = dict.fromkeys(TASKS, PER_TASK)
    plans = []
    while any(left.values()):
        size = rng.choices((1, 2, 3, 4), weights=(2, 3, 3, 4))[0]
        open_tasks = [t for t in TASKS if left[t]]
        picked = sorted(rng.sample(open_tasks, min(size, len(open_tasks))), key=TASKS.index)
        for t in picked:
            left[t] -= 1
        plans.append(picked)
    return plans


def make_conversations(rng: random.Random) -> list[Conversation]:
    plans = plan_sessions(rng)
    starts = sorted(
        START + timedelta(days=rng.randrange(DAYS), seconds=rng.uniform(7, 21) * 3600)
        for _ in plans
    )
    order_ids = rng.sample(range(100000, 1000000), len(plans))
    emails: set[str] = set()
    convs = []
    for i, (tasks, start, number) in enumerate(zip(plans, starts, order_ids, strict=True)):
        # Only a lone triage step can be an account question: the others need an order.
        account = tasks == ["classify"] and rng.random() < 0.5
        c = Conversation(
            session_id=f"acme-sess-{i + 1:04d}",
            start=start,
            tasks=tasks,
            first=rng.choice(FIRST),
            last=rng.choice(LAST),
            issue="account" if account else rng.choice(sorted(ISSUES)),
        )
        if not account:
            c.order_id, c.product = f"AC-{number}", rng.choice(sorted(PRODUCTS))
            c.quantity = rng.choices((1, 2, 3, 4), weights=(6, 3, 1, 1))[0]
            c.status = rng.choice(ISSUES[c.issue][2])
        convs.append(c)
    add_pii(rng, convs)
    for c in convs:
        # Regenerate on a clash so the only exact duplicates are the designed ones.
        while (email := write_email(rng, c)) in emails:
            pass
        emails.add(email)
        c.email = email
    return convs


def add_pii(rng: random.Random, convs: list[Conversation]) -> None:
    """Put a contact detail into exactly PII_CALLS calls that read the customer's email."""
    reads = {"classify", "extract", "lookup"}
    count = 0
    for c in rng.sample(convs, len(convs)):
        n = len(reads.intersection(c.tasks))
        if n and count + n <= PII_CALLS:
            user = f"{c.first}.{c.last}{rng.randrange(10, 99)}".lower()
            # 555-0100..0199 are the numbers set aside for fiction.
            area, line = rng.choice(("212", "415", "617", "312")), rng.randrange(100, 200)
            c.pii = rng.choice(
                (
                    f"You can reach me at {user}@example.com.",
                    f"Call me at ({area}) 555-0{line}.",
                    f"My phone is {area}-555-0{line}.",
                )
            )
            count += n
    assert count == PII_CALLS, "not enough conversations to place every PII call"


def write_email(rng: random.Random, c: Conversation) -> str:
    if c.issue == "account":
        body = rng.choice(ACCOUNT_TICKETS)
    else:
        q, p = c.quantity, c.product
        item = rng.choice(
            (f"one {p}", f"1 x {p}", f"{p} (x1)")
            if q == 1
            else (f"{q} x {p}", f"{q} units of {p}", f"{p} (x{q})")
        )
        ref = rng.choice(
            (f"order {c.order_id}", f"order #{c.order_id}", f"order number {c.order_id}")
        )
        body = " ".join(
            (
                rng.choice(ORDER_SENTENCES).format(item=item, ref=ref),
                rng.choice(ISSUES[c.issue][1]),
                rng.choice(ASKS),
            )
        )
    sign = rng.choice(SIGNOFFS).format(first=c.first, last=c.last)
    parts = (rng.choice(GREETINGS), body, c.pii, sign)
    return "\n".join(" ".join(x.split()) for x in parts if x)


# -- the teacher's answers, by rule ------------------------------------------------------


def answer(c: Conversation, task: str, rng: random.Random) -> dict[str, Any]:
    """The assistant message GPT-4o is taken to have returned for a step."""
    if task == "classify":
        return {"role": "assistant", "content": label_of(c.issue)}
    if task == "extract":
        fields = {
            "order_id": c.order_id,
            "product": c.product,
            "quantity": c.quantity,
            "issue": c.issue,
        }
        return {"role": "assistant", "content": json.dumps(fields)}
    if task == "lookup":
        call = {
            "id": "call_" + token(rng, 24),
            "type": "function",
            "function": {"name": "lookup_order", "arguments": json.dumps({"order_id": c.order_id})},
        }
        return {"role": "assistant", "content": None, "tool_calls": [call]}
    return {"role": "assistant", "content": REPLIES[c.status].format(**status_facts(c))}


def label_of(issue: str) -> str:
    return "account" if issue == "account" else ISSUES[issue][0]


def status_facts(c: Conversation) -> dict[str, str]:
    """What `lookup_order` told the agent; the reply step sees these and nothing else."""
    # Delivered in the past, every other date an expected arrival.
    day = c.start + timedelta(days=-2 if c.status == "delivered" else 4)
    return {
        "first": c.first,
        "last": c.last,
        "oid": c.order_id,
        "product": c.product,
        "quantity": str(c.quantity),
        "date": f"{day:%b} {day.day}",
        "amount": f"{c.quantity * PRODUCTS[c.product]:.2f}",
    }


def user_text(c: Conversation, task: str) -> str:
    if task != "reply":
        return c.email
    f = status_facts(c)
    lines = [
        f"Customer: {c.first} {c.last}",
        f"Order: {c.order_id}",
        f"Items: {c.quantity} x {c.product}",
        f"Issue: {c.issue}",
        f"Status: {c.status}",
    ]
    if "{date}" in REPLIES[c.status]:
        lines.append(f"{'Delivered on' if c.status == 'delivered' else 'Expected by'}: {f['date']}")
    if "{amount}" in REPLIES[c.status]:
        lines.append(f"Amount: ${f['amount']}")
    return "\n".join(lines)


# -- log records ---------------------------------------------------------------------------


def request(c: Conversation, task: str, max_tokens: int) -> dict[str, Any]:
    req: dict[str, Any] = {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": SYSTEM[task]},
            {"role": "user", "content": user_text(c, task)},
        ],
    }
    if task == "lookup":
        req["tools"] = [LOOKUP_TOOL]
    return {**req, "temperature": TEMPERATURE[task], "max_tokens": max_tokens}


def record(
    rng: random.Random,
    c: Conversation,
    req: dict[str, Any],
    response: dict[str, Any],
    at: datetime,
    latency_ms: int,
) -> dict[str, Any]:
    return {
        "id": "log-" + token(rng, 20),
        "request": req,
        "response": response,
        "metadata": {"session_id": c.session_id, "agent": AGENT},
        "timestamp": at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "latency_ms": latency_ms,
    }


def completion(
    rng: random.Random,
    req: dict[str, Any],
    message: dict[str, Any],
    finish: str,
    completion_tokens: int,
) -> dict[str, Any]:
    prompt = estimate_tokens(req["messages"], req.get("tools"))
    return {
        "id": "chatcmpl-" + token(rng, 29),
        "object": "chat.completion",
        "model": SERVED_MODEL,
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt + completion_tokens,
        },
    }


def run_step(rng: random.Random, c: Conversation, task: str, at: datetime) -> datetime:
    """Log one step (and the failed attempt before it, if the plan has one); returns when
    the agent moves on."""
    failure = c.failures.get(task)
    if failure:
        at = log_failure(rng, c, task, failure, at)
    req = request(c, task, MAX_TOKENS[task])
    msg = answer(c, task, rng)
    out = msg["content"] or json.dumps(msg["tool_calls"][0]["function"])
    finish = "tool_calls" if task == "lookup" else "stop"
    resp = completion(rng, req, msg, finish, tokens_of(out))
    latency = 0
    while not 400 <= latency <= 2500:  # GPT-4o's range for these prompts; resample outliers
        latency = int(rng.lognormvariate(math.log(LATENCY_MEDIAN[task]), 0.35))
    c.records.append(record(rng, c, req, resp, at, latency))
    return at + timedelta(milliseconds=latency, seconds=rng.uniform(0.3, 4))


def log_failure(
    rng: random.Random, c: Conversation, task: str, kind: str, at: datetime
) -> datetime:
    if kind == "length":
        req = request(c, task, TRUNCATED_LIMIT)
        cut = answer(c, task, rng)["content"][: 4 * TRUNCATED_LIMIT]
        msg = {"role": "assistant", "content": cut}
        resp = completion(rng, req, msg, "length", TRUNCATED_LIMIT)
        latency = rng.randrange(600, 1100)
    else:
        req = request(c, task, MAX_TOKENS[task])
        resp = {"error": ERRORS[kind]}
        latency = rng.randrange(90, 300) if kind == "rate_limit" else rng.randrange(1500, 2500)
    c.records.append(record(rng, c, req, resp, at, latency))
    # The agent's client backs off before it retries.
    return at + timedelta(milliseconds=latency, seconds=rng.uniform(1, 3))


def place_failures(rng: random.Random, convs: list[Conversation]) -> None:
    """Give one conversation per FAILURES entry a failed attempt before its good call."""
    for task, kind in FAILURES.items():
        # Only where the retry keeps the session within 4 calls.
        pool = [c for c in convs if task in c.tasks and len(c.tasks) < 4 and not c.failures]
        rng.choice(pool).failures[task] = kind


def add_duplicates(rng: random.Random, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Log one good call per task twice, as a proxy that retried its write would."""
    copies = []
    for task in TASKS:
        pool = [
            r
            for r in records
            if r["request"]["messages"][0]["content"] == SYSTEM[task]
            and r["response"].get("choices", [{}])[0].get("finish_reason") in ("stop", "tool_calls")
        ]
        copies.append({**rng.choice(pool), "id": "log-" + token(rng, 20)})
    return records + copies


def token(rng: random.Random, n: int) -> str:
    return "".join(rng.choices(string.ascii_letters + string.digits, k=n))


def tokens_of(text: str) -> int:
    return max(1, math.ceil(len(text) / 4))


def estimate_tokens(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> int:
    # 4 tokens of chat markup per message, as OpenAI's cookbook counts them, plus 3 priming.
    n = 3 + sum(4 + tokens_of(m["content"]) for m in messages)
    return n + (tokens_of(json.dumps(tools)) if tools else 0)


def generate() -> list[dict[str, Any]]:
    """Every log record, in time order."""
    rng = random.Random(SEED)
    convs = make_conversations(rng)
    place_failures(rng, convs)
    records = []
    for c in convs:
        at = c.start
        for task in c.tasks:
            at = run_step(rng, c, task, at)
        records.extend(c.records)
    return sorted(add_duplicates(rng, records), key=lambda r: r["timestamp"])


def write(records: list[dict[str, Any]], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with (
        open(out, "wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as f,
    ):
        for r in records:
            f.write((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"default: {OUT}")
    out = parser.parse_args().out
    records = generate()
    write(records, out)
    print(f"wrote {len(records)} calls to {out} ({out.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
