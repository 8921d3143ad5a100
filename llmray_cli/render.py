"""`llmray render FILE.yaml [-n NS]`: the objects the operator creates for a resource, as YAML.

    FineTuneJob    ConfigMap <name>-trainer + RayJob <name>
    LLMDeployment  RayService <name>   (with fineTuneJobRef: --model-uri URI or --job FILE;
                                        an adapter's fineTuneJobRef: --job FILE, each job's
                                        YAML rendered as if it had succeeded)

The same builders and settings as the operator (`Settings.from_env`: the LLMRAY_* variables
the chart sets, here from the environment and `--setting NAME=VALUE`). The owner's uid is
only known on a cluster: ownerReferences carry PLACEHOLDER_UID unless `--owner-uid` gives it.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from llmray.adapters import referenced_jobs, resolve_adapters
from llmray.api import FieldError, SpecError, load_resource
from llmray.api.finetunejob import FineTuneJob
from llmray.api.llmdeployment import LLMDeployment
from llmray.trainer_config import produced_model
from llmray_cli.errors import UserError

PLACEHOLDER_UID = "00000000-0000-0000-0000-000000000000"


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "render", help="print the ConfigMap + RayJob / RayService the operator would create"
    )
    p.add_argument("file", help="FineTuneJob or LLMDeployment YAML")
    p.add_argument("-n", "--namespace", help="namespace (default: the file's, else default)")
    p.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an operator setting (LLMRAY_* variable, docs/operator.md), over the environment",
    )
    p.add_argument(
        "--owner-uid", default=PLACEHOLDER_UID, help="the resource's metadata.uid on the cluster"
    )
    p.add_argument("--model-uri", help="fineTuneJobRef: the job's status.model.uri")
    p.add_argument(
        "--job",
        action="append",
        default=[],
        help="fineTuneJobRef (model or adapter): the FineTuneJob's YAML, as if it succeeded "
        "(repeatable; an adapter whose job is not given is rendered as not ready)",
    )
    p.set_defaults(func=render)


def render(args: argparse.Namespace) -> int:
    from llmray_operator.settings import Settings

    resource = load_resource(args.file)
    namespace = _namespace(resource.metadata.namespace, args.namespace)
    resource = _in_namespace(resource, namespace)
    settings = Settings.from_env({**os.environ, **_settings(args.setting)})
    sys.stdout.write(dump_all(children(resource, settings, args)))
    return 0


def children(resource: Any, settings: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    from llmray_operator import rayjob, rayservice
    from llmray_operator.owner import Owner

    meta = resource.metadata
    owner = Owner(resource.apiVersion, resource.kind, meta.name, meta.namespace, args.owner_uid)
    if isinstance(resource, FineTuneJob):
        built = rayjob.build(resource, owner, settings)
        return [built.config_map, built.ray_job]
    assert isinstance(resource, LLMDeployment)
    jobs = _succeeded_jobs(resource, settings, args.job)
    model_uri = _model_uri(resource, jobs, args)
    adapters = resolve_adapters(resource, jobs, model_uri)
    return [rayservice.build(resource, owner, model_uri, settings, adapters)]


def _succeeded_jobs(dep: LLMDeployment, settings: Any, files: list[str]) -> dict[str, Any]:
    """{job name: the status it would have once Succeeded} of each --job FILE."""
    from llmray_operator import rayjob

    wanted = set(referenced_jobs(dep))
    if dep.spec.model.fineTuneJobRef is not None:
        wanted.add(dep.spec.model.fineTuneJobRef.name)
    jobs = {}
    for path in files:
        job = load_resource(path, kind="FineTuneJob")
        assert isinstance(job, FineTuneJob)
        if job.metadata.name not in wanted:
            raise UserError(
                f"--job {path}: FineTuneJob {job.metadata.name}, but this LLMDeployment "
                f"references {', '.join(sorted(wanted)) or 'no FineTuneJob'}"
            )
        job = _in_namespace(job, _namespace(job.metadata.namespace, dep.metadata.namespace))
        model = produced_model(rayjob.trainer_config(job, settings))
        jobs[job.metadata.name] = {
            "phase": "Succeeded",
            "model": model.model_dump(mode="json", exclude_defaults=True) | {"uri": model.uri},
        }
    return jobs


def _model_uri(dep: LLMDeployment, jobs: dict[str, Any], args: argparse.Namespace) -> str:
    """spec.model.uri, or what the referenced job reports as status.model.uri once done."""
    ref = dep.spec.model.fineTuneJobRef
    if ref is None:
        if args.model_uri:
            raise UserError("--model-uri is for spec.model.fineTuneJobRef; this uses uri")
        return dep.spec.model.uri or ""
    if args.model_uri:
        return args.model_uri
    if ref.name not in jobs:
        raise UserError(
            f"spec.model.fineTuneJobRef: the model is FineTuneJob {ref.name}'s status.model.uri "
            "on a cluster; give --model-uri URI or --job FILE (the job's YAML)"
        )
    return jobs[ref.name]["model"]["uri"]


def _namespace(in_file: str | None, flag: str | None) -> str:
    if in_file and flag and in_file != flag:
        # What kubectl says for the same mismatch.
        raise SpecError(
            [
                FieldError(
                    "metadata.namespace",
                    f"{in_file} does not match the namespace {flag} given with -n",
                )
            ]
        )
    return flag or in_file or "default"


def _in_namespace(resource: Any, namespace: str) -> Any:
    meta = resource.metadata.model_copy(update={"namespace": namespace})
    return resource.model_copy(update={"metadata": meta})


def _settings(pairs: list[str]) -> dict[str, str]:
    from llmray_operator.settings import ENV_NAMES

    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or name not in ENV_NAMES:
            raise UserError(
                f"--setting {pair}: expected NAME=VALUE with NAME one of {', '.join(ENV_NAMES)}"
            )
        out[name] = value
    return out


def dump_all(objects: list[dict[str, Any]]) -> str:
    """YAML documents; multi-line strings (serveConfigV2, trainer.json) as literal blocks."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, text)
    return yaml.dump_all(objects, Dumper=Dumper, sort_keys=False)
