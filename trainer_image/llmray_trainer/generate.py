"""One chat answer from a local Hugging Face model folder (the demo's before / after)."""

from __future__ import annotations

from pathlib import Path


def chat_answer(model_dir: str | Path, prompt: str, max_new_tokens: int = 64) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmray.chat import DEFAULT_CHAT_TEMPLATE

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if not tokenizer.chat_template:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
