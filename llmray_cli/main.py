"""`llmray`: the same YAML as on Kubernetes, run on this machine.

    llmray validate FILE.yaml           check a FineTuneJob / LLMDeployment, every error at once
    llmray plan FILE.yaml [-o json]     a FineTuneJob's memory per worker and rank 0; fits?
    llmray up [--num-cpus N]            keep a local Ray running that later commands join
    llmray down                         stop it
    llmray finetune FILE.yaml           fine-tune on the local Ray (`llmray up`'s, or embedded)
    llmray serve FILE.yaml [--port N]   serve it with an OpenAI-compatible API (Ray Serve)
    llmray batch FILE.yaml --input URI --output URI   generate for every record (Ray Data)
    llmray init-model DIR [--from tiny|smollm2]
    llmray crds [--out DIR]             print (or write) the CustomResourceDefinitions
    llmray operator [--namespace NS]    run the Kubernetes operator against KUBECONFIG / in-cluster
    llmray render FILE.yaml [-n NS]     print the objects the operator would create for it

A new command goes into the module of its group (or a new one, listed in GROUPS): its
`add_commands(sub)` adds the subparser with `set_defaults(func=handler)`; a handler takes the
parsed arguments, returns the exit status, and raises UserError for what the user fixes.
"""

from __future__ import annotations

import argparse
import logging
import sys

from llmray.api import SpecError
from llmray.uris import UriError
from llmray_cli import batch, cluster, local, localray_cmds, render, resources
from llmray_cli.errors import UserError

# In `llmray --help` order.
GROUPS = (resources, local, localray_cmds, batch, cluster, render)
# Exit status 2, `error: ...`, no traceback.
USER_ERRORS = (UserError, SpecError, UriError, FileNotFoundError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmray", description="Fine-tune and serve open LLMs: on Kubernetes or here."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
