"""`make demo`: LoRA fine-tune of SmolLM2-135M-Instruct on 2 local Ray workers, before/after,
then serve the result with the OpenAI API and ask it over HTTP.

Run from the repository root after `llmray init-model models/smollm2-135m-instruct --from
smollm2` (the Makefile does both).
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from llmray import paths
from llmray.api import load_resource
from llmray_trainer.generate import chat_answer
from llmray_trainer.local import finetune_file

JOB = Path("examples/local/smollm2-lora.yaml")
SERVE = Path("examples/local/smollm2-serve.yaml")
BASE = Path("models/smollm2-135m-instruct")
QUESTION = "What is the capital of France?"  # held out: in instruction_eval.jsonl only


def main() -> int:
    print(f"question: {QUESTION}")
    print(f"before fine-tuning: {chat_answer(BASE, QUESTION)!r}\n", flush=True)
    # Same job name = resume (a finished run would have nothing left to do): start afresh.
    previous = paths.runs_dir() / load_resource(JOB).metadata.name
    if previous.exists():
        print(f"removing the previous demo run {previous}")
        shutil.rmtree(previous)
    start = time.perf_counter()
    result = finetune_file(JOB)
    minutes = (time.perf_counter() - start) / 60
    print(f"\nfine-tuned in {minutes:.1f} min; model: {result.model_uri}")
    print(
        f"train loss: {result.first_loss:.3f} (step 1) -> {result.last_loss:.3f} "
        f"(step {result.steps[-1]['step']}); eval loss {result.eval_loss:.3f}"
    )
    print(f"after fine-tuning:  {chat_answer(result.model_uri, QUESTION)!r}")
    serve_and_ask()
    return 0


def serve_and_ask() -> None:
    """Serve the fine-tuned model (examples/local/smollm2-serve.yaml) and ask over HTTP."""
    import openai
    from ray import serve

    from llmray_serve.local import local_args, start

    start_s = time.perf_counter()
    endpoint = start(local_args(SERVE), port=8000)
    print(f"\nserving at {endpoint} (up in {time.perf_counter() - start_s:.0f} s)")
    client = openai.OpenAI(base_url=endpoint, api_key="unused")
    reply = client.chat.completions.create(
        model="smollm2-demo", messages=[{"role": "user", "content": QUESTION}], temperature=0
    )
    print(f"POST {endpoint}/chat/completions -> {reply.choices[0].message.content!r}")
    serve.shutdown()


if __name__ == "__main__":
    sys.exit(main())
