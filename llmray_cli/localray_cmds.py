"""`llmray up`, `llmray down`: a local Ray head kept running between commands.

`llmray finetune`, `llmray serve` and `llmray batch` join it (llmray.localray.ensure_ray)
instead of starting an embedded Ray each: no Ray start in a job's start.
"""

from __future__ import annotations

import argparse

from llmray_cli.errors import UserError


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="start a local Ray that later commands join (llmray down)")
    p.add_argument("--num-cpus", type=int, help="CPUs Ray schedules on (default: all)")
    p.set_defaults(func=up)

    p = sub.add_parser("down", help="stop the local Ray of `llmray up`")
    p.set_defaults(func=down)


def up(args: argparse.Namespace) -> int:
    from llmray import localray

    if args.num_cpus is not None and args.num_cpus < 1:
        raise UserError("--num-cpus must be at least 1")
    head = localray.live_head()
    if head is None:
        try:
            head = localray.start_head(args.num_cpus)
        except RuntimeError as exc:
            raise UserError(str(exc)) from exc
        print(f"local Ray started at {head['address']} ({head['numCpus']} CPUs)")
    else:
        print(f"local Ray already up at {head['address']} ({head['numCpus']} CPUs)")
    print(f"dashboard: {head['dashboard']}")
    print(f"recorded in {localray.head_file()}:")
    print("  llmray finetune / serve / batch on this machine join it (same LLMRAY_HOME)")
    print("  stop it with: llmray down")
    return 0


def down(args: argparse.Namespace) -> int:
    from llmray import localray

    head = localray.stop_head()
    if head is None:
        print("no local Ray is up (nothing recorded by `llmray up`)")
    else:
        print(f"local Ray at {head['address']} stopped")
    return 0
