"""The trainer's dataset module: loading, validation, tokenizer setup, loss masks, batches.

A tiny byte-level BPE tokenizer is trained here on the sample data (no hub download).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from llmray.chat import DEFAULT_CHAT_SPECIAL_TOKENS, instruction_to_messages
from llmray_trainer.data import (
    IGNORE_INDEX,
    DatasetError,
    collate,
    count_tokens,
    load_records,
    prepare_tokenizer,
    split_eval,
    tokenize_records,
)

DATA = Path(__file__).resolve().parent.parent / "examples" / "data"
SAMPLES = [
    ("instruction.jsonl", "instruction", 200),
    ("instruction_eval.jsonl", "instruction", 20),
    ("text.jsonl", "text", 100),
    ("chat.jsonl", "chat", 100),
]
TEXT_TOKENS = ["<USER>", "</USER>", "<ASSISTANT>", "</ASSISTANT>"]
EOS = "<|endoftext|>"
CHAT = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "What is 12 + 7?"},
    {"role": "assistant", "content": "12 + 7 = 19."},
    {"role": "user", "content": "And what is that times 2?"},
    {"role": "assistant", "content": "19 x 2 = 38."},
]


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}
TOOL_CHAT = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 18}'},
    {"role": "assistant", "content": "It is 18 degrees in Paris."},
]
# A tool chat as one JSON line, with one thing to break per bad-record case below.
TOOL_BAD = json.dumps({"messages": TOOL_CHAT, "tools": TOOLS})


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer (vocab ~500, no chat template) trained on the samples."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    for name, _, _ in SAMPLES:
        for line in (DATA / name).read_text(encoding="utf-8").splitlines():
            texts.extend(s for s in _strings(json.loads(line)))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(texts, trainer)
    folder = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS).save_pretrained(folder)
    return folder


@pytest.fixture
def tokenizer(tokenizer_dir: Path) -> Any:
    """A fresh copy per test: prepare_tokenizer mutates it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def labelled_spans(example: dict[str, list[int]]) -> list[list[int]]:
    """The runs of consecutive labelled tokens; labels equal input_ids inside each."""
    spans: list[list[int]] = []
    previous = IGNORE_INDEX
    for token, label in zip(example["input_ids"], example["labels"], strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            if previous == IGNORE_INDEX:
                spans.append([])
            spans[-1].append(token)
        previous = label
    return spans


# --- loading ---


@pytest.mark.parametrize(("name", "fmt", "count"), SAMPLES)
def test_sample_files_load_and_tokenize(tokenizer: Any, name: str, fmt: str, count: int) -> None:
    records = load_records(DATA / name, fmt)
    assert len(records) == count
    prepare_tokenizer(tokenizer, fmt, TEXT_TOKENS if fmt == "text" else [])
    examples = tokenize_records(records, tokenizer, fmt, 512, mask_prompt=True)
    assert len(examples) == count and examples.dropped == 0
    assert all(len(e["input_ids"]) == len(e["labels"]) <= 512 for e in examples)


def test_sample_instructions_share_one_style() -> None:
    """The demo's before / after relies on a style a few steps can teach."""
    for name in ("instruction.jsonl", "instruction_eval.jsonl"):
        for record in load_records(DATA / name, "instruction"):
            assert record["response"].startswith("Ray here! ")
            assert record["response"].endswith("\n\nHappy to help!")
    train, held = (
        {(r["instruction"], r.get("context")) for r in load_records(DATA / name, "instruction")}
        for name in ("instruction.jsonl", "instruction_eval.jsonl")
    )
    assert not train & held


def test_json_list_and_data_object(tmp_path: Path) -> None:
    rows = [{"input": "one"}, {"input": "two"}]
    (tmp_path / "list.json").write_text(json.dumps(rows))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": rows}))
    assert load_records(tmp_path / "list.json", "text") == rows
    assert load_records(tmp_path / "wrapped.json", "text") == rows


def test_json_lines_under_a_json_name(tmp_path: Path) -> None:
    """datasets.Dataset.to_json writes JSON lines to a .json file by default."""
    path = write_jsonl(tmp_path / "train.json", [{"input": "one"}, {"input": "two"}])
    assert [r["input"] for r in load_records(path, "text")] == ["one", "two"]


def test_json_bad_record_names_its_index(tmp_path: Path) -> None:
    (tmp_path / "train.json").write_text(json.dumps([{"input": "ok"}, {"text": "wrong"}]))
    with pytest.raises(DatasetError) as info:
        load_records(tmp_path / "train.json", "text")
    assert info.value.record == 1 and info.value.line is None
    assert str(info.value) == f'{tmp_path / "train.json"}[1]: missing field "input" (format text)'


def test_parquet_chat_records(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist([{"messages": CHAT}, {"messages": CHAT[1:3]}]), path)
    records = load_records(path, "chat")
    assert records[0]["messages"] == CHAT and len(records) == 2


def test_parquet_bad_record_names_its_index(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    rows = [{"instruction": "a", "response": "b"}, {"instruction": "c", "response": None}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DatasetError, match=r"train\.parquet\[1\]: field \"response\" must be"):
        load_records(path, "instruction")


GOOD = {"instruction": "What is 2 + 2?", "response": "4"}
GOOD_CHAT = {"messages": CHAT}


@pytest.mark.parametrize(
    ("fmt", "bad_line", "reason"),
    [
        ("instruction", '{"instruction": "x", "response": ', "not valid JSON"),
        ("instruction", '["instruction", "response"]', "expected a JSON object, got list"),
        ("instruction", '{"instruction": "x"}', 'missing field "response" (format instruction)'),
        ("instruction", '{"instruction": "x", "response": 4}', '"response" must be a string'),
        ("instruction", '{"instruction": "x", "response": "  "}', 'field "response" is empty'),
        ("instruction", '{"instruction": "x", "context": 3, "response": "y"}', '"context" must'),
        ("instruction", '{"messages": []}', "looks like format chat"),
        ("text", '{"text": "hello"}', 'missing field "input" (format text)'),
        ("chat", '{"messages": []}', 'field "messages" is empty'),
        ("chat", '{"messages": "hi"}', 'field "messages" must be a list'),
        ("chat", '{"messages": [{"role": "bot", "content": "hi"}]}', 'messages[0].role is "bot"'),
        ("chat", '{"messages": [{"content": "hi"}]}', "messages[0].role is missing"),
        ("chat", '{"messages": [{"role": "user", "content": null}]}', "content must be a string"),
        ("chat", '{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
        ("chat", '{"messages": ["hi"]}', "messages[0] must be an object"),
        ("chat", '{"messages": [], "tools": {}}', 'field "messages" is empty'),
        ("chat", TOOL_BAD.replace('"tools": [', '"tools": [3, '), 'tools[0] must be {"type"'),
        (
            "chat",
            TOOL_BAD.replace('"get_weather", "arguments"', '"get_time", "arguments"'),
            "'get_time' is not one of",
        ),
        ("chat", TOOL_BAD.replace('{\\"city', '{\\"city\\"'), "arguments is not valid JSON"),
        ("chat", TOOL_BAD.replace('"tool_calls": [', '"tool_calls": [4, '), "tool_calls[0] must"),
        (
            "chat",
            TOOL_BAD.replace('"role": "assistant", "content": null', '"role": "user"'),
            "only assistant messages make tool calls",
        ),
        ("chat", TOOL_BAD.replace('"role": "tool"', '"role": "function"'), 'role is "function"'),
    ],
)
def test_bad_record_names_file_and_line(
    tmp_path: Path, fmt: str, bad_line: str, reason: str
) -> None:
    good = json.dumps(GOOD_CHAT if fmt == "chat" else {"input": "x"} if fmt == "text" else GOOD)
    path = tmp_path / "train.jsonl"
    # Line 3 is blank: skipped, but still counted.
    path.write_text(f"{good}\n{good}\n\n{bad_line}\n{good}\n", encoding="utf-8")
    with pytest.raises(DatasetError) as info:
        load_records(path, fmt)
    assert info.value.file == str(path) and info.value.line == 4
    assert str(info.value).startswith(f"{path}:4: ")
    assert reason in str(info.value)


def test_not_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"input": "ok"}\n{"input": "caf\xe9"}\n')
    with pytest.raises(DatasetError, match=r"train\.jsonl:2: not UTF-8"):
        load_records(path, "text")


@pytest.mark.parametrize("content", ["", "\n  \n\n"])
def test_empty_file_is_an_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(content)
    with pytest.raises(DatasetError, match=r"train\.jsonl: no records \(format text\)"):
        load_records(path, "text")


def test_missing_file_and_unknown_type(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such file"):
        load_records(tmp_path / "absent.jsonl", "text")
    (tmp_path / "train.csv").write_text("input\nhello\n")
    with pytest.raises(DatasetError, match=r"unsupported file type \.csv"):
        load_records(tmp_path / "train.csv", "text")
    with pytest.raises(ValueError, match="unknown dataset format 'alpaca'"):
        load_records(DATA / "text.jsonl", "alpaca")


# --- eval split ---


def test_split_eval_is_deterministic() -> None:
    records = [{"input": str(i)} for i in range(100)]
    train, held = split_eval(records, 0.1, seed=42)
    assert len(held) == 10 and len(train) == 90
    assert (train, held) == split_eval(records, 0.1, seed=42)
    assert held != split_eval(records, 0.1, seed=43)[1]
    assert sorted(train + held, key=lambda r: int(r["input"])) == records
    assert train == [r for r in records if r in train]  # input order kept


@pytest.mark.parametrize(
    ("n", "fraction", "expected_eval"), [(2, 0.01, 1), (10, 0.01, 1), (1, 0.5, 0), (3, 0.99, 2)]
)
def test_split_eval_sizes(n: int, fraction: float, expected_eval: int) -> None:
    train, held = split_eval([{"input": str(i)} for i in range(n)], fraction, seed=0)
    assert len(held) == expected_eval and len(train) == n - expected_eval


# --- tokenizer setup ---


def test_prepare_tokenizer_for_chat_adds_chatml(tokenizer: Any) -> None:
    before = len(tokenizer)
    added = prepare_tokenizer(tokenizer, "chat", ["<TOOL>"])
    assert added == 3 == len(tokenizer) - before
    assert tokenizer.chat_template is not None
    assert tokenizer.eos_token == "<|im_end|>"  # generation stops at the end of a turn
    assert tokenizer.pad_token == EOS
    for token in [*DEFAULT_CHAT_SPECIAL_TOKENS, "<TOOL>"]:
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1
    assert prepare_tokenizer(tokenizer, "chat", ["<TOOL>"]) == 0  # idempotent


def test_prepare_tokenizer_for_text_adds_special_tokens_only(tokenizer: Any) -> None:
    before = len(tokenizer)
    assert prepare_tokenizer(tokenizer, "text", TEXT_TOKENS) == 4 == len(tokenizer) - before
    assert tokenizer.chat_template is None and tokenizer.eos_token == EOS
    ids = tokenizer("<USER>hi</USER>", add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<USER>")
    assert ids[-1] == tokenizer.convert_tokens_to_ids("</USER>")


def test_prepare_tokenizer_keeps_an_existing_template(tokenizer: Any) -> None:
    tokenizer.chat_template = LLAMA2_STYLE
    assert prepare_tokenizer(tokenizer, "instruction", []) == 0
    assert tokenizer.chat_template == LLAMA2_STYLE and tokenizer.eos_token == EOS


# --- tokenization and masks ---


def test_instruction_labels_only_the_response_and_end_marker(tokenizer: Any) -> None:
    prepare_tokenizer(tokenizer, "instruction", [])
    record = {"instruction": "Sort these words.", "context": "pear, fig", "response": "fig, pear"}
    (example,) = tokenize_records([record], tokenizer, "instruction", 512, mask_prompt=True)
    spans = labelled_spans(example)
    assert [tokenizer.decode(s) for s in spans] == ["fig, pear<|im_end|>"]
    # The prompt tokens are exactly what the server feeds the model for this instruction.
    messages = instruction_to_messages(record["instruction"], record["context"])
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert example["input_ids"][: len(prompt_ids)] == prompt_ids
    assert example["labels"][: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    full = tokenizer.apply_chat_template(
        instruction_to_messages(record["instruction"], record["context"], record["response"]),
        tokenize=False,
    )
    assert tokenizer.decode(example["input_ids"]) == full


def test_chat_labels_every_assistant_turn(tokenizer: Any) -> None:
    prepare_tokenizer(tokenizer, "chat", [])
    (example,) = tokenize_records([{"messages": CHAT}], tokenizer, "chat", 512, mask_prompt=True)
    assert [tokenizer.decode(s) for s in labelled_spans(example)] == [
        "12 + 7 = 19.<|im_end|>",
        "19 x 2 = 38.<|im_end|>",
    ]
    assert tokenizer.decode(example["input_ids"]) == tokenizer.apply_chat_template(
        CHAT, tokenize=False
    )


def test_without_mask_prompt_every_token_is_labelled(tokenizer: Any) -> None:
    prepare_tokenizer(tokenizer, "chat", [])
    masked, unmasked = (
        tokenize_records([{"messages": CHAT}], tokenizer, "chat", 512, mask_prompt=mask)[0]
        for mask in (True, False)
    )
    assert unmasked["input_ids"] == masked["input_ids"] == unmasked["labels"]


def test_a_tool_chat_trains_the_calls_and_the_answer_not_the_results(tokenizer: Any) -> None:
    prepare_tokenizer(tokenizer, "chat", [])
    record = {"messages": TOOL_CHAT, "tools": TOOLS}
    (example,) = tokenize_records([record], tokenizer, "chat", 1024, mask_prompt=True)
    assert [tokenizer.decode(s) for s in labelled_spans(example)] == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
        "<|im_end|>",
        "It is 18 degrees in Paris.<|im_end|>",
    ]
    # The whole text is what the server renders for this chat with these tools.
    rendered = tokenizer.decode(example["input_ids"])
    assert rendered.startswith("<|im_start|>system\n# Tools\n")
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in rendered
    assert '<|im_start|>tool\n{"temperature": 18}<|im_end|>' in rendered


def test_tool_calls_load_from_jsonl_with_object_or_string_arguments(tmp_path: Path) -> None:
    as_object = json.loads(TOOL_BAD)
    as_object["messages"][1]["tool_calls"][0]["function"]["arguments"] = {"city": "Paris"}
    path = tmp_path / "tools.jsonl"
    path.write_text(TOOL_BAD + "\n" + json.dumps(as_object) + "\n", encoding="utf-8")
    assert len(load_records(path, "chat")) == 2


def test_a_model_template_without_tools_renders_tool_chats_with_the_default(
    tokenizer: Any,
) -> None:
    """A tokenizer whose own template ignores tools (SmolLM2's): tool chats take llmray's
    default template, which the server also uses for them; plain chats keep the model's."""
    tokenizer.chat_template = LLAMA2_STYLE
    prepare_tokenizer(tokenizer, "chat", [])
    tokenizer.add_special_tokens({"extra_special_tokens": DEFAULT_CHAT_SPECIAL_TOKENS})
    record = {"messages": TOOL_CHAT, "tools": TOOLS}
    (example,) = tokenize_records([record], tokenizer, "chat", 1024, mask_prompt=True)
    assert "[INST]" not in tokenizer.decode(example["input_ids"])
    assert tokenizer.decode(labelled_spans(example)[0]).startswith("<tool_call>\n{")


LLAMA2_STYLE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)


def test_a_models_own_template_is_masked_the_same_way(tokenizer: Any) -> None:
    tokenizer.chat_template = LLAMA2_STYLE
    prepare_tokenizer(tokenizer, "chat", [])
    (example,) = tokenize_records([{"messages": CHAT}], tokenizer, "chat", 512, mask_prompt=True)
    assert [tokenizer.decode(s) for s in labelled_spans(example)] == [
        " 12 + 7 = 19." + EOS,
        " 19 x 2 = 38." + EOS,
    ]


def test_a_template_that_rewrites_earlier_turns_is_refused(tokenizer: Any) -> None:
    tokenizer.chat_template = "{{ messages | length }}" + LLAMA2_STYLE
    with pytest.raises(ValueError, match=r"record 0: cannot render the chat: .*differently"):
        tokenize_records([{"messages": CHAT}], tokenizer, "chat", 512, mask_prompt=True)


def test_text_labels_everything_and_ends_with_eos(tokenizer: Any) -> None:
    prepare_tokenizer(tokenizer, "text", TEXT_TOKENS)
    text = "<USER>What is 2 + 2?</USER><ASSISTANT>4</ASSISTANT>"
    (example,) = tokenize_records([{"input": text}], tokenizer, "text", 512, mask_prompt=True)
    assert example["labels"] == example["input_ids"]
    assert example["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(example["input_ids"]) == text + EOS
    user = tokenizer.convert_tokens_to_ids("<USER>")
    assert example["input_ids"][0] == user


def test_truncation_and_dropped_examples(tokenizer: Any, caplog: pytest.LogCaptureFixture) -> None:
    prepare_tokenizer(tokenizer, "instruction", [])
    short = {"instruction": "Hi", "response": "Hello there, how are you today?"}
    long_prompt = {"instruction": "word " * 200, "response": "ok"}
    (full,) = tokenize_records([short], tokenizer, "instruction", 512, mask_prompt=True)
    limit = len(full["input_ids"]) - 3
    with caplog.at_level(logging.WARNING, logger="llmray_trainer.data"):
        examples = tokenize_records([short, long_prompt], tokenizer, "instruction", limit, True)
    assert examples.dropped == 1 and examples.truncated == 2 and len(examples) == 1
    assert examples[0]["input_ids"] == full["input_ids"][:limit]
    assert examples[0]["labels"] == full["labels"][:limit]
    assert "dropped 1 of 2 examples" in caplog.text


# --- batches ---


def test_collate_pads_right_and_counts_tokens() -> None:
    import torch

    batch = collate(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}],
        pad_id=0,
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())
    assert count_tokens(batch) == 4
