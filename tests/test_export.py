"""The streamed export (no Ray): sharded safetensors that transformers reloads as the same
model, and LoRA merged module by module exactly as PEFT's own merge_and_unload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


def load_tiny(tiny_model: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (
        AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
        AutoTokenizer.from_pretrained(tiny_model),
    )


def test_sharded_export_reloads_as_the_same_model(tmp_path, tiny_model) -> None:
    from transformers import AutoModelForCausalLM

    from llmray_trainer.export import INDEX_NAME, write_model

    model, tokenizer = load_tiny(tiny_model)
    # Shards of 256 KiB: the 2.6 MB model is written as many files, one filled at a time.
    write_model(
        model, tokenizer, tmp_path, zero3=False, rank=0, dtype=torch.float32, shard_bytes=2**18
    )
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 3
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    want = model.state_dict()
    got = reloaded.state_dict()
    assert want.keys() == got.keys()
    for name, tensor in want.items():
        assert torch.equal(tensor, got[name]), name


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "down_proj", "lm_head"]])
def test_lora_merged_per_module_equals_peft_merge(tmp_path, tiny_model, targets) -> None:
    from peft import LoraConfig, get_peft_model

    from llmray_trainer.export import stream_weights

    model, _ = load_tiny(tiny_model)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    torch.manual_seed(0)
    with torch.no_grad():  # B starts at zero: give the adapters something to merge
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    streamed = dict(
        stream_weights(peft_model.get_base_model(), zero3=False, rank=0, dtype=torch.float32)
    )
    merged = peft_model.merge_and_unload().state_dict()
    tied = {k for k in merged if k == "lm_head.weight" and k not in streamed}
    assert set(streamed) == set(merged) - tied
    for name, tensor in streamed.items():
        torch.testing.assert_close(tensor, merged[name], rtol=1e-5, atol=1e-6, msg=name)


def test_adapter_only_export_names_the_jobs_base_model(tmp_path, tiny_model) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from llmray_trainer.export import gather_trainable, save_adapter

    model, _ = load_tiny(tiny_model)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    save_adapter(peft_model, gather_trainable(peft_model, False, 0), tmp_path, "hf://org/base")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "hf://org/base"
    assert not list(tmp_path.glob("model*.safetensors"))
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, tmp_path)
    want = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    got = dict(loaded.named_parameters())
    for name, tensor in want.items():
        assert torch.equal(tensor, got[name]), name


def test_an_adapter_carries_a_tokenizer_only_when_training_changed_it(tiny_model) -> None:
    from llmray_trainer.data import prepare_tokenizer
    from llmray_trainer.export import tokenizer_changed

    _, tokenizer = load_tiny(tiny_model)
    # The tiny tokenizer has a chat template: instruction data changes nothing.
    assert prepare_tokenizer(tokenizer, "instruction", []) == 0
    assert not tokenizer_changed(tokenizer, tiny_model)
    assert prepare_tokenizer(tokenizer, "text", ["<TOOL>"]) == 1
    assert tokenizer_changed(tokenizer, tiny_model)
    _, template = load_tiny(tiny_model)
    template.chat_template = "{{ messages[0]['content'] }}"
    assert tokenizer_changed(template, tiny_model)


def test_the_jobs_status_says_an_adapter_and_of_which_base() -> None:
    from llmray.api.finetunejob import FineTuneJob
    from llmray.trainer_config import produced_model, resolve_trainer_config

    def config(spec: dict, base_dir: str = "/jobs"):
        job = FineTuneJob.model_validate(
            {
                "metadata": {"name": "j"},
                "spec": {"baseModel": {"uri": "../models/tiny"}, "dataset": {"train": "t.jsonl"}}
                | spec,
            }
        )
        return resolve_trainer_config(
            job, base_dir=base_dir, default_storage="s3://b/runs", cache_dir="/c", cpus_per_worker=1
        )

    adapter = produced_model(config({"method": "lora", "output": {"mergeLora": False}}))
    assert adapter.model_dump() == {
        "uri": "s3://b/runs/j/model",
        "adapter": True,
        "baseModel": "/models/tiny",  # relative to the job's folder, made absolute
    }
    merged = produced_model(config({"method": "lora"}))
    assert merged.model_dump() == {"uri": "s3://b/runs/j/model", "adapter": False, "baseModel": ""}
    # A full fine-tune has no adapter to keep, whatever output.mergeLora says.
    assert not produced_model(config({"output": {"mergeLora": False}})).adapter
