"""Parse a resource once at the boundary and report every problem at once, by field path.

`parse_finetunejob(obj)` / `parse_llmdeployment(obj)` return typed models or raise
`SpecError` listing lines such as::

    spec.dataset.format: must be one of instruction, text, chat
    spec.lora: only allowed when spec.method is lora or qlora

The cross-field rules run on the raw object (with the models' defaults), so they are
reported together with schema errors and read exactly like the CRD's CEL rules
(`llmray.crdgen` renders the same rules as `x-kubernetes-validations`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from llmray.api.finetunejob import FineTuneJob
from llmray.api.llmdeployment import LLMDeployment


@dataclass(frozen=True)
class FieldError:
    path: str  # e.g. "spec.dataset.format"
    message: str  # e.g. "must be one of instruction, text, chat"

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class SpecError(ValueError):
    """A resource that is not valid; `errors` holds every problem found."""

    def __init__(self, errors: list[FieldError], source: str = "") -> None:
        self.errors = errors
        self.source = source
        head = f"{source}: " if source else ""
        lines = "\n".join(f"  {e}" for e in errors)
        super().__init__(f"{head}invalid resource ({len(errors)} error(s)):\n{lines}")


@dataclass(frozen=True)
class CrossFieldRule:
    """A rule across fields; `cel` is its CRD form, evaluated on the object at `scope`."""

    scope: str  # JSON path of the object the rule is attached to, e.g. "spec"
    path: str  # field named in the message, relative to the resource, e.g. "spec.lora"
    message: str
    cel: str
    check: Callable[[dict[str, Any]], bool]  # raw scope object -> ok?


def _get(obj: dict[str, Any], dotted: str, default: Any = None) -> Any:
    cur: Any = obj
    for part in filter(None, dotted.split(".")):  # "": the object itself
        if not isinstance(cur, dict) or part not in cur:
            return default
        cur = cur[part]
    return cur


FINETUNEJOB_RULES: list[CrossFieldRule] = [
    CrossFieldRule(
        "spec",
        "spec.lora",
        "only allowed when spec.method is lora or qlora",
        "!has(self.lora) || (has(self.method) && self.method in ['lora', 'qlora'])",
        lambda s: s.get("lora") is None or s.get("method", "full") in ("lora", "qlora"),
    ),
    CrossFieldRule(
        "spec",
        "spec.method",
        "qlora needs spec.compute.accelerator nvidia-gpu (4-bit kernels are CUDA only)",
        "!has(self.method) || self.method != 'qlora' || "
        "(has(self.compute) && has(self.compute.accelerator) && "
        "self.compute.accelerator == 'nvidia-gpu')",
        lambda s: s.get("method") != "qlora" or _get(s, "compute.accelerator") == "nvidia-gpu",
    ),
    CrossFieldRule(
        "spec.strategy",
        "spec.strategy.zeroStage",
        "only allowed when spec.strategy.type is deepspeed",
        "!has(self.zeroStage) || (has(self.type) && self.type == 'deepspeed')",
        lambda s: s.get("zeroStage") is None or s.get("type", "ddp") == "deepspeed",
    ),
    CrossFieldRule(
        "spec.strategy",
        "spec.strategy.offloadOptimizer",
        "only allowed when spec.strategy.type is deepspeed",
        "!has(self.offloadOptimizer) || !self.offloadOptimizer || "
        "(has(self.type) && self.type == 'deepspeed')",
        lambda s: not s.get("offloadOptimizer") or s.get("type", "ddp") == "deepspeed",
    ),
    CrossFieldRule(
        "spec.strategy",
        "spec.strategy.zeroTuning",
        "only allowed when spec.strategy.type is deepspeed",
        "!has(self.zeroTuning) || (has(self.type) && self.type == 'deepspeed')",
        lambda s: s.get("zeroTuning") is None or s.get("type", "ddp") == "deepspeed",
    ),
    CrossFieldRule(
        "spec.strategy",
        "spec.strategy.offloadParameters",
        "needs spec.strategy.type deepspeed with zeroStage 3",
        "!has(self.offloadParameters) || !self.offloadParameters || "
        "(has(self.type) && self.type == 'deepspeed' && has(self.zeroStage) && "
        "self.zeroStage == 3)",
        lambda s: (
            not s.get("offloadParameters")
            or (s.get("type") == "deepspeed" and s.get("zeroStage") == 3)
        ),
    ),
    CrossFieldRule(
        "spec.dataset",
        "spec.dataset.evalFraction",
        "set either spec.dataset.eval or spec.dataset.evalFraction, not both",
        "!has(self.eval) || !has(self.evalFraction)",
        lambda s: s.get("eval") is None or s.get("evalFraction") is None,
    ),
    CrossFieldRule(
        "spec",
        "spec.compute.ipex",
        "only with spec.compute.accelerator cpu or intel-gpu",
        "!has(self.compute) || !has(self.compute.ipex) || !self.compute.ipex || "
        "!has(self.compute.accelerator) || self.compute.accelerator != 'nvidia-gpu'",
        lambda s: not _get(s, "compute.ipex") or _get(s, "compute.accelerator") != "nvidia-gpu",
    ),
    CrossFieldRule(
        "spec",
        "spec.hyperparameters.precision",
        "fp16 needs a GPU accelerator; use bf16 or fp32 on cpu",
        "!has(self.hyperparameters) || !has(self.hyperparameters.precision) || "
        "self.hyperparameters.precision != 'fp16' || (has(self.compute) && "
        "has(self.compute.accelerator) && self.compute.accelerator != 'cpu')",
        lambda s: (
            _get(s, "hyperparameters.precision") != "fp16"
            or _get(s, "compute.accelerator", "cpu") != "cpu"
        ),
    ),
    CrossFieldRule(
        "spec",
        "spec.hyperparameters.torchCompile",
        "only with spec.strategy.type ddp",
        "!has(self.hyperparameters) || !has(self.hyperparameters.torchCompile) || "
        "!self.hyperparameters.torchCompile || !has(self.strategy) || "
        "!has(self.strategy.type) || self.strategy.type == 'ddp'",
        lambda s: (
            not _get(s, "hyperparameters.torchCompile") or _get(s, "strategy.type", "ddp") == "ddp"
        ),
    ),
]

LLMDEPLOYMENT_RULES: list[CrossFieldRule] = [
    CrossFieldRule(
        "spec.model",
        "spec.model",
        "set exactly one of spec.model.uri and spec.model.fineTuneJobRef",
        "has(self.uri) != has(self.fineTuneJobRef)",
        lambda s: (s.get("uri") is None) != (s.get("fineTuneJobRef") is None),
    ),
    CrossFieldRule(
        "spec",
        "spec.engine",
        "vllm needs spec.compute.accelerator nvidia-gpu",
        "!has(self.engine) || self.engine != 'vllm' || (has(self.compute) && "
        "has(self.compute.accelerator) && self.compute.accelerator == 'nvidia-gpu')",
        lambda s: s.get("engine") != "vllm" or _get(s, "compute.accelerator") == "nvidia-gpu",
    ),
    CrossFieldRule(
        "spec",
        "spec.compute.ipex",
        "only with spec.compute.accelerator cpu or intel-gpu",
        "!has(self.compute) || !has(self.compute.ipex) || !self.compute.ipex || "
        "!has(self.compute.accelerator) || self.compute.accelerator != 'nvidia-gpu'",
        lambda s: not _get(s, "compute.ipex") or _get(s, "compute.accelerator") != "nvidia-gpu",
    ),
    CrossFieldRule(
        "spec",
        "spec.adapters",
        "each adapter sets exactly one of uri and fineTuneJobRef",
        "!has(self.adapters) || self.adapters.all(a, has(a.uri) != has(a.fineTuneJobRef))",
        lambda s: all(
            (a.get("uri") is None) != (a.get("fineTuneJobRef") is None) for a in _adapters(s)
        ),
    ),
    CrossFieldRule(
        "spec",
        "spec.adapters",
        "adapter names must be unique",
        "!has(self.adapters) || "
        "self.adapters.all(a, self.adapters.exists_one(b, b.name == a.name))",
        lambda s: len({a.get("name") for a in _adapters(s)}) == len(_adapters(s)),
    ),
    CrossFieldRule(
        "spec",
        "spec.adapters",
        "minEvaluation is only allowed with fineTuneJobRef (it gates the job's scores)",
        "!has(self.adapters) || self.adapters.all(a, !has(a.minEvaluation) || "
        "has(a.fineTuneJobRef))",
        lambda s: all(
            a.get("minEvaluation") is None or a.get("fineTuneJobRef") is not None
            for a in _adapters(s)
        ),
    ),
    # At the root: the served name defaults to metadata.name (the only metadata CEL may read
    # besides generateName).
    CrossFieldRule(
        "",
        "spec.adapters",
        "an adapter may not take the served model's name (spec.model.servedName, default "
        "metadata.name)",
        "!has(self.spec.adapters) || self.spec.adapters.all(a, a.name != "
        "(has(self.spec.model.servedName) ? self.spec.model.servedName : self.metadata.name))",
        lambda o: all(
            a.get("name") != (_get(o, "spec.model.servedName") or _get(o, "metadata.name"))
            for a in _adapters(o.get("spec"))
        ),
    ),
    CrossFieldRule(
        "spec.scaling",
        "spec.scaling.minReplicas",
        "must not exceed spec.scaling.maxReplicas",
        "!has(self.minReplicas) || !has(self.maxReplicas) || self.minReplicas <= self.maxReplicas",
        lambda s: (
            s.get("minReplicas", 1) <= s.get("maxReplicas", 1)
            if isinstance(s.get("minReplicas", 1), int) and isinstance(s.get("maxReplicas", 1), int)
            else True
        ),
    ),
]


def _adapters(spec: Any) -> list[dict[str, Any]]:
    """spec.adapters' entries that are objects (the schema check reports the others)."""
    items = spec.get("adapters") if isinstance(spec, dict) else None
    return [a for a in items if isinstance(a, dict)] if isinstance(items, list) else []


def _message(err: dict[str, Any]) -> str:
    kind = err["type"]
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        choices = [c.strip().strip("'") for c in expected.replace(" or ", ",").split(",")]
        return "must be one of " + ", ".join(c for c in choices if c)
    msg: str = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    return msg[:1].lower() + msg[1:]


def _path(loc: tuple[Any, ...]) -> str:
    # Union branches add tags such as "int" or "function-after[...]" to the location.
    parts = [
        f"[{p}]" if isinstance(p, int) else str(p)
        for p in loc
        if not (isinstance(p, str) and (p in ("int", "str", "float", "bool") or "[" in p))
    ]
    return ".".join(parts).replace(".[", "[")


def _schema_errors(exc: ValidationError) -> list[FieldError]:
    by_path: dict[str, FieldError] = {}
    for err in exc.errors():
        path = _path(err["loc"])
        # Of a union's failed branches keep our own message (value_error) over "not an int".
        if path not in by_path or err["type"] == "value_error":
            by_path[path] = FieldError(path, _message(err))
    return list(by_path.values())


def _rule_errors(obj: dict[str, Any], rules: list[CrossFieldRule]) -> list[FieldError]:
    errors = []
    for rule in rules:
        scope = _get(obj, rule.scope)
        if isinstance(scope, dict) and not rule.check(scope):
            errors.append(FieldError(rule.path, rule.message))
    return errors


M = TypeVar("M", bound=BaseModel)


def _parse(model: type[M], obj: Any, rules: list[CrossFieldRule], source: str) -> M:
    if not isinstance(obj, dict):
        raise SpecError([FieldError("(root)", "must be a mapping (a YAML object)")], source)
    errors: list[FieldError] = []
    parsed = None
    try:
        parsed = model.model_validate(obj)
    except ValidationError as exc:
        errors.extend(_schema_errors(exc))
    errors.extend(_rule_errors(obj, rules))
    if errors or parsed is None:
        raise SpecError(errors, source)
    return parsed


def parse_finetunejob(obj: Any, source: str = "") -> FineTuneJob:
    return _parse(FineTuneJob, obj, FINETUNEJOB_RULES, source)


def parse_llmdeployment(obj: Any, source: str = "") -> LLMDeployment:
    return _parse(LLMDeployment, obj, LLMDEPLOYMENT_RULES, source)
