"""Tool-call parsers and grammars: any split of the model's text into stream pieces gives the
calls the whole text gives; the grammars compile and accept exactly the format they parse."""

from __future__ import annotations

import json

import pytest

from llmray.chat import DEFAULT_CHAT_TEMPLATE, template_for_tools, tool_format
from llmray_serve import grammars
from llmray_serve.tool_parsers import Call, Content, parser

NAMES = {"get_weather", "get_time"}
HERMES_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
CASES = {
    "hermes": [
        ("plain text, no call", [Content("plain text, no call")]),
        (HERMES_CALL, [Call("get_weather", '{"city": "Paris"}')]),
        (
            "Checking. " + HERMES_CALL + "\n" + HERMES_CALL.replace("Paris", "Oslo"),
            [
                Content("Checking."),
                Call("get_weather", '{"city": "Paris"}'),
                Call("get_weather", '{"city": "Oslo"}'),
            ],
        ),
        # unclosed at the end (the model stopped right after the JSON): still a call
        (HERMES_CALL.removesuffix("\n</tool_call>"), [Call("get_weather", '{"city": "Paris"}')]),
        # arguments written as a JSON string, "parameters" for "arguments"
        (
            '<tool_call>{"name": "get_time", "parameters": "{\\"tz\\": \\"UTC\\"}"}</tool_call>',
            [Call("get_time", '{"tz": "UTC"}')],
        ),
        ("<tool_call>\nnot json\n</tool_call>", [Content("<tool_call>\nnot json\n</tool_call>")]),
        ("a < b and <tool", [Content("a < b and <tool")]),
    ],
    "llama3_json": [
        ('{"name": "get_time", "parameters": {}}', [Call("get_time", "{}")]),
        (
            '{"name": "get_time", "parameters": {}}; {"name": "get_weather", "parameters": '
            '{"city": "Oslo"}}',
            [Call("get_time", "{}"), Call("get_weather", '{"city": "Oslo"}')],
        ),
        (
            '{"name": "unknown", "parameters": {}}',
            [Content('{"name": "unknown", "parameters": {}}')],
        ),
        ("It is sunny.", [Content("It is sunny.")]),
    ],
}


def parse(name: str, pieces: list[str]) -> list:
    stream = parser(name).stream(NAMES)
    events = [e for piece in pieces for e in stream.feed(piece)] + stream.finish()
    merged: list = []
    for e in events:  # content may come in several pieces
        if merged and isinstance(e, Content) and isinstance(merged[-1], Content):
            merged[-1] = Content(merged[-1].text + e.text)
        else:
            merged.append(e)
    return merged


@pytest.mark.parametrize(
    ("name", "text", "expected"), [(n, t, e) for n, cases in CASES.items() for t, e in cases]
)
def test_every_split_of_the_text_parses_as_the_whole(name, text, expected) -> None:
    assert parse(name, [text]) == expected
    for at in range(1, len(text)):
        assert parse(name, [text[:at], text[at:]]) == expected, at
    assert parse(name, list(text)) == expected  # a character at a time


def test_text_that_may_start_a_call_waits_and_the_rest_streams_at_once() -> None:
    stream = parser("hermes").stream(NAMES)
    assert stream.feed("Hello <tool") == [Content("Hello")]
    assert stream.feed("box> world") == [Content(" <toolbox> world")]


FUNCTIONS = [
    {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris"]}},
            "required": ["city"],
        },
    },
    {"name": "get_time"},
]


@pytest.mark.parametrize("name", ["hermes", "llama3_json"])
def test_the_forced_grammar_matches_what_the_parser_reads(name, tiny_model) -> None:
    """Walk the grammar with llguidance over the text of two calls, token by token."""
    import llguidance
    import llguidance.hf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    ll = llguidance.hf.from_tokenizer(tokenizer)
    rules = parser(name).calls_rule(FUNCTIONS, many=True)
    grammar = grammars.check(grammars.grammar(rules), "tools")
    if name == "hermes":
        text = HERMES_CALL.replace("get_weather", "get_weather") + "\n<tool_call>\n"
        text += '{"name": "get_time", "arguments": {}}\n</tool_call>'
    else:
        text = '{"name": "get_weather", "parameters": {"city": "Paris"}}; '
        text += '{"name": "get_time", "parameters": {}}'
    matcher = llguidance.LLMatcher(ll, grammar)
    assert matcher.consume_tokens(ll.tokenize_str(text)), matcher.get_error()
    assert matcher.is_accepting()
    assert [e.name for e in parse(name, [text]) if isinstance(e, Call)] == [
        "get_weather",
        "get_time",
    ]
    # A property the schema does not list is refused (objects are closed).
    extra = text.replace('"Paris"}', '"Paris", "x": 1}')
    refused = llguidance.LLMatcher(ll, grammar)
    assert not refused.consume_tokens(ll.tokenize_str(extra))


def test_closed_adds_additional_properties_false_only_where_unsaid() -> None:
    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "object", "properties": {}},
            "b": {"type": "array", "items": {"type": "object", "properties": {"c": {}}}},
        },
        "$defs": {"d": {"type": "object", "properties": {}, "additionalProperties": True}},
    }
    closed = grammars.closed(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["a"]["additionalProperties"] is False
    assert closed["properties"]["b"]["items"]["additionalProperties"] is False
    assert closed["$defs"]["d"]["additionalProperties"] is True
    assert "additionalProperties" not in schema  # the caller's copy is untouched
    assert json.loads(grammars.json_item(schema).removeprefix("%json"))["x-guidance"] == (
        grammars.JSON_OPTIONS
    )


def test_template_detection_picks_the_parser_of_the_format() -> None:
    assert tool_format(DEFAULT_CHAT_TEMPLATE) == "hermes"
    qwen = "{% if tools %}<tools>{% endif %}<tool_call>\n{{ name }}</tool_call>"
    assert tool_format(qwen) == "hermes"
    llama = '{% if tools %}{"name": function name, "parameters": dictionary of argument name'
    assert tool_format(llama + "}{% endif %}") == "llama3_json"
    smollm2 = "{% for m in messages %}<|im_start|>{{ m.content }}{% endfor %}"
    assert tool_format(smollm2) is None
    # A template that renders no tools: tool chats use llmray's default (and its format).
    assert template_for_tools(smollm2) == (DEFAULT_CHAT_TEMPLATE, "hermes")
    assert template_for_tools(qwen) == (qwen, "hermes")


def test_auto_leaves_text_free_and_an_opened_call_must_be_valid(tiny_model) -> None:
    import llguidance
    import llguidance.hf
    from transformers import AutoTokenizer

    ll = llguidance.hf.from_tokenizer(AutoTokenizer.from_pretrained(tiny_model))
    rules = parser("hermes").auto_rules(FUNCTIONS, many=True)
    grammar = grammars.check(grammars.grammar(rules), "tools")

    def accepts(text: str) -> bool:
        matcher = llguidance.LLMatcher(ll, grammar, log_level=0)
        return matcher.consume_tokens(ll.tokenize_str(text)) and matcher.is_accepting()

    assert accepts("Any text at all, a < b, <tool and <tools>.")
    assert accepts("Let me check. " + HERMES_CALL + "\n" + HERMES_CALL)
    assert not accepts("<tool_call>\nnot a call")
    assert not accepts(HERMES_CALL.replace("get_weather", "rm_rf"))
    assert parser("llama3_json").auto_rules(FUNCTIONS, many=True) is None
