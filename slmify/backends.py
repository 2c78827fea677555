"""Generation on a server: the LoRA specialists answered by an OpenAI-compatible completions
server that hosts their adapters (vLLM first, as exports/vllm-serve.sh starts it; the same
client speaks to SGLang or llama.cpp's server), instead of in-process transformers.

Reads the servers' `GET /v1/models` at startup and sends `POST /v1/completions`; writes
nothing. Everything but the generating stays in slmify (slmify.specialists.SpecialistPool):
the prompt is `build_prompt`'s text, byte for byte what eval built and in-process serving
generates from; the router, scope checks, validation, deferral, fallback and recording are
unchanged. Each request asks for what the in-process runtime does (slmify.runtime): greedy,
the same token cap, stopping at EOS and the template's end of turn, the prompt tokenized
without special tokens added, and each generated token's log-probability, from which
`answer_confidence` computes the confidence exactly as in-process. The fields vLLM adds to
the OpenAI request (`add_special_tokens`, `stop_token_ids`, `return_tokens_as_token_ids`)
are ignored by servers that do not know them; with the returned token ids the answer is
decoded here, by the tokenizer eval used.

Startup (`CompletionsBackend.connect`) fails on an adapter no server lists, so a missing
adapter is found before the first call; one completion per server checks that it returns
log-probabilities. A server without them gives every answer confidence 0 (each task with a
deferral threshold then defers to the LLM), and serve says so when it starts. A server
that is down or answers an error raises `BackendError`: serve sends that call to the LLM
with the reason `specialist-error: backend URL: ...`.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from slmify.errors import SlmifyError
from slmify.runtime import Generation, answer_confidence, cut_at_turn_end, turn_stops
from slmify.schema import OutputShape

# Live and shadow calls each wait on the server in a thread of their own: the server batches
# them, so serve's single in-process generation thread would serialize what it parallelizes.
BACKEND_THREADS = 64
TOKEN_ID_PREFIX = "token_id:"  # vLLM's form of a token under return_tokens_as_token_ids


class BackendError(SlmifyError, RuntimeError):
    """A generation server that cannot be reached, errs, or lacks an adapter; the message
    starts with `backend URL:`."""


def _call(url: str, path: str, timeout_s: float, body: dict[str, Any] | None = None) -> Any:
    """GET (no body) or POST JSON to url + path; the JSON answer, or BackendError."""
    data = None if body is None else json.dumps(body, ensure_ascii=False).encode()
    request = urllib.request.Request(
        url + path, data=data, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        detail = e.read()[:300].decode("utf-8", "replace")
        raise BackendError(f"backend {url}: HTTP {e.code} on {path}: {detail}") from e
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise BackendError(f"backend {url}: {path} unreachable: {reason}") from e
    except ValueError as e:
        raise BackendError(f"backend {url}: {path} answered no JSON: {e}") from e


@dataclass
class CompletionsBackend:
    """The servers at `urls` (base URLs as an OpenAI SDK takes them, ending in /v1), and
    which of them serves each model id (a base model's path, an adapter's task id)."""

    urls: list[str]
    timeout_s: float = 600.0
    served_by: dict[str, str] = field(default_factory=dict)
    max_model_len: dict[str, int] = field(default_factory=dict)
    parent: dict[str, str] = field(default_factory=dict)  # adapter id -> its base's id
    without_logprobs: list[str] = field(default_factory=list)  # servers that return none

    def connect(self, adapters: list[str]) -> None:
        """Read every server's models; BackendError naming any of `adapters` none lists.
        Then one token from each server, to learn whether it returns log-probabilities."""
        for url in self.urls:
            for model in _call(url, "/models", self.timeout_s).get("data", []):
                self.served_by.setdefault(model["id"], url)
                if isinstance(model.get("max_model_len"), int):
                    self.max_model_len[model["id"]] = model["max_model_len"]
                if model.get("parent"):
                    self.parent[model["id"]] = model["parent"]
        missing = [a for a in adapters if a not in self.served_by]
        if missing:
            raise BackendError(
                f"backend {', '.join(self.urls)}: no adapter named {', '.join(missing)} "
                f"(served: {', '.join(sorted(self.served_by)) or 'nothing'}); start it with "
                "the manifest's exports/vllm-serve.sh"
            )
        probed = {self.served_by[a]: a for a in adapters}
        for url, adapter in probed.items():
            body = {"model": adapter, "prompt": "ok", "max_tokens": 1, "temperature": 0}
            answer = _call(url, "/completions", self.timeout_s, {**body, "logprobs": 1})
            if not _token_logprobs(answer):
                self.without_logprobs.append(url)

    def describe(self) -> list[str]:
        """What serve prints at startup about its generation servers."""
        lines = [f"generating on {url}" for url in self.urls]
        lines += [
            f"backend {url} returns no logprobs: its answers have confidence 0, so every task "
            "with a deferral threshold defers to the LLM"
            for url in self.without_logprobs
        ]
        return lines

    def specialist(self, base_path: str, max_new_tokens: int) -> RemoteSpecialist:
        return RemoteSpecialist(self, base_path, max_new_tokens)


def _token_logprobs(answer: dict[str, Any]) -> list[Any]:
    choices = answer.get("choices") or [{}]
    return ((choices[0] or {}).get("logprobs") or {}).get("token_logprobs") or []


class RemoteSpecialist:
    """A base model's adapters on a completions server, answering as `runtime.Specialist`
    does: the pool builds the prompt with `tokenizer`, this sends it and reads it back."""

    remote = True  # the pool calls it without its lock: the server batches concurrent calls

    def __init__(self, backend: CompletionsBackend, base_path: str, max_new_tokens: int):
        from transformers import AutoConfig, AutoTokenizer

        self.backend = backend
        self.base = base_path  # vLLM serves the base under its --model argument
        self.tokenizer = AutoTokenizer.from_pretrained(base_path)
        self.max_new_tokens = max_new_tokens
        self.end, self.stop_ids, several = turn_stops(self.tokenizer)
        self.stop_strings = [self.end] if several else []
        self.grammar_end = self.end if several else None  # as runtime.Specialist's
        config = AutoConfig.from_pretrained(base_path)
        window = config.max_position_embeddings
        self.vocab_size = config.vocab_size
        self._grammars: Any = None
        # The server may hold fewer tokens than the model could (vLLM's --max-model-len).
        served = [
            n for m, n in backend.max_model_len.items() if backend.parent.get(m, m) == base_path
        ]
        self.context_window = min([window, *served])

    @property
    def grammars(self) -> Any:
        """Grammars compiled here for this tokenizer: the pool sends only a grammar that
        compiles (slmify.constrained), so a schema xgrammar cannot express is generated
        unconstrained on the server too, as eval generated it."""
        if self._grammars is None:
            from slmify.constrained import Grammars

            self._grammars = Grammars(self.tokenizer, self.vocab_size, self.stop_ids)
        return self._grammars

    def answer(
        self,
        prompt: str,
        use_adapter: bool,
        max_new_tokens: int | None = None,
        shape: OutputShape = "tool_call",
        grammar: dict[str, Any] | None = None,
        adapter: str | None = None,
    ) -> Generation:
        """The server's greedy answer to `prompt` with `adapter` (or the base alone), its
        confidence from the returned log-probabilities (0 when there are none); under
        `grammar`, sent as vLLM's `structured_outputs.structural_tag` (vLLM compiles it
        with xgrammar too; its log-probabilities are then over the tokens the grammar
        allows, as in-process)."""
        model = adapter if use_adapter else self.base
        url = self.backend.served_by.get(model)
        if url is None:
            raise BackendError(f"backend {', '.join(self.backend.urls)}: no model {model}")
        body = {
            "model": model,
            "prompt": prompt,
            "max_tokens": max_new_tokens or self.max_new_tokens,
            "temperature": 0,
            "n": 1,
            "logprobs": 1,
            "add_special_tokens": False,  # the pool's token count and eval's: none added
            "stop_token_ids": self.stop_ids,
            "return_tokens_as_token_ids": True,
            "skip_special_tokens": False,
        }
        if self.stop_strings:
            body["stop"] = self.stop_strings
        if grammar is not None:
            body["structured_outputs"] = {"structural_tag": json.dumps(grammar)}
        t0 = time.perf_counter()
        answer = _call(url, "/completions", self.backend.timeout_s, body)
        latency_ms = (time.perf_counter() - t0) * 1000
        try:
            choice = answer["choices"][0]
            text = choice["text"]
        except (KeyError, IndexError, TypeError) as e:
            raise BackendError(f"backend {url}: a completion without choices[0].text") from e
        logprobs = choice.get("logprobs") or {}
        tokens, values = logprobs.get("tokens") or [], logprobs.get("token_logprobs") or []
        ids = _token_ids(tokens)
        if ids is not None:  # decoded here, as in-process: the same text for the same tokens
            text = self.tokenizer.decode(ids, skip_special_tokens=False)
            kept = [v for v, t in zip(values, ids, strict=False) if t not in self.stop_ids]
        else:  # a server naming tokens by their text: the stop tokens by theirs
            ends = {self.end, self.tokenizer.eos_token}
            kept = [v for v, t in zip(values, tokens, strict=False) if t not in ends]
        usage = answer.get("usage") or {}
        return Generation(
            text=cut_at_turn_end(text, self.end, self.tokenizer.eos_token),
            latency_ms=latency_ms,
            output_tokens=len(tokens) or int(usage.get("completion_tokens") or 0),
            confidence=answer_confidence([float(v) for v in kept if v is not None], shape),
        )


def _token_ids(tokens: list[Any]) -> list[int] | None:
    """The ids of tokens returned as `token_id:N`; None when any is not in that form."""
    if not tokens or not all(isinstance(t, str) and t.startswith(TOKEN_ID_PREFIX) for t in tokens):
        return None
    try:
        return [int(t[len(TOKEN_ID_PREFIX) :]) for t in tokens]
    except ValueError:
        return None
