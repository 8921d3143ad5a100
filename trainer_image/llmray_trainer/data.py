"""Training data: load and validate records, render them, tokenize with loss masks, collate.

Formats (`spec.dataset.format`, one example a record):

- `instruction`: `{"instruction", "context" (optional), "response"}`, rendered as a chat
  (`llmray.chat.instruction_to_messages`) so training and serving share one prompt format.
- `text`: `{"input"}`, trained on as is (every token has a label).
- `chat`: `{"messages": [{"role": "system" | "user" | "assistant" | "tool", "content"}]}`, and
  for tool use, OpenAI's shapes: an optional `"tools": [{"type": "function", "function":
  {"name", "description", "parameters"}}]` beside the messages, assistant messages with
  `"tool_calls": [{"id", "type": "function", "function": {"name", "arguments"}}]` (content
  then optional), `tool` messages with the result (`"tool_call_id"` optional). A chat with
  tools renders as the server renders it (`llmray.chat.template_for_tools`).

A chat is tokenized piece by piece: for each turn we render the conversation up to it
(`messages[:i]`, plus the assistant generation prompt before an assistant turn) and tokenize
only what each render adds. With `maskPrompt`, the pieces an assistant turn adds (its content
and the end-of-turn marker the template emits, so the model learns to stop) carry labels;
the rest is -100. Tokenizing pieces separately means a mask never depends on BPE merges
across a boundary, and a response starts on a fresh token, as it does at generation time.

Everything here but `collate` / `count_tokens` is torch-free, so the driver validates data
in seconds before any worker starts.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from llmray.chat import (
    DEFAULT_CHAT_SPECIAL_TOKENS,
    DEFAULT_CHAT_TEMPLATE,
    ROLES,
    instruction_to_messages,
    template_for_tools,
    template_messages,
)

log = logging.getLogger(__name__)

FORMATS = ("instruction", "text", "chat")
IGNORE_INDEX = -100  # label of a token without loss (torch's cross_entropy ignore_index)
JSONL_SUFFIXES = (".jsonl", ".ndjson")
# The ChatML end-of-turn token of DEFAULT_CHAT_TEMPLATE: the tokenizer's eos once that
# template is installed, so generation stops where training taught the model to stop.
CHATML_END = "<|im_end|>"
_TOKENIZE_CHUNK = 1024  # records per batched tokenizer call


class DatasetError(ValueError):
    """A bad data file or record, e.g. `data/train.jsonl:17: missing field "response" ...`.

    `line` is the 1-based line of a JSON-lines file; `record` the 0-based index of a record
    of a .json or .parquet file (shown as `file[record]`). Either may be None.
    """

    def __init__(
        self, file: str | Path, line: int | None, reason: str, *, record: int | None = None
    ) -> None:
        self.file, self.line, self.record, self.reason = str(file), line, record, reason
        where = self.file
        if line is not None:
            where += f":{line}"
        elif record is not None:
            where += f"[{record}]"
        super().__init__(f"{where}: {reason}")


class TokenizedExamples(list):
    """`tokenize_records`' result: a list of examples, plus what was dropped or cut."""

    dropped: int = 0  # examples with no labelled token left after truncation
    truncated: int = 0  # examples cut to max_seq_length


# --- loading and validation ---


def load_records(path: Path, fmt: str, *, prompts: bool = False) -> list[dict[str, Any]]:
    """Every record of a .jsonl / .json / .parquet file, validated for `fmt`.

    `prompts`: records to generate from (`llmray batch`), whose answer is optional: an
    instruction record without "response", a chat without an assistant message.

    Raises DatasetError on the first bad record (naming file and line or record index), or
    when the file holds no records. A .json file is a list of objects, {"data": [...]}, or
    JSON lines (what `datasets.Dataset.to_json` writes by default).
    """
    _check_format(fmt)
    path = Path(path)
    if not path.is_file():
        raise DatasetError(path, None, "no such file")
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        located: Iterable[tuple[int | None, int | None, Any]] = _read_jsonl(path)
    elif suffix == ".json":
        located = _read_json(path)
    elif suffix == ".parquet":
        located = _read_parquet(path)
    else:
        raise DatasetError(
            path, None, f"unsupported file type {suffix or '(none)'}: use .jsonl, .json or .parquet"
        )
    records = []
    for line, index, obj in located:
        reason = validate_record(obj, fmt, prompts=prompts)
        if reason:
            raise DatasetError(path, line, reason, record=index)
        records.append(obj)
    if not records:
        raise DatasetError(path, None, f"no records (format {fmt})")
    return records


def _read_jsonl(path: Path) -> Iterator[tuple[int | None, int | None, Any]]:
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DatasetError(path, number, f"not UTF-8 text ({e.reason})") from None
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise DatasetError(
                    path, number, f"not valid JSON ({e.msg}: column {e.colno})"
                ) from None
            yield number, None, obj


def _read_json(path: Path) -> Iterator[tuple[int | None, int | None, Any]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError(path, None, f"not UTF-8 text ({e.reason})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON lines under a .json name
            yield from _read_jsonl(path)
            return
        raise DatasetError(path, e.lineno, f"not valid JSON ({e.msg}: column {e.colno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DatasetError(
            path, None, f'expected a JSON list of records or {{"data": [...]}}, got {_kind(data)}'
        )
    for index, obj in enumerate(data):
        yield None, index, obj


def _read_parquet(path: Path) -> Iterator[tuple[int | None, int | None, Any]]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a corrupt / non-parquet file
        raise DatasetError(path, None, f"not a readable Parquet file ({e})") from None
    for index, obj in enumerate(rows):
        yield None, index, obj


def validate_record(obj: Any, fmt: str, *, prompts: bool = False) -> str | None:
    """Why `obj` is not a valid `fmt` record, or None when it is (`prompts`: see
    `load_records`)."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {_kind(obj)} (format {fmt})"
    reason = _RECORD_CHECKS[fmt](obj)
    if prompts and reason in _ANSWER_MISSING:
        reason = None
    if reason is None:
        return None
    looks = _looks_like(obj)
    hint = f"; this record looks like format {looks}" if looks and looks != fmt else ""
    return f"{reason} (format {fmt}{hint})"


def _check_instruction(obj: dict[str, Any]) -> str | None:
    for field in ("instruction", "response"):
        reason = _string_field(obj, field, required=True)
        if reason:
            return reason
    return _string_field(obj, "context", required=False)


def _check_text(obj: dict[str, Any]) -> str | None:
    return _string_field(obj, "input", required=True)


def _check_chat(obj: dict[str, Any]) -> str | None:
    if "messages" not in obj:
        return 'missing field "messages"'
    messages = obj["messages"]
    if not isinstance(messages, list):
        return f'field "messages" must be a list, got {_kind(messages)}'
    if not messages:
        return 'field "messages" is empty'
    names, reason = _tool_names(obj.get("tools"))
    if reason:
        return reason
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"messages[{i}] must be an object, got {_kind(message)}"
        role = message.get("role")
        if role not in ROLES:
            shown = json.dumps(role) if "role" in message else "missing"
            return f"messages[{i}].role is {shown}: expected one of {', '.join(ROLES)}"
        calls = message.get("tool_calls")
        if calls is not None:
            if role != "assistant":
                return f"messages[{i}].tool_calls: only assistant messages make tool calls"
            reason = _check_tool_calls(calls, names, f"messages[{i}].tool_calls")
            if reason:
                return reason
        content = message.get("content")
        if not isinstance(content, str) and not (calls and content is None):
            return f"messages[{i}].content must be a string, got {_kind(content)}"
    if not any(m["role"] == "assistant" for m in messages):
        return _NO_ASSISTANT
    return None


def _tool_names(tools: Any) -> tuple[set[str] | None, str | None]:
    """The function names a record's `tools` declare (None: no tools field), or why not."""
    if tools is None:
        return None, None
    if not isinstance(tools, list):
        return None, f'field "tools" must be a list, got {_kind(tools)}'
    names = set()
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            return None, (
                f'tools[{i}] must be {{"type": "function", "function": {{"name": ..., '
                '"parameters": {...}}}'
            )
        names.add(function["name"])
    return names, None


def _check_tool_calls(calls: Any, names: set[str] | None, where: str) -> str | None:
    if not isinstance(calls, list) or not calls:
        return f"{where} must be a non-empty list, got {_kind(calls)}"
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            return (
                f'{where}[{j}] must be {{"type": "function", "function": {{"name", "arguments"}}}}'
            )
        if names is not None and function["name"] not in names:
            return (
                f"{where}[{j}].function.name {function['name']!r} is not one of the record's tools"
            )
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as e:
                return f"{where}[{j}].function.arguments is not valid JSON ({e.msg})"
        if not isinstance(arguments, dict):
            return f"{where}[{j}].function.arguments must be a JSON object, got {_kind(arguments)}"
    return None


# A record's reasons that only say its answer is missing: fine for a prompt.
_NO_ASSISTANT = "no assistant message: nothing to train on"
_ANSWER_MISSING = ('missing field "response"', _NO_ASSISTANT)
_RECORD_CHECKS = {"instruction": _check_instruction, "text": _check_text, "chat": _check_chat}


def _string_field(obj: dict[str, Any], field: str, *, required: bool) -> str | None:
    if field not in obj or (not required and obj[field] is None):
        return f'missing field "{field}"' if required else None
    value = obj[field]
    if not isinstance(value, str):
        return f'field "{field}" must be a string, got {_kind(value)}'
    if required and not value.strip():
        return f'field "{field}" is empty'
    return None


def _looks_like(obj: dict[str, Any]) -> str | None:
    for field, fmt in (("messages", "chat"), ("instruction", "instruction"), ("input", "text")):
        if field in obj:
            return fmt
    return None


def _kind(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean"}.get(
        type(value), "null" if value is None else type(value).__name__
    )


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown dataset format {fmt!r}: expected one of {', '.join(FORMATS)}")


def split_eval(
    records: list[dict[str, Any]], fraction: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, eval): a seeded random `fraction` held out; same seed, same split.

    At least one record is held out when fraction > 0 and there are two or more records,
    and at least one is kept for training. Both keep the input's order.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"evalFraction must be in [0, 1), got {fraction}")
    n = len(records)
    n_eval = min(max(round(n * fraction), 1), n - 1) if fraction > 0 and n >= 2 else 0
    held = set(random.Random(seed).sample(range(n), n_eval))
    train = [r for i, r in enumerate(records) if i not in held]
    return train, [r for i, r in enumerate(records) if i in held]


# --- tokenizer ---


def prepare_tokenizer(tokenizer: Any, fmt: str, special_tokens: list[str]) -> int:
    """Make `tokenizer` ready for `fmt`; returns how many tokens were added to its vocabulary.

    Adds `special_tokens` as extra special tokens (never split, e.g. <ASSISTANT>). For the
    instruction and chat formats, a tokenizer without a chat template (a base model, the test
    model) gets llmray's ChatML `DEFAULT_CHAT_TEMPLATE` with its tokens, and <|im_end|>
    becomes its eos so that generation stops at the end of a turn; the exported tokenizer
    carries both to the server. A missing pad token becomes the eos token. The caller
    resizes the model's embeddings when the result is > 0.
    """
    _check_format(fmt)
    added = 0
    pad_fallback = tokenizer.eos_token
    if fmt in ("instruction", "chat") and not tokenizer.chat_template:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        added += tokenizer.add_special_tokens(
            {"extra_special_tokens": list(DEFAULT_CHAT_SPECIAL_TOKENS)},
            replace_extra_special_tokens=False,
        )
        tokenizer.eos_token = CHATML_END
    new = [t for t in dict.fromkeys(special_tokens) if t not in tokenizer.all_special_tokens]
    if new:
        added += tokenizer.add_special_tokens(
            {"extra_special_tokens": new}, replace_extra_special_tokens=False
        )
    if tokenizer.pad_token is None:
        if pad_fallback or tokenizer.eos_token:
            tokenizer.pad_token = pad_fallback or tokenizer.eos_token
        else:
            added += tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    return added


# --- tokenization ---


def tokenize_records(
    records: list[dict[str, Any]],
    tokenizer: Any,
    fmt: str,
    max_seq_length: int,
    mask_prompt: bool,
) -> TokenizedExamples:
    """`{"input_ids", "labels"}` per record (labels -100 where there is no loss).

    Examples longer than `max_seq_length` are cut; examples left with no labelled token
    (a prompt longer than `max_seq_length`) are dropped and counted in `.dropped`.
    `mask_prompt` applies to the instruction and chat formats; text trains on every token.
    """
    _check_format(fmt)
    out = TokenizedExamples()
    for start in range(0, len(records), _TOKENIZE_CHUNK):
        chunk = records[start : start + _TOKENIZE_CHUNK]
        if fmt == "text":
            examples = _tokenize_text(chunk, tokenizer)
        else:
            examples = _tokenize_chats(chunk, start, tokenizer, fmt, mask_prompt)
        for ids, labels in examples:
            if len(ids) > max_seq_length:
                out.truncated += 1
                ids, labels = ids[:max_seq_length], labels[:max_seq_length]
            if all(label == IGNORE_INDEX for label in labels):
                out.dropped += 1
                continue
            out.append({"input_ids": ids, "labels": labels})
    if out.dropped:
        log.warning(
            "dropped %d of %d examples with no response token within maxSeqLength %d",
            out.dropped,
            len(records),
            max_seq_length,
        )
    if out.truncated:
        log.info(
            "truncated %d of %d examples to %d tokens", out.truncated, len(records), max_seq_length
        )
    return out


def _tokenize_text(records: list[dict[str, Any]], tokenizer: Any) -> list[tuple[list, list]]:
    encoded = tokenizer([r["input"] for r in records], add_special_tokens=True)["input_ids"]
    eos = tokenizer.eos_token_id
    examples = []
    for ids in encoded:
        ids = list(ids)
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)  # so the model learns where a document ends
        examples.append((ids, list(ids)))
    return examples


def _tokenize_chats(
    records: list[dict[str, Any]], offset: int, tokenizer: Any, fmt: str, mask_prompt: bool
) -> list[tuple[list, list]]:
    segmented = []
    for i, record in enumerate(records):
        messages = record_messages(record, fmt)
        try:
            segmented.append(chat_segments(tokenizer, messages, record_tools(record)))
        except Exception as e:  # a template's own error (jinja raise_exception, a bad prefix)
            raise ValueError(f"record {offset + i}: cannot render the chat: {e}") from e
    texts = [text for segments in segmented for text, _ in segments]
    pieces = iter(tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else iter(())
    examples = []
    for segments in segmented:
        ids: list[int] = []
        labels: list[int] = []
        for _, trained in segments:
            piece = list(next(pieces))
            ids += piece
            labels += piece if trained or not mask_prompt else [IGNORE_INDEX] * len(piece)
        examples.append((ids, labels))
    return examples


def record_messages(record: dict[str, Any], fmt: str) -> list[dict[str, Any]]:
    """A validated instruction or chat record as `{"role", "content"}` messages (plus an
    assistant message's `tool_calls` and a tool message's `tool_call_id`)."""
    if fmt == "instruction":
        return instruction_to_messages(
            record["instruction"], record.get("context") or "", record["response"]
        )
    keep = ("role", "content", "tool_calls", "tool_call_id")
    return [{k: m[k] for k in keep if k in m} for m in record["messages"]]


def record_tools(record: dict[str, Any]) -> list[dict[str, Any]] | None:
    """A chat record's tools (None without)."""
    return record.get("tools") or None


def chat_segments(
    tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
) -> list[tuple[str, bool]]:
    """The rendered chat as consecutive (text, trained) pieces; trained = an assistant turn
    (its tool calls included: a model learns to call tools as it learns to answer).

    An assistant piece is what rendering the turn adds after the generation prompt: its
    content and end-of-turn marker. Whitespace the template emits after the marker belongs to
    the next piece (the model need not learn it: generation stopped at the marker). A chat
    with tools or tool calls renders with the template the server uses for tools.
    """
    uses_tools = bool(tools) or any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
    template = None
    if uses_tools:
        template = template_for_tools(tokenizer.get_chat_template(tools=tools or []))[0]
    messages = template_messages(messages)

    def render(upto: int, generation_prompt: bool = False) -> str:
        if upto == 0 and not generation_prompt:
            return ""
        return tokenizer.apply_chat_template(
            messages[:upto],
            tools=tools,
            chat_template=template,
            tokenize=False,
            add_generation_prompt=generation_prompt,
        )

    segments: list[tuple[str, bool]] = []
    pending, done = "", ""  # untrained text not yet emitted; everything rendered so far
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            prompt = render(i, generation_prompt=True)
            pending += _suffix(done, prompt, i)
            done = prompt
        full = render(i + 1)
        added = _suffix(done, full, i)
        done = full
        if message["role"] != "assistant":
            pending += added
            continue
        body = added.rstrip()
        if pending:
            segments.append((pending, False))
        segments.append((body, True))
        pending = added[len(body) :]
    if pending:
        segments.append((pending, False))
    return segments


def _suffix(before: str, after: str, index: int) -> str:
    if not after.startswith(before):
        raise ValueError(
            f"the chat template renders messages[:{index}] differently once more messages "
            "follow, so turns cannot be told apart; use a template whose renders of a "
            "conversation extend its shorter prefixes"
        )
    return after[len(before) :]


# --- batches ---


def collate(batch: list[dict[str, list[int]]], pad_id: int) -> dict[str, Any]:
    """Right-padded `input_ids` (pad_id), `attention_mask` and `labels` (-100) tensors."""
    import torch

    width = max(len(example["input_ids"]) for example in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, example in enumerate(batch):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.tensor(example["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.tensor(example["labels"], dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def count_tokens(batch: dict[str, Any]) -> int:
    """Real (non-padding) tokens in a collated batch, for tokens/s."""
    return int(batch["attention_mask"].sum())
