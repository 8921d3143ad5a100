"""`llmray batch` input errors (unit tier: they come before Ray starts or a model loads)."""

from __future__ import annotations

import yaml

from llmray_cli.main import main

JOB = {
    "apiVersion": "llmray.io/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "repeat"},
    "spec": {"baseModel": {"uri": "models/tiny"}, "dataset": {"train": "train.jsonl"}},
}


def test_a_malformed_line_fails_naming_file_and_line(tmp_path, capsys):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(JOB))
    source = tmp_path / "in.jsonl"
    source.write_text(
        '{"instruction": "Repeat: a"}\n'
        '{"instruction": "Repeat: b", "response": "b"}\n'
        '{"instruction": 3}\n'
    )
    out = tmp_path / "out.jsonl"
    assert main(["batch", str(job), "--input", str(source), "--output", str(out)]) == 2
    assert capsys.readouterr().err == (
        f'error: {source}:3: field "instruction" must be a string, got int (format instruction)\n'
    )
    assert not out.exists()


def test_a_chat_line_without_messages_fails(tmp_path, capsys):
    dep = tmp_path / "dep.yaml"
    spec = {"model": {"uri": str(tmp_path / "model")}}
    dep.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "llmray.io/v1alpha1",
                "kind": "LLMDeployment",
                "metadata": {"name": "d"},
                "spec": spec,
            }
        )
    )
    source = tmp_path / "in.jsonl"
    source.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"nope": 1}\n')
    argv = ["batch", str(dep), "--input", str(source), "--output", str(tmp_path / "o.jsonl")]
    assert main([*argv, "--format", "chat"]) == 2
    assert f'{source}:2: missing field "messages"' in capsys.readouterr().err


def test_prompts_render_as_training_does_and_the_answer_is_the_reference():
    from llmray_trainer.batch import prompt_messages

    messages, reference = prompt_messages(
        {"instruction": "Translate.", "context": "Bonjour", "response": "Hello"}, "instruction"
    )
    assert messages == [{"role": "user", "content": "Translate.\n\nBonjour"}]
    assert reference == "Hello"
    chat = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
        ]
    }
    messages, reference = prompt_messages(chat, "chat")
    assert [m["role"] for m in messages] == ["system", "user"] and reference == "4"
    assert prompt_messages({"messages": chat["messages"][:2]}, "chat")[1] == ""


def test_a_bad_evaluation_dataset_line_stops_the_job_before_training(tmp_path, monkeypatch):
    import pytest

    from llmray_trainer.data import DatasetError
    from llmray_trainer.local import finetune_file

    monkeypatch.setenv("LLMRAY_HOME", str(tmp_path / "home"))
    (tmp_path / "train.jsonl").write_text('{"instruction": "a", "response": "a"}\n')
    (tmp_path / "test.jsonl").write_text('{"instruction": "b", "response": "b"}\n[1]\n')
    spec = {**JOB["spec"], "evaluation": {"dataset": "test.jsonl"}}
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({**JOB, "spec": spec}))
    with pytest.raises(DatasetError) as err:
        finetune_file(job)
    assert str(err.value) == (
        f"{tmp_path / 'test.jsonl'}:2: expected a JSON object, got list (format instruction)"
    )
