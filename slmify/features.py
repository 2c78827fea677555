"""What a call looks like to task discovery and to the router: its feature blocks.

A call (or, for the router, a bare request) is reduced to a few readable fields, and
those to numeric blocks, each of unit norm per call so that a recipe weight says how
much the block counts:

- identity: a hash of the system prompt and the offered tool names (which agent asks);
- action: the tools the LLM called, else the output's shape (json / label / text).
  Known only once the LLM has answered, so clustering uses it and the router never does;
- input shape: the answer format the task statement asks for (a choice among listed
  options, a yes/no question, an open question, structured data, a statement);
- task text: the first user message (the task statement), embedded;
- turn text: the last user or tool message (what the LLM reacts to now), embedded;
- router only: the role of that last turn, the agent's previous action, and optionally
  the TF-IDF of the word 1-2-grams (`Ngrams`: a vocabulary and idf weights, no model
  pass, so it costs microseconds where an embedding costs milliseconds) of the last turn,
  the task statement and/or the reply text: the text of the agent's last assistant
  message (what it just asked: "please confirm (yes) to proceed" makes the user's "yes"
  a cancellation); the router's embedding blocks are optional too.

The texts keep only what varies across an agent's calls: the system prompt and tool
schemas are never embedded, and lines that recur in most of one agent's calls (a policy
pasted into every user message) are dropped, so they cannot drown the part that varies.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from slmify.schema import CallRecord, ChatRequest, OutputShape, message_text
from slmify.shapes import text_shape
from slmify.store import Store

INPUT_SHAPES = ("structured", "choice", "yes_no_question", "open_question", "statement")
TURN_ROLES = ("user", "tool", "none")
# Words that open a question answered by yes or no, in English; other languages fall back
# to open_question, which still separates questions from statements.
YES_NO_OPENERS = frozenset(
    "is are am was were do does did can could would will should shall has have had may "
    "might must".split()
)
OPTION_LINE = re.compile(r"^\s*(?:[A-Ha-h]|\d{1,2})[.)]\s")
LABEL_PREFIX = re.compile(r"^\w+:\s*")
MAX_TEXT_CHARS = 2000  # MiniLM reads 128-256 word pieces; more text only costs time.
SHARED_LINE_SHARE = 0.5  # a line in at least half of an agent's calls is boilerplate
SHARED_MIN_CALLS = 20


@dataclass(frozen=True)
class InputView:
    """The parts of a request the features read, known before the LLM answers."""

    identity: str
    task_text: str
    turn_text: str
    turn_role: str
    previous_action: str
    reply_text: str  # the last assistant message's text; "" without one, or a bare tool call


def line_key(line: str) -> str:
    return hashlib.sha256(line.strip().encode("utf-8")).hexdigest()[:16]


def input_view(request: ChatRequest) -> InputView:
    msgs = request.messages
    system = "\n".join(message_text(m.get("content")) for m in msgs if m.get("role") == "system")
    tools = sorted(
        t.get("function", t).get("name", "")
        for t in [*(request.tools or []), *(request.functions or [])]
    )
    identity = hashlib.sha256(json.dumps([system, tools]).encode("utf-8")).hexdigest()[:12]
    task = next((m for m in msgs if m.get("role") == "user"), None)
    turn = next((m for m in reversed(msgs) if m.get("role") in ("user", "tool", "function")), None)
    last_assistant = next((m for m in reversed(msgs) if m.get("role") == "assistant"), None)
    return InputView(
        identity=identity,
        task_text=message_text(task.get("content")) if task else "",
        turn_text=message_text(turn.get("content")) if turn else "",
        turn_role="none" if turn is None else ("user" if turn["role"] == "user" else "tool"),
        previous_action=message_action(last_assistant) if last_assistant else "start",
        reply_text=message_text(last_assistant.get("content")) if last_assistant else "",
    )


def message_action(msg: dict) -> str:
    """An assistant message's action: the tool(s) it called (`a+b`), else its text's shape
    (a call's previous action; an agent-level specialist's answer's, slmify.agent)."""
    names = [c["function"].get("name", "") for c in msg.get("tool_calls") or [] if "function" in c]
    if isinstance(msg.get("function_call"), dict):
        names.append(msg["function_call"].get("name", ""))
    return "+".join(sorted(set(names))) if names else text_shape(message_text(msg.get("content")))


def output_shape(record: CallRecord) -> OutputShape:
    return "tool_call" if record.tool_calls() else text_shape(record.output_text())


def action_of(record: CallRecord) -> str:
    """Tool name(s) called (`a+b`), else the output's shape."""
    names = sorted({c["name"] for c in record.tool_calls()})
    return "+".join(names) if names else text_shape(record.output_text())


def input_shape(text: str) -> str:
    """The answer format a task statement asks for (one of INPUT_SHAPES)."""
    s = text.strip()
    if text_shape(s) == "json":
        return "structured"
    lines = [ln for ln in s.splitlines() if ln.strip()]
    if sum(bool(OPTION_LINE.match(ln)) for ln in lines) >= 2:
        return "choice"
    if "?" in s:
        first = re.findall(r"[A-Za-z']+", LABEL_PREFIX.sub("", s, count=1))[:1]
        return (
            "yes_no_question" if first and first[0].lower() in YES_NO_OPENERS else ("open_question")
        )
    return "statement"


# -- shared text ------------------------------------------------------------------------


def shared_lines(views: list[InputView]) -> dict[str, set[str]]:
    """Per agent identity, keys of the lines found in at least half of its calls."""
    per_identity: dict[str, Counter] = defaultdict(Counter)
    calls: Counter = Counter()
    for v in views:
        calls[v.identity] += 1
        keys = {line_key(ln) for t in (v.task_text, v.turn_text) for ln in t.splitlines()}
        per_identity[v.identity].update(k for k in keys if k)
    return {
        ident: {k for k, n in counts.items() if n >= SHARED_LINE_SHARE * calls[ident]}
        for ident, counts in per_identity.items()
        if calls[ident] >= SHARED_MIN_CALLS
    }


def dynamic_text(text: str, shared: set[str]) -> str:
    """`text` without its boilerplate lines, cut to what the embedder reads."""
    if shared:
        text = "\n".join(ln for ln in text.splitlines() if line_key(ln) not in shared)
    return text.strip()[:MAX_TEXT_CHARS]


# -- numeric blocks -----------------------------------------------------------------------


def onehot(values: list[str], vocab: list[str]) -> np.ndarray:
    """Rows of 0/1 over `vocab`; a value not in it (unseen at fit time) gives zeros."""
    index = {v: i for i, v in enumerate(vocab)}
    out = np.zeros((len(values), len(vocab)), dtype=np.float32)
    for row, v in enumerate(values):
        if v in index:
            out[row, index[v]] = 1.0
    return out


@dataclass
class Projection:
    """PCA of embeddings, rows renormalized: cheap distances, and one matmul at routing."""

    mean: np.ndarray
    components: np.ndarray

    @classmethod
    def fit(cls, vectors: np.ndarray, dims: int, seed: int) -> Projection:
        from sklearn.decomposition import PCA

        dims = max(1, min(dims, vectors.shape[1], len(vectors) - 1))
        rng = np.random.default_rng(seed)
        sample = vectors[rng.choice(len(vectors), min(len(vectors), 20000), replace=False)]
        pca = PCA(n_components=dims, random_state=seed).fit(sample)
        return cls(pca.mean_.astype(np.float32), pca.components_.astype(np.float32))

    def __call__(self, vectors: np.ndarray) -> np.ndarray:
        z = (vectors - self.mean) @ self.components.T
        norms = np.linalg.norm(z, axis=1, keepdims=True)
        return z / np.maximum(norms, 1e-9)


# sklearn's default word pattern: words of two or more characters, lowercased.
WORD = re.compile(r"(?u)\b\w\w+\b")
NGRAM_FEATURES = 5000  # most frequent 1-2-grams kept: bench_routing's vocabulary size


@dataclass
class Ngrams:
    """TF-IDF of word 1-2-grams (sublinear tf, rows of unit norm) over a fixed vocabulary.

    Fitted by sklearn's TfidfVectorizer (min_df 2, the NGRAM_FEATURES most frequent
    terms); applied by this class alone, at fit time and at routing alike, so the vectors
    a router was fitted on are the ones it routes with, and loading it needs only the
    terms (router.json) and their idf (router.npz)."""

    terms: list[str]
    idf: np.ndarray

    def __post_init__(self) -> None:
        self.index = {t: i for i, t in enumerate(self.terms)}

    @classmethod
    def fit(cls, texts: list[str]) -> Ngrams:
        from sklearn.feature_extraction.text import TfidfVectorizer

        vec = TfidfVectorizer(
            ngram_range=(1, 2), min_df=2, sublinear_tf=True, max_features=NGRAM_FEATURES
        )
        try:
            vec.fit(texts)
        except ValueError:  # no term in two texts (a tiny log): an empty block
            return cls([], np.zeros(0, np.float32))
        return cls(vec.get_feature_names_out().tolist(), vec.idf_.astype(np.float32))

    def __call__(self, texts: list[str]):  # noqa: ANN204 - a scipy CSR matrix
        from scipy import sparse

        data: list[float] = []
        cols: list[int] = []
        indptr = [0]
        for text in texts:
            words = WORD.findall(text.lower())
            pairs = [f"{a} {b}" for a, b in zip(words[:-1], words[1:], strict=True)]
            counts = Counter(words + pairs)
            found = sorted((self.index[t], n) for t, n in counts.items() if t in self.index)
            weights = np.array(
                [(1.0 + np.log(n)) * self.idf[j] for j, n in found], dtype=np.float64
            )
            norm = np.sqrt((weights**2).sum())
            data.extend((weights / norm if norm > 0 else weights).tolist())
            cols.extend(j for j, _ in found)
            indptr.append(len(cols))
        shape = (len(texts), len(self.terms))
        return sparse.csr_matrix((np.array(data, np.float32), cols, indptr), shape=shape)


def input_blocks(
    views: list[InputView],
    identities: list[str],
    previous_actions: list[str],
    task_vecs: np.ndarray | None,
    turn_vecs: np.ndarray | None,
    ngrams: Ngrams | None = None,
    task_ngrams: Ngrams | None = None,
    reply_ngrams: Ngrams | None = None,
):  # noqa: ANN201 - an ndarray, or a CSR matrix with an n-gram block
    """The router's features: everything known before the LLM answers, unweighted. The
    embeddings and n-grams are optional blocks (None: left out). Each newer block comes
    after the older ones (the turn's n-grams, the task statement's, the reply text's), so
    a router fitted before a block existed keeps its columns."""
    dense = np.hstack(
        [
            onehot([v.identity for v in views], identities),
            onehot([input_shape(v.task_text) for v in views], list(INPUT_SHAPES)),
            onehot([v.turn_role for v in views], list(TURN_ROLES)),
            onehot([v.previous_action for v in views], previous_actions),
            *([] if task_vecs is None else [task_vecs]),
            *([] if turn_vecs is None else [turn_vecs]),
        ]
    ).astype(np.float32)
    if ngrams is None and task_ngrams is None and reply_ngrams is None:
        return dense
    from scipy import sparse

    blocks = [sparse.csr_matrix(dense)]
    if ngrams is not None:
        blocks.append(ngrams([v.turn_text for v in views]))
    if task_ngrams is not None:
        blocks.append(task_ngrams([v.task_text for v in views]))
    if reply_ngrams is not None:
        blocks.append(reply_ngrams([v.reply_text for v in views]))
    return sparse.hstack(blocks, format="csr", dtype=np.float32)


@dataclass
class CallView:
    """One call as task discovery sees it: its input view, its action, its size."""

    id: str
    session: str
    model: str
    inputs: InputView
    action: str
    output_shape: OutputShape
    output_text: str
    input_tokens: int
    output_tokens: int
    tokens_estimated: bool  # the log had no usage: counted with the embedder's tokenizer


def load_views(store: Store, count_tokens: Callable[[str], int]) -> list[CallView]:
    """The calls to cluster: status ok and not marked duplicate or excluded by curation
    (all ok calls when curation has not run)."""
    views = []
    for stored in store.iter_calls():
        r, cur = stored.record, stored.curation
        if r.status != "ok" or (cur and (cur.duplicate_of or cur.excluded)):
            continue
        calls = r.tool_calls()
        out = " ".join([r.output_text(), *(f"{c['name']} {c['arguments']}" for c in calls)])
        logged = r.usage.prompt_tokens is not None and r.usage.completion_tokens is not None
        if logged:
            tokens_in, tokens_out = r.usage.prompt_tokens, r.usage.completion_tokens
        else:
            schemas = json.dumps(r.offered_tools()) if r.offered_tools() else ""
            tokens_in = count_tokens(schemas) + sum(
                count_tokens(_message_for_tokens(m)) for m in r.request.messages
            )
            tokens_out = count_tokens(out.strip())
        model = r.request.model or (r.response.model if r.response else None) or "unknown"
        views.append(
            CallView(
                id=r.id,
                session=r.session_id or r.id,
                model=model,
                inputs=input_view(r.request),
                action=action_of(r),
                output_shape=output_shape(r),
                output_text=out.strip()[:1000],
                input_tokens=tokens_in,
                output_tokens=tokens_out,
                tokens_estimated=not logged,
            )
        )
    return views


def _message_for_tokens(msg: dict[str, Any]) -> str:
    calls = msg.get("tool_calls") or msg.get("function_call")
    return message_text(msg.get("content")) + (json.dumps(calls) if calls else "")


def strip_boilerplate(views: list[CallView]) -> tuple[list[CallView], dict[str, set[str]]]:
    """The views with each agent's shared lines removed from their texts, and those lines."""
    shared = shared_lines([v.inputs for v in views])
    out = []
    for v in views:
        lines = shared.get(v.inputs.identity, set())
        inputs = replace(
            v.inputs,
            task_text=dynamic_text(v.inputs.task_text, lines),
            turn_text=dynamic_text(v.inputs.turn_text, lines),
            reply_text=dynamic_text(v.inputs.reply_text, lines),
        )
        out.append(replace(v, inputs=inputs))
    return out, shared
