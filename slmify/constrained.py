"""Constrained decoding: the grammar a LoRA specialist generates under, from the request.

A tool-calling task's answer is one or more `<tool_call>{"name": ..., "arguments": ...}
</tool_call>` blocks (slmify.datasets' convention, one per line), each naming an offered
tool (the forced one when `tool_choice` forces one) with arguments valid against that
tool's JSON schema; a JSON task's answer is a JSON object or array (bare or in a ```json
fence, as parse_json reads it), valid against the request's `response_format` schema when
it gives one. Labels and free text are not constrained.

The grammar is an xgrammar structural tag (`output_grammar`): a plain JSON value that
`Grammars` compiles for a tokenizer here (slmify.runtime masks each greedy step with it)
and that vLLM takes as it is (`structured_outputs.structural_tag`, slmify.backends), so
in-process and remote generation are held to the same grammar. Reads nothing but a
specialist's recipe (`recipe_constrains`); writes nothing.

A schema xgrammar cannot compile (a regex feature it lacks, a dangling `$ref`) raises
`GrammarError` with xgrammar's reason; the pool then generates that task unconstrained and
records why (`SpecialistPool.unconstrained`), never failing the call.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from slmify.schema import OutputShape

JSON_FENCE = ("```json\n", "\n```")  # the fence parse_json accepts around a JSON answer
# json.dumps, which renders the trained tool calls, puts at most one space between tokens;
# more would only let an unsure model pad to its token cap.
TOOL_CALL_WHITESPACE = 1
# A teacher's pretty-printed JSON answer starts each line with a newline and its indent
# (4 spaces a level: 13 characters three levels deep); unbounded, a model unsure of the
# next value pads with whitespace to its token cap instead.
JSON_WHITESPACE = 16
SOURCE_PREFIX = re.compile(r"^\[[\d:]+\]\s*(\S+\.\w+:\d+:\s*)?")


class GrammarError(ValueError):
    """A grammar xgrammar cannot compile; the message is its reason."""


def _tool_tag(spec: dict[str, Any]) -> dict[str, Any]:
    """One tool's call in the convention: the begin string fixes its name, the content is
    its arguments' schema (rendered exactly as datasets.render_tool_call writes it)."""
    params = spec.get("parameters")
    schema = params if isinstance(params, dict) and params else {"type": "object"}
    name = json.dumps(spec.get("name"), ensure_ascii=False)
    return {
        "type": "tag",
        "begin": '<tool_call>{"name": ' + name + ', "arguments": ',
        "content": {
            "type": "json_schema",
            "json_schema": schema,
            "max_whitespace_cnt": TOOL_CALL_WHITESPACE,
        },
        "end": "}</tool_call>",
    }


def output_grammar(
    shape: OutputShape,
    specs: list[dict[str, Any]],
    forced: str | None,
    response_format: dict[str, Any],
    end: str | None = None,
) -> dict[str, Any] | None:
    """The structural tag a `shape` answer to a request is generated under (None: no
    constraint): `specs` the offered tools, `forced` the tool_choice (a name, `required`
    or None), `end` an end of turn to write after the answer (only where it is several
    tokens, so that a stop string ends generation, not EOS)."""
    if shape == "tool_call":
        named = [s for s in specs if isinstance(s, dict) and isinstance(s.get("name"), str)]
        if forced not in (None, "required"):
            named = [s for s in named if s["name"] == forced]
        if not named:
            return None
        body: dict[str, Any] = {
            "type": "tags_with_separator",
            "tags": [_tool_tag(s) for s in named],
            "separator": "\n",
            "at_least_one": True,
        }
    elif shape == "json":
        given = (response_format.get("json_schema") or {}).get("schema")
        schema = given if response_format.get("type") == "json_schema" and given else None
        # Bare JSON or fenced, as the task's teacher wrote it.
        value = {
            "type": "json_schema",
            "json_schema": schema or {"anyOf": [{"type": "object"}, {"type": "array"}]},
            "max_whitespace_cnt": JSON_WHITESPACE,
        }
        fenced = {"type": "tag", "begin": JSON_FENCE[0], "content": value, "end": JSON_FENCE[1]}
        body = {"type": "or", "elements": [value, fenced]}
    else:
        return None
    if end:
        body = {"type": "sequence", "elements": [body, {"type": "const_string", "value": end}]}
    return {"type": "structural_tag", "format": body}


def compiled_grammar(
    spec: Any,
    shape: OutputShape,
    specs: list[dict[str, Any]],
    forced: str | None,
    response_format: dict[str, Any],
) -> tuple[dict[str, Any] | None, str | None]:
    """The grammar (`output_grammar`) a specialist (`spec`: its `grammars` and
    `grammar_end`) generates an answer under, checked to compile for its tokenizer; else
    None, and why when the grammar did not compile."""
    grammar = output_grammar(shape, specs, forced, response_format, spec.grammar_end)
    if grammar is None:
        return None, None
    try:
        spec.grammars.compile(grammar)
    except GrammarError as e:
        return None, f"grammar not compiled: {e}"
    return grammar, None


def recipe_constrains(adapter: Path | None) -> bool:
    """Whether the recipe an adapter was trained with (recipe.yaml in its specialist's
    folder) constrains generation; yes where there is none. Eval reads it here, and
    `slmify manifest` copies it into the manifest's `constrained`, which serve reads, so
    both generate under the same rule; serve reads it here only for an older manifest."""
    from slmify.recipes import read_generate_config
    from slmify.workspace import RECIPE_FILE

    recipe = adapter.parent / RECIPE_FILE if adapter else None
    return read_generate_config(recipe).constrained if recipe and recipe.is_file() else True


def describe_grammar(tag: dict[str, Any]) -> str:
    """What a grammar holds the answer to, in a few words (for logs and benches)."""
    body = tag["format"]
    if body["type"] == "sequence":
        body = body["elements"][0]
    if body["type"] == "tags_with_separator":
        return f"tool calls of {len(body['tags'])} offered tool(s)"
    return "a JSON answer"


class Grammars:
    """Grammars compiled for one tokenizer (xgrammar), cached by their JSON text: a task's
    requests offer the same tools, so each is compiled once (a few ms)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: list[int]):
        import xgrammar as xgr

        # vocab_size: the model's logits width, which may pad the tokenizer's vocabulary.
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=stop_ids
        )
        self.compiler = xgr.GrammarCompiler(info)
        self.vocab_size = vocab_size
        self._compiled: dict[str, Any] = {}

    def compile(self, tag: dict[str, Any]) -> Any:
        """The compiled grammar; GrammarError with xgrammar's reason when it cannot be."""
        key = json.dumps(tag, sort_keys=True, ensure_ascii=False)
        if key not in self._compiled:
            try:
                self._compiled[key] = self.compiler.compile_structural_tag(key)
            # xgrammar reports what it cannot compile as RuntimeError (its C++ converters)
            # or a ValueError subclass (a malformed tag); either falls back, never crashes.
            except (RuntimeError, ValueError) as e:
                # "[04:41:43] /project/cpp/regex_converter.cc:94: Regex parsing error ...":
                # the reason without the time and xgrammar's source line.
                reason = SOURCE_PREFIX.sub("", str(e).strip()) or type(e).__name__
                raise GrammarError(reason[:300]) from e
        return self._compiled[key]

    def matcher(self, tag: dict[str, Any]) -> TokenMask:
        return TokenMask(self.compile(tag), self.vocab_size)


class TokenMask:
    """One answer's progress through its grammar: which tokens may come next, and the
    tokens chosen so far (a fresh one per answer)."""

    def __init__(self, compiled: Any, vocab_size: int):
        import xgrammar as xgr

        self.matcher = xgr.GrammarMatcher(compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    def allowed(self, logits: Any) -> Any:
        """`logits` (one position, float, on the CPU or a GPU) with every token the grammar forbids
        next at -inf; the input is left as it is."""
        import xgrammar as xgr

        masked = logits.detach().clone().unsqueeze(0)
        self.matcher.fill_next_token_bitmask(self.bitmask, 0)
        xgr.apply_token_bitmask_inplace(masked, self.bitmask.to(masked.device))
        return masked[0]

    def accept(self, token: int) -> bool:
        """Advance past `token`; False when the grammar does not allow it (then unchanged)."""
        return bool(self.matcher.accept_token(token))

    @property
    def finished(self) -> bool:
        return bool(self.matcher.is_terminated())
