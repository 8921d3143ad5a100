"""Batch inference as a Ray Data pipeline: records -> a stateful generator stage -> rows.

    ray.data.from_items([{"index": 0, "record": "{...}"}, ...])
      .map_batches(StatefulGenerator, compute=ActorPoolStrategy(size=workers),
                   batch_size=batchSize, num_cpus=cpus_per_worker)

Each actor of the pool loads the model once (`StatefulGenerator.__init__`), then per batch
renders the prompts as training rendered them (`prompt_messages`: the chat template, the
instruction and context as the user turn), generates them together with left padding
(greedy unless sampling says otherwise) and, when asked, measures the reference's loss under
the model with the training tokenization (`llmray_trainer.data.tokenize_records`, so the
masked tokens are the ones training had loss on). Rows come back in input order.

Used after training (`evaluate.py`) and by `llmray batch`.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmray.api.finetunejob import Sampling
from llmray.chat import instruction_to_messages
from llmray_trainer.data import record_messages

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSource:
    """Where the generator finds its model: a Hugging Face folder (or an adapter on a base),
    each a URI fetched on the worker's node."""

    uri: str
    base_dir: str  # relative URIs are relative to it
    cache_dir: str
    fmt: str = "instruction"
    special_tokens: tuple[str, ...] = ()
    adapter_base: str = ""  # the base model's URI when `uri` holds a PEFT adapter only
    # Not a trained model (the baseline): its tokenizer gets what training would give it.
    prepare_tokenizer: bool = False


@dataclass(frozen=True)
class Generation:
    max_new_tokens: int = 256
    sampling: Sampling = field(default_factory=Sampling)
    generate: bool = True  # outputs (any metric but loss / perplexity, or `llmray batch`)
    loss: bool = False  # the reference's loss (metrics loss / perplexity)


def prompt_messages(record: dict[str, Any], fmt: str) -> tuple[list[dict[str, Any]], str]:
    """(the messages a model answers, the reference answer or "") of an instruction or chat
    record: the reference is the response, or the last assistant turn's content."""
    if fmt == "instruction":
        messages = instruction_to_messages(record["instruction"], record.get("context") or "")
        return messages, record.get("response") or ""
    messages = record_messages(record, fmt)
    if messages and messages[-1]["role"] == "assistant":
        return messages[:-1], messages[-1].get("content") or ""
    return messages, ""


def rows_of(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ray Data items: the record as JSON text (nested messages need no Arrow schema)."""
    return [{"index": i, "record": json.dumps(r)} for i, r in enumerate(records)]


class StatefulGenerator:
    """The map_batches stage: one model per actor, a batch of records in, predictions out."""

    def __init__(self, source: dict[str, Any], generation: dict[str, Any], threads: int) -> None:
        import torch

        self.source = ModelSource(**source)
        generation = dict(generation)
        sampling = Sampling.model_validate(generation.pop("sampling"))
        self.gen = Generation(sampling=sampling, **generation)
        torch.set_num_threads(max(1, threads))
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer, self.model = load_model(self.source)
        self.model.to(self.device).eval()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        records = [json.loads(text) for text in batch["record"]]
        fmt = self.source.fmt
        out: dict[str, list[Any]] = {"index": [int(i) for i in batch["index"]]}
        if fmt == "text":
            out["prompt"] = [r["input"] for r in records]
            out["reference"] = [""] * len(records)
        else:
            pairs = [prompt_messages(r, fmt) for r in records]
            out["prompt"] = [
                self.tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
                for m, _ in pairs
            ]
            out["reference"] = [ref for _, ref in pairs]
        if self.gen.generate:
            texts, counts = self._generate(out["prompt"], first_index=out["index"][0])
            out["output"], out["outputTokens"] = texts, counts
        if self.gen.loss:
            out["lossSum"], out["lossTokens"] = self._losses(records)
        return out

    def _generate(self, prompts: list[str], first_index: int) -> tuple[list[str], list[int]]:
        import torch

        tok = self.tokenizer
        inputs = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        inputs = inputs.to(self.device)
        sampling = self.gen.sampling
        kwargs: dict[str, Any] = {"do_sample": False}
        if sampling.temperature > 0:
            # Seeded per batch: the same records in the same batches give the same outputs.
            torch.manual_seed(sampling.seed + first_index)
            kwargs = {
                "do_sample": True,
                "temperature": sampling.temperature,
                "top_p": sampling.topP,
            }
        with torch.no_grad():
            generated = self.model.generate(
                **inputs,
                max_new_tokens=self.gen.max_new_tokens,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
                **kwargs,
            )
        new = generated[:, inputs["input_ids"].shape[1] :].tolist()
        texts, counts = [], []
        for ids in new:
            # Tokens up to and with the first eos; what follows is padding.
            n = next((i + 1 for i, t in enumerate(ids) if t == tok.eos_token_id), len(ids))
            counts.append(n)
            texts.append(tok.decode(ids[:n], skip_special_tokens=True))
        return texts, counts

    def _losses(self, records: list[dict[str, Any]]) -> tuple[list[float], list[int]]:
        """Summed loss and labelled tokens of each record, tokenized as in training."""
        import torch

        from llmray_trainer.data import IGNORE_INDEX, collate, tokenize_records

        sums, counts = [], []
        for record in records:
            examples = tokenize_records([record], self.tokenizer, self.source.fmt, 1 << 30, True)
            if not examples:  # no answer to measure (a prompt-only record)
                sums.append(0.0)
                counts.append(0)
                continue
            batch = collate(examples, self.tokenizer.pad_token_id)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with torch.no_grad():
                logits = self.model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).logits
            labels = batch["labels"][:, 1:]
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().transpose(1, 2),
                labels,
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            sums.append(float(nll))
            counts.append(int((labels != IGNORE_INDEX).sum()))
        return sums, counts


def load_model(source: ModelSource) -> tuple[Any, Any]:
    """(tokenizer with left padding, model) of `source`, in fp32 on the CPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmray import uris
    from llmray.paths import pod_path
    from llmray_trainer.data import prepare_tokenizer

    base_dir, cache = Path(source.base_dir), pod_path(source.cache_dir)
    folder = uris.fetch(source.uri, base_dir, cache, field="model")
    weights = folder
    if source.adapter_base:
        weights = uris.fetch(source.adapter_base, base_dir, cache, field="spec.baseModel.uri")
    tokenizer_dir = folder if (folder / "tokenizer_config.json").exists() else weights
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    added = 0
    if source.prepare_tokenizer or not tokenizer.chat_template:
        added = prepare_tokenizer(tokenizer, source.fmt, list(source.special_tokens))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation continues every prompt from its last token
    model = AutoModelForCausalLM.from_pretrained(weights, dtype=torch.float32)
    if added or len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    if source.adapter_base:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, folder)
    return tokenizer, model


def run_batch(
    records: list[dict[str, Any]],
    source: ModelSource,
    generation: Generation,
    *,
    workers: int,
    batch_size: int,
    cpus_per_worker: float,
    gpus_per_worker: float = 0,
) -> list[dict[str, Any]]:
    """Predictions for `records`, one row each, in input order, from a pool of `workers`
    actors on the running Ray (`ray.init` done by the caller)."""
    import ray.data

    if not records:
        return []
    blocks = min(len(records), max(workers, math.ceil(len(records) / batch_size)))
    gen = asdict(generation)
    gen["sampling"] = generation.sampling.model_dump()
    ds = ray.data.from_items(rows_of(records), override_num_blocks=blocks).map_batches(
        StatefulGenerator,
        fn_constructor_kwargs={
            "source": asdict(source),
            "generation": gen,
            "threads": max(1, int(cpus_per_worker)),
        },
        batch_size=batch_size,
        batch_format="numpy",
        # A fixed pool of `workers` actors (map_batches' `concurrency` is deprecated in 2.51).
        compute=ray.data.ActorPoolStrategy(size=min(workers, len(records))),
        num_cpus=cpus_per_worker,
        num_gpus=gpus_per_worker or None,
    )
    rows = sorted(ds.take_all(), key=lambda r: int(r["index"]))
    return [_plain(r) for r in rows]


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    """A row with numpy scalars as Python values (JSON and the status take those)."""
    return {k: v.item() if hasattr(v, "item") else v for k, v in row.items()}
