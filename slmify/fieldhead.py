"""A structured-answer specialist: tool calls and JSON answers assembled field by field,
each field chosen from a closed set or copied from the conversation, with a probability.

Many of an agent's calls answer with a fixed structure whose values are either one of a
few (an issue code, a cabin class, the tool to call) or copied from what the agent read
(an order id from the customer's email, a reservation id from the last tool result). A
generative model must learn to spell every value token by token; this head instead:

- learns the answer's *skeleton* (the tool's name and its argument keys, or the JSON's
  keys), a closed choice when the task answers with several;
- per leaf: `const` (always the same value), `choice` (logistic regression over the values
  seen in training, on the label head's features: MiniLM embeddings of the task statement
  and last turn, and their word n-grams), or `copy` (a pointer: every string in the request
  shaped like the values seen in training is a candidate; logistic regression on where it
  occurs scores them: how recent its message is and whose, the words and JSON key before
  it, its rank under that key from both ends, whether an earlier tool call already used
  it; a softmax over the call's candidates);
- answers the most likely skeleton and leaves; its confidence is the product of their
  probabilities, which the calibrated deferral of the end-to-end replay thresholds.

A leaf that qualifies both as `choice` and `copy` takes the one with the better
cross-validated accuracy. A task qualifies when one tool call (or one JSON value) answers
each call and every leaf is const, choice or copy on at least COPY_MIN of its calls;
otherwise `FieldHeadError` says why and the caller trains a LoRA.

Writes `specialists/<task id>/head/`: `head.json` (skeletons, leaves, vocabularies) and
`head.npz` (weights). No pickle: loading runs no code from the files.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slmify.labelhead import RequestFeatures, softmax
from slmify.schema import CallRecord, ChatRequest, message_text
from slmify.shapes import parse_json

MAX_CHOICES = 50  # more distinct values than this is no closed set
COPY_MIN = 0.9  # share of a leaf's values found verbatim in the request to copy it
MAX_WORDS = 4  # a copied value spans at most this many tokens
WORD_TOKENS = r"(?u)\b\w+\b"  # single characters count: "3 x Yoga Mat" decides a quantity
TOKEN = re.compile(r"[^\s\"'`,;(){}\[\]<>|=]+")
EDGE = ".:!?#*"
# An integer leaf also reads numbers spelled out ("one Bluetooth Speaker"), in English.
NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve".split()
    )
}
JSON_KEY = re.compile(r'"([^"]{1,40})"\s*:\s*(?:\[[^\]]*)?"?$')


class FieldHeadError(ValueError):
    """A task whose answers a field head cannot assemble; the message says why."""


# -- what an answer is made of ---------------------------------------------------------


def structure(call: CallRecord) -> tuple[str | None, Any]:
    """The answer as (tool name or None for JSON, value); FieldHeadError if neither."""
    calls = call.tool_calls()
    if calls:
        # Words beside the call ("Let me look that up") are not scored for a tool call and
        # not reproduced: the head answers with the call alone.
        if len(calls) > 1:
            raise FieldHeadError("answers with several tool calls")
        args = parse_json(calls[0]["arguments"] or "{}")
        if not isinstance(args, dict):
            raise FieldHeadError("tool-call arguments that are not a JSON object")
        return calls[0]["name"], args
    value = parse_json(call.output_text())
    if not isinstance(value, dict | list):
        raise FieldHeadError("answers that are neither a tool call nor JSON")
    return None, value


def leaves(value: Any, path: str = "") -> list[tuple[str, Any]]:
    """(path, scalar) for every leaf, in the value's own key order."""
    if isinstance(value, dict):
        return [x for k, v in value.items() for x in leaves(v, f"{path}/{k}")]
    if isinstance(value, list):
        return [x for i, v in enumerate(value) for x in leaves(v, f"{path}/{i}")]
    return [(path, value)]


def skeleton(name: str | None, value: Any) -> str:
    """The answer with its leaves blanked: the same string for answers of one form."""

    def blank(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: blank(x) for k, x in v.items()}
        if isinstance(v, list):
            return [blank(x) for x in v]
        return None

    return json.dumps([name, blank(value)])


def fill(form: str, values: dict[str, Any]) -> tuple[str | None, Any]:
    """The skeleton `form` with its leaves set from `values` (path -> value)."""
    name, value = json.loads(form)

    def put(v: Any, path: str) -> Any:
        if isinstance(v, dict):
            return {k: put(x, f"{path}/{k}") for k, x in v.items()}
        if isinstance(v, list):
            return [put(x, f"{path}/{i}") for i, x in enumerate(v)]
        return values[path]

    return name, put(value, "")


def render(name: str | None, value: Any) -> str:
    """The answer in the text convention the LoRA specialists produce (parse_output reads
    both): a `<tool_call>` block, or the JSON itself."""
    if name is None:
        return json.dumps(value, ensure_ascii=False)
    body = json.dumps({"name": name, "arguments": value}, ensure_ascii=False)
    return f"<tool_call>{body}</tool_call>"


# -- copy candidates -------------------------------------------------------------------


def char_classes(s: str) -> str:
    """The sorted set of character classes in `s`: A upper, a lower, 9 digit, else itself."""
    out = {"A" if c.isupper() else "a" if c.islower() else "9" if c.isdigit() else c for c in s}
    return "".join(sorted(out))


@dataclass
class Occurrence:
    distance: int  # messages from the end (0: the last one)
    role: str
    prev: tuple[str, ...]
    nxt: str
    key: str
    rank: int = 0  # among its message's candidates under the same JSON key, from the start
    rank_end: int = 0  # and from the end (the last of a list is often the latest)


@dataclass
class Candidate:
    text: str
    occurrences: list[Occurrence] = field(default_factory=list)


def _sources(request: ChatRequest) -> list[tuple[int, str, str]]:
    """(distance from the end, role, text) of every message, tool-call arguments included."""
    msgs, out = request.messages, []
    for i, m in enumerate(msgs):
        role = str(m.get("role", "user"))
        text = message_text(m.get("content"))
        calls = [c.get("function", {}) for c in m.get("tool_calls") or [] if isinstance(c, dict)]
        if calls:
            text += "\n" + "\n".join(str(c.get("arguments", "")) for c in calls)
        out.append((len(msgs) - 1 - i, "call" if calls else role, text))
    return out


def candidates(request: ChatRequest, shapes: dict[str, Any]) -> dict[str, Candidate]:
    """Strings of the request shaped like a leaf's training values: their character
    classes a subset of one seen, their length and word count within the range seen."""
    allowed = [set(c) for c in shapes["classes"]]
    lo, hi, words = shapes["min_len"], shapes["max_len"], shapes["max_words"]
    found: dict[str, Candidate] = {}
    for distance, role, text in _sources(request):
        tokens = _tokens(text, bool(shapes.get("numbers")))
        here: list[Occurrence] = []
        for i in range(len(tokens)):
            for n in range(1, words + 1):
                if i + n > len(tokens):
                    break
                s = " ".join(t for _, t in tokens[i : i + n])
                if n == 1 and shapes.get("numbers"):
                    s = NUMBER_WORDS.get(s.lower(), s)
                if not lo <= len(s) <= hi or not any(set(char_classes(s)) <= a for a in allowed):
                    continue
                before = text[max(0, tokens[i][0] - 60) : tokens[i][0]]
                key = JSON_KEY.search(before)
                end = tokens[i + n - 1][0] + len(tokens[i + n - 1][1]) + 1
                after = re.findall(r"\w+", text[end : end + 30])
                occ = Occurrence(
                    distance,
                    role,
                    tuple(w.lower() for w in re.findall(r"\w+", before)[-2:]),
                    after[0].lower() if after else "",
                    key.group(1) if key else "",
                )
                here.append(occ)
                found.setdefault(s, Candidate(s)).occurrences.append(occ)
        _rank(here)
    return found


def _rank(occurrences: list[Occurrence]) -> None:
    """Number one message's occurrences within their JSON key, from both ends."""
    by_key: dict[str, list[Occurrence]] = {}
    for o in occurrences:
        by_key.setdefault(o.key, []).append(o)
    for group in by_key.values():
        for i, o in enumerate(group):
            o.rank, o.rank_end = i, len(group) - 1 - i


def _tokens(text: str, numbers: bool) -> list[tuple[int, str]]:
    """(offset, token) in order; for a numeric leaf also the digit runs inside tokens
    ("x2", "#3")."""
    out = []
    for m in TOKEN.finditer(text):
        token = m.group().strip(EDGE)
        out.append((m.start() + m.group().find(token), token))
        if numbers and not token.isdigit():
            out += [(m.start() + d.start(), d.group()) for d in re.finditer(r"\d+", m.group())]
    return out


def _bucket(n: int) -> str:
    return str(n) if n < 3 else "3-5" if n < 6 else "6-9" if n < 10 else "10+"


def candidate_features(c: Candidate, used: set[str], used_same: set[str]) -> dict[str, float]:
    """What the pointer reads about one candidate: where its most recent occurrence is."""
    last = min(c.occurrences, key=lambda o: (o.distance, -o.rank))
    f = {
        f"classes={char_classes(c.text)}": 1.0,
        f"distance={_bucket(last.distance)}": 1.0,
        f"role={last.role}": 1.0,
        f"role_distance={last.role}:{_bucket(last.distance)}": 1.0,
        f"count={min(len(c.occurrences), 3)}": 1.0,
        f"rank={min(last.rank, 3)}": 1.0,
        f"rank_end={min(last.rank_end, 3)}": 1.0,
        f"key={last.key}": 1.0,
        f"key_rank={last.key}:{min(last.rank, 3)}:{min(last.rank_end, 3)}": 1.0,
        f"next={last.nxt}": 1.0,
        "used_same": float(c.text in used_same),
        "used_any": float(c.text in used),
    }
    for i, w in enumerate(reversed(last.prev)):
        f[f"prev{i + 1}={w}"] = 1.0
    return f


def previous_values(request: ChatRequest, name: str | None, path: str) -> tuple[set, set]:
    """Strings in earlier tool calls' arguments, and those at `path` of calls to `name`."""
    used, same = set(), set()
    for m in request.messages:
        for c in m.get("tool_calls") or []:
            fn = c.get("function", {}) if isinstance(c, dict) else {}
            args = parse_json(str(fn.get("arguments") or "{}"))
            for p, v in leaves(args) if isinstance(args, dict | list) else []:
                used.add(str(v))
                if fn.get("name") == name and p == path:
                    same.add(str(v))
    return used, same


# -- the head --------------------------------------------------------------------------


@dataclass
class Linear:
    """Logistic regression weights over named sparse features (copy) or dense rows."""

    coef: np.ndarray  # (classes, features)
    intercept: np.ndarray
    names: dict[str, int] | None = None  # sparse feature name -> column (copy leaves)

    def logits(self, X: np.ndarray) -> np.ndarray:
        return X @ self.coef.T + self.intercept

    def sparse(self, rows: list[dict[str, float]]) -> np.ndarray:
        assert self.names is not None
        X = np.zeros((len(rows), len(self.names)), np.float32)
        for i, row in enumerate(rows):
            for k, v in row.items():
                if (j := self.names.get(k)) is not None:
                    X[i, j] = v
        return X


@dataclass
class FieldHead:
    meta: dict[str, Any]  # forms, leaves, vocabulary, embedding model
    weights: dict[str, Linear]  # "form" and each choice / copy leaf path
    idf: np.ndarray

    def __post_init__(self) -> None:
        # The choice leaves' features: the label head's, single-character words included.
        self.dense = RequestFeatures(self.meta, self.idf, WORD_TOKENS)

    def predict(self, request: ChatRequest) -> tuple[str | None, float, str | None]:
        """(answer text, confidence, problem): the problem names a leaf with no candidate."""
        forms = self.meta["forms"]
        dense: list[np.ndarray] = []  # computed once, and only for a choice to make

        def features() -> np.ndarray:
            if not dense:
                dense.append(self.dense([request])[0:1])
            return dense[0]

        probability = 1.0
        if len(forms) > 1:
            p = softmax(self.weights["form"].logits(features()))[0]
            best = int(p.argmax())
            form, probability = forms[best], float(p[best])
        else:
            form = forms[0]
        name = json.loads(form)[0]
        values: dict[str, Any] = {}
        for path in self.meta["form_leaves"][form]:
            leaf = self.meta["leaves"][path]
            if leaf["kind"] == "const":
                values[path] = leaf["value"]
                continue
            if leaf["kind"] == "choice":
                p = softmax(self.weights[path].logits(features()))[0]
                best = int(p.argmax())
                values[path], prob = json.loads(leaf["classes"][best]), float(p[best])
            else:
                text, prob = self._copy(request, name, path, leaf)
                if text is None:
                    return None, 0.0, f"no value in the request shaped like {path}"
                values[path] = _typed(text, leaf["type"])
                if values[path] is None:
                    return None, 0.0, f"{text!r} is not a {leaf['type']} for {path}"
            probability *= prob
        return render(*fill(form, values)), probability, None

    def _copy(self, request, name, path, leaf) -> tuple[str | None, float]:
        best, probability, _ = self.pointer(request, name, path, leaf)
        return (best.text if best else None), probability

    def pointer(self, request, name, path, leaf) -> tuple[Candidate | None, float, set[str]]:  # noqa: ANN001
        """The copy leaf's pick among the request's candidates (None: there is none), its
        probability, and the values earlier tool calls already used."""
        found = list(candidates(request, leaf["shapes"]).values())
        if not found:
            return None, 0.0, set()
        used, same = previous_values(request, name, path)
        w = self.weights[path]
        X = w.sparse([candidate_features(c, used, same) for c in found])
        p = softmax(w.logits(X)[:, 0])
        best = int(p.argmax())
        return found[best], float(p[best]), used

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        arrays = {"idf": self.idf}
        for key, w in self.weights.items():
            arrays[f"{key}|coef"], arrays[f"{key}|intercept"] = w.coef, w.intercept
        np.savez(folder / "head.npz", **arrays)
        names = {k: w.names for k, w in self.weights.items() if w.names is not None}
        doc = {**self.meta, "copy_features": names}
        (folder / "head.json").write_text(json.dumps(doc, indent=1), encoding="utf-8")


def load_field_head(folder: Path) -> FieldHead:
    meta = json.loads((folder / "head.json").read_text(encoding="utf-8"))
    names = meta.pop("copy_features")
    with np.load(folder / "head.npz") as a:
        keys = {k.rsplit("|", 1)[0] for k in a.files if "|" in k}
        weights = {k: Linear(a[f"{k}|coef"], a[f"{k}|intercept"], names.get(k)) for k in keys}
        return FieldHead(meta, weights, a["idf"])


def _typed(text: str, kind: str) -> Any:
    """A copied string as the leaf's JSON type; None when it cannot be."""
    if kind == "str":
        return text
    try:
        return int(text) if kind == "int" else float(text)
    except ValueError:
        return None


def json_type(v: Any) -> str:
    """A leaf's type as the copy pointer casts to it (bool and null are never copied)."""
    if isinstance(v, bool) or v is None:
        return "literal"
    return "int" if isinstance(v, int) else "float" if isinstance(v, float) else "str"
