"""`llmray validate`, `llmray plan` and `llmray crds`: the resource files and the API, no
program needed (no torch, no Ray)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llmray import paths
from llmray.api import load_resource
from llmray.api.finetunejob import FineTuneJob
from llmray.model_shape import resolve_shape
from llmray.sizing import Plan, gib, plan
from llmray_cli.errors import UserError


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="check resource files, report every error")
    p.add_argument("files", nargs="+")
    p.set_defaults(func=validate)

    p = sub.add_parser(
        "plan", help="predict a FineTuneJob's memory per worker and for rank 0, and if it fits"
    )
    p.add_argument("file", help="FineTuneJob YAML")
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")
    p.set_defaults(func=plan_command)

    p = sub.add_parser("crds", help="print or write the CustomResourceDefinitions")
    p.add_argument("--out", help="folder to write them to")
    p.set_defaults(func=crds)


def validate(args: argparse.Namespace) -> int:
    for path in args.files:
        resource = load_resource(path)
        line = f"{path}: {resource.kind} {resource.metadata.name} is valid"
        if isinstance(resource, FineTuneJob):
            line += f"; plan: {verdict(job_plan(resource, Path(path).parent))}"
        print(line)
    return 0


def job_plan(job: FineTuneJob, base_dir: Path) -> Plan | None:
    """The memory plan of a job file's job (None: its model's size cannot be known here)."""
    base = job.spec.baseModel
    shape = resolve_shape(base.uri, base.parameters, base_dir, paths.cache_dir(), base.revision)
    return None if shape is None else plan(job.spec, shape)


def verdict(p: Plan | None) -> str:
    if p is None:
        return (
            "unknown: the model's config.json cannot be read from here; set "
            "spec.baseModel.parameters for an estimate"
        )
    peaks = (
        f"a worker peaks at {gib(p.per_worker.peak_host)} of host memory, rank 0 at "
        f"{gib(p.rank0.peak_host)}"
    )
    misses = [r for r in p.reasons if r.startswith("does not fit")]
    return f"{'; '.join(misses)}" if misses else f"fits ({peaks})"


def plan_command(args: argparse.Namespace) -> int:
    job = load_resource(args.file, kind="FineTuneJob")
    assert isinstance(job, FineTuneJob)
    p = job_plan(job, Path(args.file).parent)
    if p is None:
        raise UserError(f"{args.file}: cannot plan: {verdict(None).split(': ', 1)[1]}")
    if args.output == "json":
        print(json.dumps(p.to_json(), indent=2))
    else:
        print(format_plan(p))
    return 0


def format_plan(p: Plan) -> str:
    """The plan as a table: rows by worker, memory and kind; columns by phase."""
    m = p.to_json()["model"]
    lines = [
        f"model: {m['parameters']:,} parameters ({m['trainableParameters']:,} trained), "
        f"hidden {m['hiddenSize']}, {m['layers']} layers; from {m['source']}",
        f"workers: {p.workers}",
        "",
        f"{'':34}{'load':>10}{'train':>10}{'export':>10}",
    ]
    kinds = ("runtime", "weights", "gradients", "optimizerStates", "gathered", "activations")
    for title, worker in (("each worker", p.per_worker), ("rank 0", p.rank0)):
        for memory, phases in (("host", worker.host), ("accelerator", worker.accelerator)):
            if not phases:
                continue
            row = [gib(phases[ph].total) if ph in phases else "" for ph in PHASES]
            lines.append(
                f"{title + ', ' + memory + ' (peak)':34}" + "".join(f"{c:>10}" for c in row)
            )
            for kind in (*kinds, "buffers"):
                values = [getattr(phases[ph], kind) if ph in phases else 0 for ph in PHASES]
                if any(values):
                    cells = [
                        gib(v) if ph in phases else "" for v, ph in zip(values, PHASES, strict=True)
                    ]
                    lines.append(f"{'  ' + kind:34}" + "".join(f"{c:>10}" for c in cells))
    lines += [
        "",
        f"checkpoint: {gib(p.checkpoint_bytes)} from the largest rank; preemption grace "
        f"period {p.preemption_grace_seconds} s (terminationGracePeriodSeconds)",
        "",
        "fits" if p.fits else "does not fit",
        *[f"  - {r}" for r in p.reasons],
    ]
    return "\n".join(lines)


PHASES = ("load", "train", "export")


def crds(args: argparse.Namespace) -> int:
    import yaml

    from llmray.crdgen import render_crds

    rendered = render_crds()
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for name, crd in rendered.items():
            (out / name).write_text(yaml.safe_dump(crd, sort_keys=False))
            print(f"wrote {out / name}")
    else:
        sys.stdout.write(yaml.safe_dump_all(rendered.values(), sort_keys=False))
    return 0
