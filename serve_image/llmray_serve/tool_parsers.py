"""Tool-call parsers, one per model family: model text -> content and tool calls, and the
grammar of the calls when a request forces them.

A chat template renders tool calls in its family's format (llmray.chat.TOOL_FORMATS names the
families and how a template is recognised); the parser of that format reads them back, as
vLLM's tool parsers do (`vllm/entrypoints/openai/tool_parsers/`). Each parser is a streaming
state machine: `feed(text)` takes the next piece of model text and returns what is certain so
far (`Content` to show, `Call`s complete with their arguments), `finish()` the rest once the
model stopped. A whole answer is parsed by the same machine in one `feed`, so a streamed
answer and a plain one give the same calls.

    hermes       <tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>  (one per call)
    llama3_json  {"name": "f", "parameters": {...}}; {"name": "g", "parameters": {...}}

A call that does not parse (not JSON, a function the request did not offer) stays text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol

from llmray_serve.grammars import NO_PARAMETERS, json_item, literal


@dataclass(frozen=True)
class Content:
    text: str


@dataclass(frozen=True)
class Call:
    name: str
    arguments: str  # JSON text of an object, as OpenAI sends it


Event = Content | Call


class ToolStream(Protocol):
    def feed(self, text: str) -> list[Event]: ...

    def finish(self) -> list[Event]: ...


class ToolParser(Protocol):
    name: str

    def stream(self, names: set[str]) -> ToolStream:
        """A parser for one answer; `names`: the functions the request offered."""
        ...

    def calls_rule(self, functions: list[dict[str, Any]], *, many: bool) -> dict[str, str]:
        """Lark rules whose first, `calls`, matches one call (`many`: one or more) of any of
        `functions` (OpenAI function definitions: name, parameters) in this format."""
        ...

    def auto_rules(self, functions: list[dict[str, Any]], *, many: bool) -> dict[str, str] | None:
        """Lark rules for tool_choice auto: any text, in which a call, once the model opens
        one, must be a valid call of one of `functions` (None: this format has no marker
        to tell a call from text as it starts, so auto answers are left unconstrained)."""
        ...


def _call_schema(functions: list[dict[str, Any]], arguments_key: str) -> dict[str, Any]:
    """The JSON Schema of one call object {"name": ..., arguments_key: {...}}."""
    options = [
        {
            "type": "object",
            "properties": {
                "name": {"const": f["name"]},
                arguments_key: f.get("parameters") or NO_PARAMETERS,
            },
            "required": ["name", arguments_key],
        }
        for f in functions
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}


def _as_call(obj: Any, names: set[str], arguments_keys: tuple[str, ...]) -> Call | None:
    """`obj` (parsed JSON) as a call of an offered function, or None."""
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    arguments = next((obj[k] for k in arguments_keys if k in obj), {})
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return Call(obj["name"], json.dumps(arguments, ensure_ascii=False))


def _held_back(text: str, marker: str) -> int:
    """Length of the longest end of `text` that `marker` starts with (it may be its start)."""
    return next(
        (n for n in range(min(len(marker) - 1, len(text)), 0, -1) if text.endswith(marker[:n])), 0
    )


class _TextAroundCalls:
    """Content between calls: whitespace next to a call is the format's, not the answer's
    (held back until the next text shows whether a call follows)."""

    def __init__(self) -> None:
        self.calls = 0
        self.space = ""

    def text(self, text: str, before_call: bool = False) -> list[Event]:
        text = self.space + text
        self.space = ""
        if before_call or self.calls:
            text = text.strip() if before_call else text.lstrip()
            if not text:
                return []
        body = text.rstrip()
        self.space = text[len(body) :]
        return [Content(body)] if body else []

    def end(self) -> list[Event]:
        space, self.space = self.space, ""
        return [Content(space)] if space and not self.calls else []


class HermesStream:
    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def __init__(self, names: set[str]) -> None:
        self.names, self.buffer, self.in_call = names, "", False
        self.around = _TextAroundCalls()

    def feed(self, text: str) -> list[Event]:
        self.buffer += text
        out: list[Event] = []
        while True:
            if not self.in_call:
                at = self.buffer.find(self.OPEN)
                if at == -1:
                    sure = len(self.buffer) - _held_back(self.buffer, self.OPEN)
                    out += self.around.text(self.buffer[:sure])
                    self.buffer = self.buffer[sure:]
                    return out
                out += self.around.text(self.buffer[:at], before_call=True)
                self.buffer, self.in_call = self.buffer[at + len(self.OPEN) :], True
            else:
                at = self.buffer.find(self.CLOSE)
                if at == -1:
                    return out
                out += self._call(self.buffer[:at], closed=True)
                self.buffer, self.in_call = self.buffer[at + len(self.CLOSE) :], False

    def finish(self) -> list[Event]:
        out = (
            self._call(self.buffer, closed=False) if self.in_call else self.around.text(self.buffer)
        )
        self.buffer, self.in_call = "", False
        return out + self.around.end()

    def _call(self, body: str, *, closed: bool) -> list[Event]:
        try:
            call = _as_call(json.loads(body), self.names, ("arguments", "parameters"))
        except json.JSONDecodeError:
            call = None
        if call is None:  # not a call after all: the model's text, as written
            return self.around.text(self.OPEN + body + (self.CLOSE if closed else ""))
        self.around.calls += 1
        return [call]


class Hermes:
    name = "hermes"

    def stream(self, names: set[str]) -> ToolStream:
        return HermesStream(names)

    def calls_rule(self, functions: list[dict[str, Any]], *, many: bool) -> dict[str, str]:
        schema = _call_schema(functions, "arguments")
        call = " ".join((literal("<tool_call>\n"), json_item(schema), literal("\n</tool_call>")))
        return {"calls": 'call ("\\n" call)*' if many else "call", "call": call}

    def auto_rules(self, functions: list[dict[str, Any]], *, many: bool) -> dict[str, str]:
        # llguidance's tool-calling idiom (its StructTag): a lazy lexeme ends the free text at
        # the first "<tool_call>", after which only a valid call can follow.
        schema = _call_schema(functions, "arguments")
        body = " ".join((literal("\n"), json_item(schema), literal("\n</tool_call>")))
        return {
            "text_and_calls": ("call_in_text* TEXT" if many else "call_in_text? TEXT"),
            "TEXT": "/(.|\\n)*/",
            "call_open[lazy]": 'TEXT "<tool_call>"',
            "call_in_text": f"call_open {body}",
        }


class Llama3JsonStream:
    """Llama 3.x answers a call with JSON alone: an answer that opens with `{` is held until
    it ends, then read as calls separated by ';' (or, failing that, shown as text)."""

    def __init__(self, names: set[str]) -> None:
        self.names, self.buffer, self.mode = names, "", ""  # mode: "" undecided, text, json

    def feed(self, text: str) -> list[Event]:
        self.buffer += text
        if not self.mode and self.buffer.strip():
            self.mode = "json" if self.buffer.lstrip().startswith("{") else "text"
        if self.mode != "text":
            return []
        out, self.buffer = self.buffer, ""
        return [Content(out)]

    def finish(self) -> list[Event]:
        text, self.buffer = self.buffer, ""
        if self.mode == "json":
            calls = self._calls(text)
            if calls:
                return calls
        return [Content(text)] if text else []

    def _calls(self, text: str) -> list[Event] | None:
        decoder, calls, at = json.JSONDecoder(), [], 0
        while True:
            while at < len(text) and text[at] in " \t\r\n;":
                at += 1
            if at == len(text):
                return calls or None
            try:
                obj, at = decoder.raw_decode(text, at)
            except json.JSONDecodeError:
                return None
            call = _as_call(obj, self.names, ("parameters", "arguments"))
            if call is None:
                return None
            calls.append(call)


class Llama3Json:
    name = "llama3_json"

    def stream(self, names: set[str]) -> ToolStream:
        return Llama3JsonStream(names)

    def calls_rule(self, functions: list[dict[str, Any]], *, many: bool) -> dict[str, str]:
        call = json_item(_call_schema(functions, "parameters"))
        return {"calls": 'call ("; " call)*' if many else "call", "call": call}

    def auto_rules(self, functions: list[dict[str, Any]], *, many: bool) -> None:
        return None  # a call is JSON from the first character: no marker opens it


PARSERS: dict[str, ToolParser] = {p.name: p for p in (Hermes(), Llama3Json())}


def parser(name: str) -> ToolParser:
    """The parser of a tool-call format (llmray.chat.tool_format's names)."""
    return PARSERS[name]
