"""The chat rendering shared by the trainer (`chat` / `instruction` data) and the server.

A model is trained and served through one path: messages rendered by the tokenizer's own chat
template, or, when the tokenizer has none (e.g. the tiny test model, a base model), by
`DEFAULT_CHAT_TEMPLATE` below (ChatML, as SmolLM2 and Qwen use), which the trainer also stores
into the exported tokenizer so the server renders prompts exactly as training saw them.

Rendered example::

    <|im_start|>user
    What is 2+2?<|im_end|>
    <|im_start|>assistant
    4<|im_end|>

Tools. A chat with `tools` (OpenAI's `[{"type": "function", "function": {...}}]`) is rendered
by the tokenizer's template when that template renders tool calls in a format llmray can parse
back (`tool_format`), otherwise by `DEFAULT_CHAT_TEMPLATE`, whose tools section is the Hermes
/ Qwen 2.5 one (`template_for_tools`: the trainer and the server both follow that rule, so a
model fine-tuned on tool calls is served in the format it learnt)::

    <|im_start|>system
    You are a weather bot.

    # Tools

    You may call one or more functions to assist with the user query.

    You are provided with function signatures within <tools></tools> XML tags:
    <tools>
    {"type": "function", "function": {"name": "get_weather", ...}}
    </tools>

    For each function call, return a json object with function name and arguments [...]
    <tool_call>
    {"name": <function-name>, "arguments": <args-json-object>}
    </tool_call><|im_end|>
    <|im_start|>user
    Weather in Paris?<|im_end|>
    <|im_start|>assistant
    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call><|im_end|>
    <|im_start|>tool
    {"temperature": 18}<|im_end|>
    <|im_start|>assistant
    18 degrees.<|im_end|>

A chat without tools renders exactly as before tools existed (models trained then still match).
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

_TOOLS_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)

DEFAULT_CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{{- messages[0]['content'] + '\\n\\n' }}"
    "{%- endif %}"
    "{{- " + json.dumps(_TOOLS_HEADER) + " }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- " + json.dumps(_TOOLS_FOOTER) + " + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{% for message in messages %}"
    "{%- if tools and loop.first and message['role'] == 'system' %}"
    "{%- elif message['role'] == 'assistant' and message.get('tool_calls') %}"
    "{{- '<|im_start|>assistant\\n' + (message['content'] or '') }}"
    "{%- for call in message['tool_calls'] %}"
    "{%- set call = call['function'] if call.get('function') else call %}"
    "{%- if message['content'] or not loop.first %}{{- '\\n' }}{%- endif %}"
    "{{- '<tool_call>\\n{\"name\": \"' + call['name'] + '\", \"arguments\": ' }}"
    "{%- if call['arguments'] is string %}{{- call['arguments'] }}"
    "{%- else %}{{- call['arguments'] | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Tokens the default template relies on; added as special tokens when it is applied.
DEFAULT_CHAT_SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>"]
ROLES = ("system", "user", "assistant", "tool")

# Tool-call formats a chat template can render, by a marker only that format's templates
# carry, in the order they are tried (the server has a parser for each: llmray_serve.tools).
TOOL_FORMATS = {
    "hermes": ("<tool_call>",),  # Hermes, Qwen 2.5 / 3, SmolLM3, llmray's default template
    "llama3_json": ("<|python_tag|>", '"parameters": dictionary of argument name'),  # Llama 3.x
}
DEFAULT_TOOL_FORMAT = "hermes"  # DEFAULT_CHAT_TEMPLATE's


def tool_format(template: str | None) -> str | None:
    """The tool-call format a chat template renders (a key of TOOL_FORMATS), or None when it
    renders no tools or in a format llmray cannot parse back."""
    if not template or "tools" not in template:
        return None
    for name, markers in TOOL_FORMATS.items():
        if any(marker in template for marker in markers):
            return name
    return None


def template_for_tools(template: str | None) -> tuple[str, str]:
    """(chat template, tool-call format) for a chat with tools: the tokenizer's own template
    when it renders tools in a known format, else DEFAULT_CHAT_TEMPLATE and its format."""
    found = tool_format(template)
    if template and found:
        return template, found
    return DEFAULT_CHAT_TEMPLATE, DEFAULT_TOOL_FORMAT


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as chat templates take them: a tool call's `arguments` as an object (OpenAI
    sends it as a JSON string; templates print it with `tojson`), a missing content as ''."""
    out = []
    for message in messages:
        message = dict(message)
        if message.get("content") is None:
            message["content"] = ""
        calls = message.get("tool_calls")
        if calls:
            message["tool_calls"] = [_template_call(call) for call in calls]
        out.append(message)
    return out


def _template_call(call: dict[str, Any]) -> dict[str, Any]:
    function = dict(call.get("function") or call)
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        with contextlib.suppress(json.JSONDecodeError):  # else rendered as the model wrote it
            function["arguments"] = json.loads(arguments) if arguments.strip() else {}
    return {
        "type": "function",
        **{k: v for k, v in call.items() if k != "function"},
        "function": function,
    }


def instruction_to_messages(
    instruction: str, context: str = "", response: str | None = None
) -> list[dict[str, str]]:
    """An `instruction` record as chat messages: the context follows the instruction."""
    user = instruction if not context else f"{instruction}\n\n{context}"
    messages = [{"role": "user", "content": user}]
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages
