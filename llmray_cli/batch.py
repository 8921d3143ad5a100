"""`llmray batch FILE.yaml --input URI --output URI`: Ray Data batch inference with a model.

    FILE is a FineTuneJob   its output model (output.uri, or an adapter on its base), prompts
                            rendered as it trained (dataset.format), its evaluation's sampling
    FILE is an LLMDeployment its model (uri, or what its fineTuneJobRef produced here), the
                            records' format from --format (default instruction)

Input records are in the dataset format (the response field, or a chat's last assistant turn,
if present, becomes `reference`); every line is checked before Ray starts, a bad one named by
file:line. Output: one row per input, in input order (prompt, reference, output,
outputTokens), as JSON lines, or Parquet when the output ends in .parquet. On the local Ray,
or the cluster RAY_ADDRESS names.
"""

from __future__ import annotations

import argparse
import io
import json
import os
from pathlib import Path
from typing import Any

from llmray.api import load_resource
from llmray.api.finetunejob import FineTuneJob, Sampling
from llmray.api.llmdeployment import LLMDeployment
from llmray_cli.errors import UserError

OUTPUT_KEYS = ("prompt", "reference", "output", "outputTokens")


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("batch", help="generate for every record of a file (Ray Data)")
    p.add_argument("file", help="FineTuneJob (its output model) or LLMDeployment (its model)")
    p.add_argument("--input", required=True, help="records: .jsonl, .json or .parquet; URI or path")
    p.add_argument("--output", required=True, help="predictions: .jsonl, or .parquet; URI or path")
    p.add_argument(
        "--format",
        choices=["instruction", "chat", "text"],
        help="records' format for an LLMDeployment (default instruction); a FineTuneJob's is "
        "its spec.dataset.format",
    )
    p.add_argument("--workers", type=int, help="generator actors (default: the job's workers, 1)")
    p.add_argument("--batch-size", type=int, help="prompts per generate call (default 8)")
    p.add_argument("--max-new-tokens", type=int, help="tokens per output (default from FILE)")
    p.set_defaults(func=batch)


def batch(args: argparse.Namespace) -> int:
    resource = load_resource(args.file)
    from llmray import paths, uris
    from llmray_trainer.batch import Generation, run_batch
    from llmray_trainer.data import DatasetError, load_records

    source, defaults = _source(resource, Path(args.file), args.format)
    try:  # every line checked before Ray starts or a model loads
        local = uris.fetch(args.input, Path.cwd(), paths.cache_dir(), field="--input")
        records = load_records(local, source.fmt, prompts=True)
    except DatasetError as exc:
        raise UserError(str(exc)) from exc
    from llmray.localray import ensure_ray

    ensure_ray()
    workers = args.workers or defaults["workers"]
    rows = run_batch(
        records,
        source,
        Generation(
            max_new_tokens=args.max_new_tokens or defaults["max_new_tokens"],
            sampling=defaults["sampling"],
        ),
        workers=workers,
        batch_size=args.batch_size or defaults["batch_size"],
        cpus_per_worker=max(1, (os.cpu_count() or 1) // workers),
    )
    written = uris.put_file(_encode(rows, args.output), args.output, Path.cwd(), field="--output")
    tokens = sum(r["outputTokens"] for r in rows)
    print(f"{len(rows)} predictions ({tokens} generated tokens) written to {written}")
    return 0


def _source(resource: Any, path: Path, fmt: str | None) -> tuple[Any, dict[str, Any]]:
    from llmray import paths
    from llmray_trainer.batch import ModelSource

    if isinstance(resource, FineTuneJob):
        from llmray_trainer.evaluate import sources
        from llmray_trainer.local import local_config

        if fmt and fmt != resource.spec.dataset.format:
            raise UserError(f"--format {fmt}: a FineTuneJob's records are its dataset.format")
        cfg = local_config(resource, path.parent, os.cpu_count() or 1)
        evaluation = resource.spec.evaluation
        return sources(cfg)["model"], {
            "workers": resource.spec.compute.workers,
            "batch_size": evaluation.batchSize if evaluation else 8,
            "max_new_tokens": evaluation.maxNewTokens if evaluation else 256,
            "sampling": evaluation.sampling if evaluation else Sampling(),
        }
    assert isinstance(resource, LLMDeployment)
    from llmray_serve.local import CannotServe, local_model_uri

    try:
        uri = local_model_uri(resource)
    except CannotServe as exc:
        raise UserError(str(exc)) from exc
    source = ModelSource(
        uri=uri,
        base_dir=str(path.parent.resolve()),
        cache_dir=str(paths.cache_dir()),
        fmt=fmt or "instruction",
    )
    return source, {
        "workers": 1,
        "batch_size": 8,
        "max_new_tokens": resource.spec.generation.maxNewTokens,
        "sampling": Sampling(),  # greedy: a batch run is reproducible
    }


def _encode(rows: list[dict[str, Any]], output: str) -> bytes:
    table = [{k: r[k] for k in OUTPUT_KEYS} for r in rows]
    if output.lower().endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(table), buffer)
        return buffer.getvalue()
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in table).encode()
