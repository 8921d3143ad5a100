"""Grammars for constrained decoding: `response_format` and forced tool calls.

One grammar text per request, in llguidance's Lark dialect (JSON Schemas embedded with
`%json`), for both engines: the transformers engine compiles it with llguidance once per
grammar text (hf_engine.py; its masks: hf_masks.py); the vLLM engine hands it to vLLM's own
structured outputs, whose "guidance" backend is the same library. Built here, checked here
(a schema llguidance cannot compile is a 400 naming the field, before any engine sees it).

    start: answer | calls                 # response_format json_schema + tool_choice auto
    answer: %json{"type": "object", ...}
    calls: call ("\\n" call)*              # the tool parser's format (tools.py)
    call: "<tool_call>\\n" %json{"anyOf": [{"properties": {"name": {"const": "f"}, ...}}]} ...

JSON is generated compact with ", " and ": " separators (what chat templates' `tojson` and
Python's json.dumps write, so a forced tool call looks like the ones a model was trained on)
and objects that list their properties are closed (`additionalProperties: false` unless the
schema says otherwise), so that a model cannot wander into keys the schema does not name.
"""

from __future__ import annotations

import copy
import json
from typing import Any

# llguidance's JSON options (its "x-guidance" schema key).
JSON_OPTIONS = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}
ANY_OBJECT: dict[str, Any] = {"type": "object"}
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")
_SUBSCHEMAS = ("items", "additionalProperties", "not", "if", "then", "else", "contains")


class GrammarError(ValueError):
    """A schema or grammar the constrained decoder cannot compile; `param` names the field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def json_item(schema: dict[str, Any]) -> str:
    """A Lark item matching JSON values of `schema` (compact, closed objects)."""
    body = {**closed(schema), "x-guidance": JSON_OPTIONS}
    return "%json" + json.dumps(body, ensure_ascii=False, separators=(",", ":"))


def literal(text: str) -> str:
    """A Lark string literal."""
    return json.dumps(text, ensure_ascii=False)


def grammar(rules: dict[str, str]) -> str:
    """The grammar text of `rules` (name -> body), the first one being the start rule."""
    names = list(rules)
    lines = [f"start: {names[0]}"] + [f"{name}: {body}" for name, body in rules.items()]
    return "\n".join(lines) + "\n"


def closed(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` with `additionalProperties: false` on every object schema that lists
    `properties` and says nothing about others (a copy; the caller's stays as sent)."""
    out = copy.deepcopy(schema)
    _close(out)
    return out


def _close(node: Any) -> None:
    if isinstance(node, list):
        for item in node:
            _close(item)
        return
    if not isinstance(node, dict):
        return
    if isinstance(node.get("properties"), dict) and "additionalProperties" not in node:
        node["additionalProperties"] = False
    for key in _SUBSCHEMA_LISTS:
        _close(node.get(key))
    for key in _SUBSCHEMA_MAPS:
        if isinstance(node.get(key), dict):
            _close(list(node[key].values()))
    for key in _SUBSCHEMAS:
        _close(node.get(key))


def check(text: str, param: str) -> str:
    """`text` if llguidance compiles it, else GrammarError naming `param`."""
    import llguidance

    error = llguidance.LLMatcher.validate_grammar(text)
    if error:
        first = error.strip().splitlines()[0]
        raise GrammarError(param, f"{param}: the constrained decoder cannot use it: {first}")
    return text
