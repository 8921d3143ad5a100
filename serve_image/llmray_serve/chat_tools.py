"""What a chat request's tools, tool_choice and response_format ask of the model.

    plan = plan_chat(body, tool_format="hermes")
    plan.tools     # the tools the chat template renders (OpenAI's shape)
    plan.parser    # reads tool calls back out of the answer (None: the answer is text)
    plan.grammar   # constrains decoding (None: free), llguidance Lark (grammars.py)

tool_choice (OpenAI's default: `auto` with tools, `none` without):
- `none`: the model answers in text (the tools are still in the prompt, as OpenAI and vLLM
  do; nothing is parsed as a call);
- `auto`: the model chooses; calls it writes in its format become `tool_calls`. Where the
  format marks a call's start (hermes' `<tool_call>`), the grammar leaves text free and makes
  a call, once opened, a valid call of an offered function; with a response_format it allows
  either the formatted answer or calls;
- `required`: one or more calls (one with parallel_tool_calls false), enforced by the
  grammar; `{"type": "function", "function": {"name"}}`: exactly one call of that function;
- `allowed_tools`: auto or required over a subset of the tools.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmray_serve import grammars
from llmray_serve.grammars import ANY_OBJECT, GrammarError
from llmray_serve.protocol import AllowedToolsChoice, ChatCompletionRequest, NamedToolChoice
from llmray_serve.tool_parsers import ToolParser, parser


@dataclass(frozen=True)
class ChatPlan:
    tools: list[dict[str, Any]] | None = None
    parser: ToolParser | None = None
    names: set[str] = field(default_factory=set)  # functions a call may name
    grammar: str | None = None


def plan_chat(body: ChatCompletionRequest, tool_format: str) -> ChatPlan:
    """The plan of `body`; GrammarError (a 400 naming the field) for what cannot be done."""
    tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
    functions = {t["function"]["name"]: t["function"] for t in tools}
    choice = body.tool_choice or ("auto" if tools else "none")
    if isinstance(choice, AllowedToolsChoice):
        allowed = [_named(t, functions) for t in choice.allowed_tools.tools]
        functions = {name: functions[name] for name in allowed}
        choice = choice.allowed_tools.mode
    if not tools and choice in ("none", "auto"):
        return ChatPlan(grammar=_answer_grammar(body))
    if not tools:
        raise GrammarError("tool_choice", "tool_choice needs tools: the request has none")
    if choice == "none":
        return ChatPlan(tools=tools, grammar=_answer_grammar(body))
    calls = parser(tool_format)
    many = body.parallel_tool_calls is not False
    if isinstance(choice, NamedToolChoice):
        name = _named(choice, functions)
        rules = calls.calls_rule([functions[name]], many=False)
        return ChatPlan(tools, calls, {name}, _checked(rules, "tool_choice"))
    rules = calls.calls_rule(list(functions.values()), many=many)
    if choice == "required":
        return ChatPlan(tools, calls, set(functions), _checked(rules, "tools"))
    answer = _answer_rule(body)  # auto: an answer in the response format, or calls
    if answer is None:
        auto = calls.auto_rules(list(functions.values()), many=many)
        grammar = None if auto is None else _checked(auto, "tools")
        return ChatPlan(tools, calls, set(functions), grammar)
    either = {"either": "answer | calls", "answer": answer, **rules}
    return ChatPlan(tools, calls, set(functions), _checked(either, "response_format"))


def _named(choice: NamedToolChoice, functions: dict[str, Any]) -> str:
    name = choice.function.name
    if name not in functions:
        offered = ", ".join(sorted(functions)) or "none"
        raise GrammarError(
            "tool_choice", f"tool_choice names function {name!r}, which is not in tools ({offered})"
        )
    return name


def _answer_rule(body: ChatCompletionRequest) -> str | None:
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return grammars.json_item(ANY_OBJECT)
    assert fmt.json_schema is not None  # the protocol checked it
    return grammars.json_item(fmt.json_schema.schema_ or ANY_OBJECT)


def _answer_grammar(body: ChatCompletionRequest) -> str | None:
    answer = _answer_rule(body)
    return None if answer is None else _checked({"answer": answer}, "response_format")


def _checked(rules: dict[str, str], param: str) -> str:
    return grammars.check(grammars.grammar(rules), param)
