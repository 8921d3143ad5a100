"""The CRDs in crds/: generated from the models, structural, and in step with the models.

- the files equal what `python -m llmray.crdgen` renders (`UPDATE_GOLDEN=1` rewrites them);
- the openAPIV3Schema is structural (what a real apiserver demands of a v1 CRD);
- an emulated apiserver (prune nulls, apply defaults, strict schema validation, CEL rules
  evaluated by a real CEL implementation) accepts and rejects the same resources as
  `parse_finetunejob` / `parse_llmdeployment`, rule by rule;
- kubernetes-validate accepts the files as CustomResourceDefinitions.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import kubernetes_validate
import pytest
import re2
import yaml

from llmray import crdgen
from llmray.api import SpecError, parse_finetunejob, parse_llmdeployment
from llmray.api.finetunejob import FineTuneJob
from llmray.api.llmdeployment import LLMDeployment
from llmray.api.validation import FINETUNEJOB_RULES, LLMDEPLOYMENT_RULES, CrossFieldRule

REPO = Path(__file__).resolve().parent.parent
CRDS = REPO / "crds"
KINDS = ["FineTuneJob", "LLMDeployment"]
MODELS = {"FineTuneJob": FineTuneJob, "LLMDeployment": LLMDeployment}
PARSERS = {"FineTuneJob": parse_finetunejob, "LLMDeployment": parse_llmdeployment}
RULES = {"FineTuneJob": FINETUNEJOB_RULES, "LLMDeployment": LLMDEPLOYMENT_RULES}
TYPES = {"object", "array", "string", "integer", "number", "boolean"}
DELETE = object()


def openapi(kind: str) -> dict[str, Any]:
    return crdgen.render_crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def nodes(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node with its path, e.g. ("spec.compute.tolerations[]", {...})."""
    yield path, schema
    for name, sub in schema.get("properties", {}).items():
        yield from nodes(sub, f"{path}.{name}" if path else name)
    if isinstance(schema.get("additionalProperties"), dict):
        yield from nodes(schema["additionalProperties"], f"{path}.*")
    if "items" in schema:
        yield from nodes(schema["items"], f"{path}[]")


def node_at(schema: dict[str, Any], dotted: str) -> dict[str, Any]:
    for part in filter(None, dotted.split(".")):
        schema = schema["properties"][part]
    return schema


def value_at(obj: Any, dotted: str) -> Any:
    for part in filter(None, dotted.split(".")):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


# -- (a) the files are generated -----------------------------------------------------------


def test_crd_files_are_up_to_date() -> None:
    rendered = {name: crdgen.to_yaml(crd) for name, crd in crdgen.render_crds().items()}
    assert set(rendered) == {"llmray.io_finetunejobs.yaml", "llmray.io_llmdeployments.yaml"}
    if os.environ.get("UPDATE_GOLDEN") == "1":
        CRDS.mkdir(exist_ok=True)
        for name, text in rendered.items():
            (CRDS / name).write_text(text)
            (REPO / "helm" / "llmray" / "crds" / name).write_text(text)  # the chart's copy
    for name, text in rendered.items():
        path = CRDS / name
        assert path.exists() and path.read_text() == text, (
            f"{path} is out of date: run `python -m llmray.crdgen` (or UPDATE_GOLDEN=1 pytest)"
        )
        assert text.startswith(crdgen.HEADER)
        assert yaml.safe_load(text) == crdgen.render_crd(
            "FineTuneJob" if "finetunejobs" in name else "LLMDeployment"
        )


def test_api_reference_is_up_to_date() -> None:
    from llmray import apidocs

    path = REPO / "docs" / "api.md"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.write_text(apidocs.render())
    assert path.read_text() == apidocs.render(), (
        "docs/api.md is out of date: run `python -m llmray.apidocs` (or UPDATE_GOLDEN=1 pytest)"
    )
    # Every spec field of both kinds is documented.
    for kind in KINDS:
        for dotted, _node in nodes(openapi(kind)):
            if dotted.startswith("spec.") and not dotted.endswith("[]") and ".*" not in dotted:
                assert f"`{dotted}`" in path.read_text(), f"{dotted} missing from docs/api.md"


def test_crdgen_cli_writes_and_checks(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert crdgen.main(["--check", "--out", str(tmp_path)]) == 1
    assert "out of date" in capsys.readouterr().err
    assert crdgen.main(["--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(crdgen.render_crds())
    assert crdgen.main(["--check", "--out", str(tmp_path)]) == 0
    (tmp_path / "llmray.io_finetunejobs.yaml").write_text(crdgen.HEADER + "edited: by hand\n")
    assert crdgen.main(["--check", "--out", str(tmp_path)]) == 1


def test_names_versions_and_columns() -> None:
    ftj, llmd = crdgen.render_crd("FineTuneJob"), crdgen.render_crd("LLMDeployment")
    assert ftj["metadata"]["name"] == "finetunejobs.llmray.io"
    assert llmd["metadata"]["name"] == "llmdeployments.llmray.io"
    assert ftj["spec"]["names"] == {
        "kind": "FineTuneJob",
        "listKind": "FineTuneJobList",
        "plural": "finetunejobs",
        "singular": "finetunejob",
        "shortNames": ["ftj"],
        "categories": ["llmray"],
    }
    assert llmd["spec"]["names"]["shortNames"] == ["llmd"]
    assert llmd["spec"]["names"]["singular"] == "llmdeployment"
    for crd in (ftj, llmd):
        assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
        assert crd["spec"]["group"] == "llmray.io" and crd["spec"]["scope"] == "Namespaced"
        (version,) = crd["spec"]["versions"]
        assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", 1, 1)
        assert version["subresources"] == {"status": {}}
    columns = {
        kind: [(c["name"], c["type"], c["jsonPath"]) for c in crd["spec"]["versions"][0][cols]]
        for kind, crd, cols in (
            ("ftj", ftj, "additionalPrinterColumns"),
            ("llmd", llmd, "additionalPrinterColumns"),
        )
    }
    assert columns["ftj"] == [
        ("Phase", "string", ".status.phase"),
        ("Step", "integer", ".status.progress.step"),
        ("Loss", "number", ".status.progress.trainLoss"),
        ("Age", "date", ".metadata.creationTimestamp"),
    ]
    assert columns["llmd"] == [
        ("Phase", "string", ".status.phase"),
        ("Model", "string", ".status.modelUri"),
        ("Endpoint", "string", ".status.endpoint"),
        ("Age", "date", ".metadata.creationTimestamp"),
    ]
    # Every column points at a field of the schema with the column's type.
    for kind, crd in (("FineTuneJob", ftj), ("LLMDeployment", llmd)):
        for column in crd["spec"]["versions"][0]["additionalPrinterColumns"]:
            if column["jsonPath"].startswith(".status."):
                node = node_at(openapi(kind), column["jsonPath"])
                assert node["type"] == column["type"]


# -- (b) structural schema ------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_schema_is_structural(kind: str) -> None:
    schema = openapi(kind)
    assert schema["properties"]["metadata"] == {"type": "object"}
    assert schema["properties"]["apiVersion"]["type"] == "string"
    assert schema["properties"]["kind"]["type"] == "string"
    assert "spec" in schema["required"]
    for path, node in nodes(schema):
        assert not {"$ref", "$defs", "title", "oneOf", "allOf", "not", "nullable"} & set(node), path
        if node.get("x-kubernetes-int-or-string"):
            assert "type" not in node, path
            assert node.get("anyOf", [{"type": "integer"}, {"type": "string"}]) == [
                {"type": "integer"},
                {"type": "string"},
            ], path
        else:
            assert "anyOf" not in node, path
            assert node.get("type") in TYPES, f"{path}: no type"
        if node.get("type") == "object":
            assert not ("properties" in node and "additionalProperties" in node), path
            assert (
                "properties" in node
                or "additionalProperties" in node
                or node.get("x-kubernetes-preserve-unknown-fields") is True
                or path == "metadata"
            ), f"{path}: an object with nothing in it would be pruned empty"
            for name, sub in node.get("properties", {}).items():
                child = f"{path}.{name}" if path else name
                if child != "metadata":
                    assert sub.get("description", "").strip(), f"{child}: no description"
            for name in node.get("required", []):
                assert name in node["properties"], f"{path}: required {name} is not a property"
        if node.get("x-kubernetes-list-type") == "map":
            for key in node["x-kubernetes-list-map-keys"]:
                assert key in node["items"]["required"], path
        if "exclusiveMinimum" in node:
            assert node["exclusiveMinimum"] is True and "minimum" in node, path
        if "exclusiveMaximum" in node:
            assert node["exclusiveMaximum"] is True and "maximum" in node, path
        if "pattern" in node:
            re2.compile(node["pattern"])  # the apiserver's regexps are RE2 (Go)


def test_value_from_is_typed() -> None:
    """spec.env[].valueFrom is core/v1 EnvVarSource's four sources, exactly one, nothing else
    (an open object would let anything through to the pods)."""
    node = node_at(openapi("FineTuneJob"), "spec.env")["items"]["properties"]["valueFrom"]
    assert set(node["properties"]) == {
        "secretKeyRef",
        "configMapKeyRef",
        "fieldRef",
        "resourceFieldRef",
    }
    assert (node["minProperties"], node["maxProperties"]) == (1, 1)
    assert "x-kubernetes-preserve-unknown-fields" not in node


def test_maps_are_maps_of_strings() -> None:
    node = node_at(openapi("FineTuneJob"), "spec.compute.nodeSelector")
    assert node["type"] == "object" and node["additionalProperties"]["type"] == "string"


@pytest.mark.parametrize("kind", KINDS)
def test_spec_strings_lists_and_maps_are_bounded(kind: str) -> None:
    """CEL cost estimates price an unbounded string, list or map as if it filled a 3 MB
    request; bounds keep every rule (and any later one) within the apiserver's budget."""
    for path, node in nodes(openapi(kind)["properties"]["spec"], "spec"):
        if node.get("type") == "string" and "enum" not in node:
            assert "maxLength" in node, f"{path}: unbounded string"
        if node.get("type") == "array":
            assert "maxItems" in node, f"{path}: unbounded list"
        if node.get("type") == "object" and "additionalProperties" in node:
            assert "maxProperties" in node, f"{path}: unbounded map"


@pytest.mark.parametrize("kind", KINDS)
def test_defaults_are_valid_and_outside_status(kind: str) -> None:
    for path, node in nodes(openapi(kind)):
        if "default" in node:
            assert not path.startswith("status"), path
            assert node["default"] is not None, path
            jsonschema.Draft4Validator(strict(node)).validate(node["default"])


# -- the emulated apiserver ----------------------------------------------------------------


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema as a JSON-schema validator should see it: unknown fields are errors (kubectl's
    default server-side field validation, Strict). OpenAPI's `exclusiveMinimum: true` and
    int-or-string's anyOf already read the same in draft 4."""
    schema = copy.deepcopy(schema)
    for _, node in nodes(schema):
        if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
    return schema


def prune_nulls(obj: Any, schema: dict[str, Any] | None) -> None:
    """apiextensions' PruneNonNullableNullsWithoutDefaults: `maxSteps: null` is dropped."""
    if isinstance(obj, dict):
        for key in list(obj):
            sub = None
            if schema is not None:
                sub = schema.get("properties", {}).get(key)
                if sub is None and isinstance(schema.get("additionalProperties"), dict):
                    sub = schema["additionalProperties"]
            if obj[key] is None and sub is not None and not sub.get("nullable"):
                if "default" not in sub:
                    del obj[key]
            else:
                prune_nulls(obj[key], sub)
    elif isinstance(obj, list):
        for item in obj:
            prune_nulls(item, schema.get("items") if schema else None)


def apply_defaults(obj: Any, schema: dict[str, Any]) -> None:
    """apiextensions' structural defaulting: missing (or null) fields get their default,
    then nested objects -- including defaulted ones -- get theirs."""
    if isinstance(obj, dict):
        properties = schema.get("properties", {})
        for key, sub in properties.items():
            if "default" in sub and obj.get(key) is None:
                obj[key] = copy.deepcopy(sub["default"])
        for key, value in obj.items():
            sub = properties.get(key)
            if sub is None and isinstance(schema.get("additionalProperties"), dict):
                sub = schema["additionalProperties"]
            if sub is not None:
                apply_defaults(value, sub)
    elif isinstance(obj, list) and "items" in schema:
        for item in obj:
            apply_defaults(item, schema["items"])


@cache
def cel_program(expression: str) -> celpy.Runner:
    env = celpy.Environment()
    return env.program(env.compile(expression))


def cel(expression: str, self: Any, old_self: Any = None) -> bool:
    activation = {"self": celpy.json_to_cel(self)}
    if old_self is not None:
        activation["oldSelf"] = celpy.json_to_cel(old_self)
    result = cel_program(expression).evaluate(activation)
    assert isinstance(result, celpy.celtypes.BoolType), (expression, result)
    return bool(result)


def rules_in(schema: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for path, node in nodes(schema):
        for rule in node.get("x-kubernetes-validations", []):
            yield path, rule


def admit(kind: str, obj: dict[str, Any]) -> tuple[dict[str, Any], list[str], list[str]]:
    """What a create does to `obj`: (stored object, schema errors, CEL rule messages)."""
    schema = openapi(kind)
    obj = copy.deepcopy(obj)
    prune_nulls(obj, schema)
    apply_defaults(obj, schema)
    schema_errors = [
        ".".join(map(str, e.absolute_path)) + ": " + e.message
        for e in jsonschema.Draft4Validator(strict(schema)).iter_errors(obj)
    ]
    messages = []
    if not schema_errors:  # CEL sees typed values only once the schema holds
        for path, rule in rules_in(schema):
            scope = value_at(obj, path)
            if "oldSelf" not in rule["rule"] and scope is not None and not cel(rule["rule"], scope):
                messages.append(rule["message"])
    return obj, schema_errors, messages


# -- samples: valid and invalid, by schema and by rule -------------------------------------

FINETUNEJOB: dict[str, Any] = {
    "apiVersion": "llmray.io/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "demo"},
    "spec": {
        "baseModel": {"uri": "hf://org/model"},
        "dataset": {"train": "s3://bucket/train.jsonl"},
    },
}
LLMDEPLOYMENT: dict[str, Any] = {
    "apiVersion": "llmray.io/v1alpha1",
    "kind": "LLMDeployment",
    "metadata": {"name": "demo"},
    "spec": {"model": {"uri": "s3://bucket/model"}},
}
BASES = {"FineTuneJob": FINETUNEJOB, "LLMDeployment": LLMDEPLOYMENT}
FULL_FINETUNEJOB = {
    "spec.baseModel": {"uri": "hf://org/m", "revision": "main", "secretRef": {"name": "hf"}},
    "spec.dataset": {
        "train": "s3://b/train.jsonl",
        "eval": "s3://b/test.jsonl",
        "format": "chat",
        "specialTokens": ["<A>", "</A>"],
        "maxSeqLength": 1024,
        "maskPrompt": False,
    },
    "spec.method": "lora",
    "spec.lora": {"rank": 8, "alpha": 16, "dropout": 0.0, "targetModules": ["q_proj"]},
    "spec.hyperparameters": {
        "epochs": 2,
        "maxSteps": None,
        "learningRate": 2.0e-5,
        "batchSizePerWorker": 16,
        "warmupRatio": 0.03,
        "precision": "bf16",
        "gradientCheckpointing": True,
    },
    "spec.strategy": {"type": "deepspeed", "zeroStage": 3, "offloadOptimizer": True},
    "spec.compute": {
        "accelerator": "nvidia-gpu",
        "workers": 6,
        "resourcesPerWorker": {"cpu": "8", "memory": "48Gi", "gpu": 1},
        "nodeSelector": {"pool": "gpu"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "rank0": {"nodeSelector": {"llmray.io/memory-class": "large"}, "memory": "280Gi"},
    },
    "spec.checkpointing": {"storageUri": "s3://b/runs", "everySteps": 500, "keep": 2},
    "spec.output": {"uri": "s3://b/models/x", "mergeLora": True},
    "spec.maxRetries": 2,
    "spec.activeDeadlineSeconds": 86400,
    "spec.image": "",
    "spec.env": [
        {"name": "A", "value": "1"},
        {"name": "B", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
        {
            "name": "C",
            "valueFrom": {"configMapKeyRef": {"name": "c", "key": "k", "optional": True}},
        },
        {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {
            "name": "MEM",
            "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}},
        },
    ],
    "status": {
        "phase": "Running",
        "conditions": [{"type": "Ready", "status": "False", "reason": "Training"}],
        "observedGeneration": 1,
        "progress": {"epoch": 0, "step": 3, "totalSteps": 10, "trainLoss": 2.5},
        "model": {"uri": ""},
    },
}

EVAL_SPLIT = {"spec.dataset.evalFraction": 0.1}
SAMPLES: list[tuple[str, dict[str, Any]]] = [
    # valid
    ("FineTuneJob", {}),
    # spec.evaluation: valid, invalid by schema, by rule
    ("FineTuneJob", {**EVAL_SPLIT, "spec.evaluation": {}}),
    (
        "FineTuneJob",
        {
            "spec.evaluation": {
                "dataset": "s3://b/test.jsonl",
                "maxNewTokens": 16,
                "batchSize": 4,
                "sampling": {"temperature": 0.7, "topP": 0.9, "seed": 3},
                "metrics": [
                    {"name": "exactMatch"},
                    {"name": "contains"},
                    {"name": "answer", "regex": "#### (\\d+)"},
                    {"name": "loss"},
                    {"name": "perplexity"},
                ],
                "baseline": True,
            },
            "status": {"evaluation": {"exactMatch": 0.4, "baseline": {"exactMatch": 0.1}}},
        },
    ),
    (
        "FineTuneJob",
        {
            **EVAL_SPLIT,
            "spec.dataset.format": "text",
            "spec.evaluation": {"metrics": [{"name": "loss"}, {"name": "perplexity"}]},
        },
    ),
    ("FineTuneJob", {**EVAL_SPLIT, "spec.evaluation": {"metrics": []}}),
    ("FineTuneJob", {**EVAL_SPLIT, "spec.evaluation": {"maxNewTokens": 0}}),
    ("FineTuneJob", {**EVAL_SPLIT, "spec.evaluation": {"metrics": [{"name": "a b"}]}}),
    ("FineTuneJob", {**EVAL_SPLIT, "spec.evaluation": {"sampling": {"temperature": -1}}}),
    ("FineTuneJob", {"spec.evaluation": {}}),
    ("FineTuneJob", {**EVAL_SPLIT, "spec.evaluation": {"metrics": [{"name": "answer"}]}}),
    ("FineTuneJob", {**EVAL_SPLIT, "spec.evaluation": {"metrics": [{"name": "baseline"}]}}),
    (
        "FineTuneJob",
        {**EVAL_SPLIT, "spec.evaluation": {"metrics": [{"name": "loss"}, {"name": "loss"}]}},
    ),
    ("FineTuneJob", {**EVAL_SPLIT, "spec.dataset.format": "text", "spec.evaluation": {}}),
    (
        "FineTuneJob",
        {
            **EVAL_SPLIT,
            "spec.dataset.format": "text",
            "spec.evaluation": {"metrics": [{"name": "a", "regex": "(x)"}]},
        },
    ),
    ("LLMDeployment", {"spec.model": {"fineTuneJobRef": {"name": "j"}, "minEvaluation": {"a": 1}}}),
    ("LLMDeployment", {"spec.model": {"uri": "s3://b/m", "minEvaluation": {"a": 1}}}),
    ("FineTuneJob", FULL_FINETUNEJOB),
    ("FineTuneJob", {"spec.hyperparameters.maxSteps": None, "spec.lora": None}),
    ("FineTuneJob", {"spec.compute.resourcesPerWorker": {"cpu": 2, "memory": 4096}}),
    ("FineTuneJob", {"spec.compute.resourcesPerWorker": {"cpu": "500m", "memory": "1.5Gi"}}),
    # invalid by schema
    ("FineTuneJob", {"spec.env": [{"name": "P", "valueFrom": {"podRef": {"name": "x"}}}]}),
    ("FineTuneJob", {"spec.env": [{"name": "E", "valueFrom": {}}]}),
    (
        "FineTuneJob",
        {
            "spec.env": [
                {
                    "name": "TWO",
                    "valueFrom": {
                        "secretKeyRef": {"name": "s", "key": "k"},
                        "configMapKeyRef": {"name": "c", "key": "k"},
                    },
                }
            ]
        },
    ),
    (
        "FineTuneJob",
        {
            "spec.env": [
                {"name": "BOTH", "value": "1", "valueFrom": {"fieldRef": {"fieldPath": "x"}}}
            ]
        },
    ),
    ("FineTuneJob", {"spec.env": [{"name": "K", "valueFrom": {"secretKeyRef": {"name": "s"}}}]}),
    ("FineTuneJob", {"spec.dataset.format": "csv"}),
    ("FineTuneJob", {"spec.method": "fsdp"}),
    ("FineTuneJob", {"spec.method": True}),
    ("FineTuneJob", {"spec.bogus": 1}),
    ("FineTuneJob", {"spec.compute.gpus": 1}),
    ("FineTuneJob", {"spec.dataset": DELETE}),
    ("FineTuneJob", {"spec.baseModel": {"revision": "main"}}),
    ("FineTuneJob", {"spec.baseModel.uri": "ftp://host/model"}),
    ("FineTuneJob", {"spec.dataset.train": "has space"}),
    ("FineTuneJob", {"spec.dataset.evalFraction": 0}),
    ("FineTuneJob", {"spec.dataset.evalFraction": 1}),
    ("FineTuneJob", {"spec.dataset.evalFraction": 0.2}),
    ("FineTuneJob", {"spec.hyperparameters.learningRate": 0}),
    ("FineTuneJob", {"spec.hyperparameters.epochs": 1.5}),
    ("FineTuneJob", {"spec.hyperparameters.warmupRatio": 1}),
    ("FineTuneJob", {"spec.compute.workers": 0}),
    ("FineTuneJob", {"spec.compute.workers": 4097}),
    ("FineTuneJob", {"spec.strategy": {"type": "deepspeed", "zeroStage": 4}}),
    ("FineTuneJob", {"spec.compute.resourcesPerWorker.cpu": "8 cores"}),
    ("FineTuneJob", {"spec.compute.rank0": {"memory": "lots"}}),
    ("FineTuneJob", {"spec.compute.tolerations": [{"effect": "Sometimes"}]}),
    ("FineTuneJob", {"spec.compute.tolerations": [{}] * 65}),
    ("FineTuneJob", {"spec.compute.nodeSelector": {"zone": "z" * 64}}),
    ("FineTuneJob", {"spec.compute.nodeSelector": {f"k{i}": "v" for i in range(65)}}),
    ("FineTuneJob", {"spec.image": "i" * 1025}),
    ("FineTuneJob", {"spec.dataset.specialTokens": ["t" * 257]}),
    ("FineTuneJob", {"spec.method": "lora", "spec.lora": {"targetModules": []}}),
    ("FineTuneJob", {"spec.method": "lora", "spec.lora": {"rank": 2000}}),
    ("FineTuneJob", {"spec.method": "lora", "spec.lora": {"dropout": 1}}),
    ("FineTuneJob", {"spec.maxRetries": -1}),
    ("FineTuneJob", {"spec.env": [{"name": ""}]}),
    ("FineTuneJob", {"spec.env": [{"value": "no name"}]}),
    ("FineTuneJob", {"status": {"phase": "Exploded"}}),
    ("FineTuneJob", {"status": {"conditions": [{"type": "Ready"}]}}),
    # by rule (valid and invalid), alone and together
    ("FineTuneJob", {"spec.lora": {}}),
    ("FineTuneJob", {"spec.method": "full", "spec.lora": {"rank": 4}}),
    ("FineTuneJob", {"spec.method": "lora", "spec.lora": {}}),
    ("FineTuneJob", {"spec.method": "qlora", "spec.lora": {}}),
    ("FineTuneJob", {"spec.method": "qlora", "spec.compute.accelerator": "intel-gpu"}),
    ("FineTuneJob", {"spec.method": "qlora", "spec.compute.accelerator": "nvidia-gpu"}),
    ("FineTuneJob", {"spec.strategy.zeroStage": 2}),
    ("FineTuneJob", {"spec.strategy": {"type": "ddp", "zeroStage": 1}}),
    ("FineTuneJob", {"spec.strategy": {"type": "deepspeed", "zeroStage": 1}}),
    ("FineTuneJob", {"spec.strategy": {"type": "deepspeed"}}),
    ("FineTuneJob", {"spec.strategy": {"zeroStage": None}}),
    ("FineTuneJob", {"spec.strategy.offloadOptimizer": True}),
    ("FineTuneJob", {"spec.strategy": {"type": "deepspeed", "offloadOptimizer": True}}),
    ("FineTuneJob", {"spec.strategy": {"offloadOptimizer": False, "offloadParameters": False}}),
    ("FineTuneJob", {"spec.strategy": {"type": "deepspeed", "offloadParameters": True}}),
    (
        "FineTuneJob",
        {"spec.strategy": {"type": "deepspeed", "zeroStage": 2, "offloadParameters": True}},
    ),
    (
        "FineTuneJob",
        {"spec.strategy": {"type": "deepspeed", "zeroStage": 3, "offloadParameters": True}},
    ),
    ("FineTuneJob", {"spec.strategy": {"type": "ddp", "offloadParameters": True}}),
    ("FineTuneJob", {"spec.strategy": {"zeroTuning": {"maxLiveParameters": 10}}}),
    (
        "FineTuneJob",
        {"spec.strategy": {"type": "deepspeed", "zeroTuning": {"reduceBucketSize": 10}}},
    ),
    ("FineTuneJob", {"spec.baseModel.parameters": 6738415616}),
    ("FineTuneJob", {"spec.baseModel.parameters": 0}),
    ("FineTuneJob", {"spec.dataset.eval": "s3://b/e.jsonl", "spec.dataset.evalFraction": 0.1}),
    ("FineTuneJob", {"spec.dataset.eval": None, "spec.dataset.evalFraction": 0.1}),
    ("FineTuneJob", {"spec.compute": {"accelerator": "nvidia-gpu", "ipex": True}}),
    ("FineTuneJob", {"spec.compute": {"accelerator": "intel-gpu", "ipex": True}}),
    ("FineTuneJob", {"spec.compute": {"ipex": True}}),
    ("FineTuneJob", {"spec.hyperparameters.precision": "fp16"}),
    ("FineTuneJob", {"spec.hyperparameters.precision": "fp16", "spec.compute.accelerator": "cpu"}),
    (
        "FineTuneJob",
        {"spec.hyperparameters.precision": "fp16", "spec.compute.accelerator": "intel-gpu"},
    ),
    ("FineTuneJob", {"spec.hyperparameters": {"torchCompile": True}}),
    ("FineTuneJob", {"spec.hyperparameters.torchCompile": True, "spec.strategy.type": "deepspeed"}),
    (
        "FineTuneJob",
        {
            "spec.method": "qlora",
            "spec.strategy": {"zeroStage": 3, "offloadParameters": True},
            "spec.hyperparameters": {"precision": "fp16", "torchCompile": True},
            "spec.compute": {"accelerator": "nvidia-gpu", "ipex": True},
        },
    ),
    # LLMDeployment: valid
    ("LLMDeployment", {}),
    (
        "LLMDeployment",
        {
            "spec.model": {"fineTuneJobRef": {"name": "job"}, "servedName": "m"},
            "spec.engine": "vllm",
            "spec.compute": {
                "accelerator": "nvidia-gpu",
                "resourcesPerReplica": {"cpu": "4", "memory": "16Gi", "gpu": 1},
            },
            "spec.scaling": {"minReplicas": 0, "maxReplicas": 4, "targetOngoingRequests": 1.5},
            "spec.generation": {"maxNewTokens": 64, "temperature": 0, "topP": 1},
            "spec.apiKeySecretRef": {"name": "key"},
            "status": {"phase": "Ready", "endpoint": "http://x:8000/v1", "modelUri": "s3://m"},
        },
    ),
    # LLMDeployment: invalid by schema
    ("LLMDeployment", {"spec.engine": "tgi"}),
    ("LLMDeployment", {"spec.scaling.maxReplicas": 0}),
    ("LLMDeployment", {"spec.generation.temperature": 3}),
    ("LLMDeployment", {"spec.generation.topP": 0}),
    ("LLMDeployment", {"spec.model": {"fineTuneJobRef": {}}}),
    ("LLMDeployment", {"spec.model.servedName": "n" * 254}),
    ("LLMDeployment", {"spec.maxOngoingRequests": 0}),
    ("LLMDeployment", {"spec.replicas": 2}),
    ("LLMDeployment", {"spec.apiKeySecretRef": {"key": "k"}}),
    ("LLMDeployment", {"status": {"phase": "Serving"}}),
    # LLMDeployment: by rule
    ("LLMDeployment", {"spec.model": {}}),
    ("LLMDeployment", {"spec.model.fineTuneJobRef": {"name": "job"}}),
    ("LLMDeployment", {"spec.model": {"uri": None, "fineTuneJobRef": {"name": "job"}}}),
    ("LLMDeployment", {"spec.engine": "vllm"}),
    ("LLMDeployment", {"spec.engine": "vllm", "spec.compute.accelerator": "intel-gpu"}),
    ("LLMDeployment", {"spec.engine": "transformers"}),
    ("LLMDeployment", {"spec.compute": {"accelerator": "nvidia-gpu", "ipex": True}}),
    ("LLMDeployment", {"spec.compute": {"accelerator": "cpu", "ipex": True}}),
    ("LLMDeployment", {"spec.scaling": {"minReplicas": 3, "maxReplicas": 2}}),
    ("LLMDeployment", {"spec.scaling": {"minReplicas": 2}}),
    ("LLMDeployment", {"spec.scaling": {"maxReplicas": 3}}),
    ("LLMDeployment", {"spec.scaling": {"minReplicas": 4, "maxReplicas": 4}}),
    (
        "LLMDeployment",
        {
            "spec.model": {"uri": "s3://b/m", "fineTuneJobRef": {"name": "j"}},
            "spec.engine": "vllm",
            "spec.scaling": {"minReplicas": 9},
        },
    ),
    # LLMDeployment adapters: valid
    (
        "LLMDeployment",
        {
            "spec.adapters": [
                {
                    "name": "support-v3",
                    "fineTuneJobRef": {"name": "j"},
                    "minEvaluation": {"a": 0.3},
                },
                {"name": "legal", "uri": "s3://b/adapters/legal"},
            ],
            "spec.maxLoadedAdapters": 2,
            "spec.maxAdapterRank": 64,
            "status": {
                "adapters": [
                    {"name": "legal", "ready": True, "uri": "s3://b/adapters/legal"},
                    {"name": "support-v3", "reason": "FineTuneJobRunning", "message": "waiting"},
                ]
            },
        },
    ),
    ("LLMDeployment", {"spec.adapters": []}),
    ("LLMDeployment", {"spec.maxLoadedAdapters": 1}),
    # ... invalid by schema
    ("LLMDeployment", {"spec.adapters": [{"uri": "s3://b/a"}]}),
    ("LLMDeployment", {"spec.adapters": [{"name": "has space", "uri": "s3://b/a"}]}),
    ("LLMDeployment", {"spec.adapters": [{"name": "-lead", "uri": "s3://b/a"}]}),
    ("LLMDeployment", {"spec.adapters": [{"name": "a" * 129, "uri": "s3://b/a"}]}),
    ("LLMDeployment", {"spec.adapters": [{"name": "a", "uri": "ftp://b/a"}]}),
    ("LLMDeployment", {"spec.adapters": [{"name": "a", "uri": "s3://b/a", "secretRef": {}}]}),
    (
        "LLMDeployment",
        {"spec.adapters": [{"name": f"a{i}", "uri": "s3://b/a"} for i in range(129)]},
    ),
    ("LLMDeployment", {"spec.maxLoadedAdapters": 0}),
    ("LLMDeployment", {"spec.maxAdapterRank": 12}),
    (
        "LLMDeployment",
        {
            "spec.adapters": [
                {"name": "a", "fineTuneJobRef": {"name": "j"}, "minEvaluation": {"x": "high"}}
            ]
        },
    ),
    # ... by rule
    ("LLMDeployment", {"spec.adapters": [{"name": "a"}]}),
    (
        "LLMDeployment",
        {"spec.adapters": [{"name": "a", "uri": "s3://b/a", "fineTuneJobRef": {"name": "j"}}]},
    ),
    (
        "LLMDeployment",
        {"spec.adapters": [{"name": "a", "uri": "s3://b/a"}, {"name": "a", "uri": "s3://b/c"}]},
    ),
    (
        "LLMDeployment",
        {"spec.adapters": [{"name": "a", "uri": "s3://b/a", "minEvaluation": {"answer": 0.3}}]},
    ),
    ("LLMDeployment", {"spec.adapters": [{"name": "demo", "uri": "s3://b/a"}]}),
    (
        "LLMDeployment",
        {"spec.model.servedName": "base", "spec.adapters": [{"name": "demo", "uri": "s3://b/a"}]},
    ),
    (
        "LLMDeployment",
        {"spec.model.servedName": "base", "spec.adapters": [{"name": "base", "uri": "s3://b/a"}]},
    ),
    (
        "LLMDeployment",
        {
            "spec.adapters": [
                {"name": "demo"},
                {"name": "demo", "uri": "s3://b/a", "minEvaluation": {"m": 1}},
            ]
        },
    ),
    ("LLMDeployment", {"spec.dtype": "float16"}),
    ("LLMDeployment", {"spec.dtype": "fp8"}),
    ("LLMDeployment", {"spec.quantization": "int8"}),
]


def patched(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    obj = copy.deepcopy(base)
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = obj
        for part in parents:
            node = node.setdefault(part, {})
        if value is DELETE:
            node.pop(last, None)
        else:
            node[last] = copy.deepcopy(value)
    return obj


def all_samples() -> list[tuple[str, dict[str, Any]]]:
    samples = [(kind, patched(BASES[kind], changes)) for kind, changes in SAMPLES]
    for path in sorted((REPO / "examples").rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") in KINDS:
                samples.append((doc["kind"], doc))
    return samples


def sample_id(sample: tuple[str, dict[str, Any]]) -> str:
    return f"{sample[0]}-{abs(hash(repr(sample[1]))) % 10**6}"


def python_errors(kind: str, obj: dict[str, Any]) -> list[str]:
    try:
        PARSERS[kind](obj)
    except SpecError as exc:
        return [str(e) for e in exc.errors]
    return []


# -- (c) the schema accepts what the models accept ------------------------------------------


@pytest.mark.parametrize("sample", all_samples(), ids=sample_id)
def test_schema_agrees_with_models(sample: tuple[str, dict[str, Any]]) -> None:
    kind, obj = sample
    _, schema_errors, _ = admit(kind, obj)
    try:
        MODELS[kind].model_validate(obj)
        model_ok = True
    except ValueError:
        model_ok = False
    assert model_ok == (not schema_errors), schema_errors


@pytest.mark.parametrize("kind", KINDS)
def test_crd_defaults_are_the_model_defaults(kind: str) -> None:
    """What the apiserver stores for a minimal resource parses to what llmray reads."""
    stored, errors, messages = admit(kind, BASES[kind])
    assert not errors and not messages
    assert MODELS[kind].model_validate(stored) == MODELS[kind].model_validate(BASES[kind])
    # ...and every default the models have is visible in the stored object.
    dumped = MODELS[kind].model_validate(BASES[kind]).model_dump(by_alias=True, mode="json")

    def has_defaults(expected: Any, got: Any, path: str) -> None:
        if isinstance(expected, dict):
            for key, value in expected.items():
                if value is None or value == [] or value == {}:
                    continue
                assert isinstance(got, dict) and key in got, f"{path}.{key}: no CRD default"
                has_defaults(value, got[key], f"{path}.{key}")
        else:
            assert expected == got, path

    has_defaults(dumped["spec"], stored["spec"], "spec")


# -- (d) the CEL rules are the Python rules --------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_every_rule_is_in_the_crd_at_its_scope(kind: str) -> None:
    schema = openapi(kind)
    for rule in RULES[kind]:
        entries = node_at(schema, rule.scope).get("x-kubernetes-validations", [])
        (entry,) = [e for e in entries if e["rule"] == rule.cel]
        assert entry["message"] == f"{rule.path}: {rule.message}"
        if "fieldPath" in entry:
            assert rule.scope + entry["fieldPath"] == rule.path
            node_at(schema, rule.path)  # the apiserver rejects a fieldPath to nowhere
    expected = len(RULES[kind]) + (kind == "FineTuneJob")
    assert len(list(rules_in(schema))) == expected


# CEL's list macros: `self.adapters.all(a, a.name != "")` reads adapters[].name through `a`.
_MACRO = re.compile(r"\b(\w+)((?:\.\w+)+)\.(?:all|exists|exists_one|map|filter)\(\s*(\w+)\s*,")
_FIELDS = re.compile(r"\b(\w+)((?:\.[A-Za-z_]\w*)+)(\()?")
# The only metadata a CRD's root rules may read (the apiserver supplies their schema).
ROOT_METADATA = ("metadata.name", "metadata.generateName")


def cel_fields(expression: str) -> Iterator[str]:
    """The field paths a rule reads, relative to its node (`adapters[].name`); method names
    (`.all(`) are not fields."""
    roots = {"self": "", "oldSelf": ""}
    for match in _MACRO.finditer(expression):
        if match.group(1) in roots:
            roots[match.group(3)] = roots[match.group(1)] + match.group(2) + "[]"
    for match in _FIELDS.finditer(expression):
        if match.group(1) not in roots:
            continue
        parts = match.group(2).split(".")[1:]
        if match.group(3):  # a method call: its receiver is the field
            parts = parts[:-1]
        yield ".".join([p for p in [roots[match.group(1)].lstrip("."), *parts] if p])


def node_for(schema: dict[str, Any], dotted: str) -> dict[str, Any]:
    for part in filter(None, dotted.split(".")):
        name, items = part.removesuffix("[]"), part.endswith("[]")
        schema = schema["properties"][name]
        if items:
            schema = schema["items"]
    return schema


@pytest.mark.parametrize("kind", KINDS)
def test_rules_name_only_fields_of_the_schema(kind: str) -> None:
    """The apiserver type-checks CEL against the schema; celpy does not, so check here."""
    schema = openapi(kind)
    for path, entry in rules_in(schema):
        for field in cel_fields(entry["rule"]):
            if path == "" and field in ROOT_METADATA:
                continue
            node_for(node_at(schema, path), field)


def test_the_rule_field_check_sees_macros_and_metadata() -> None:
    fields = list(
        cel_fields(
            "!has(self.spec.adapters) || self.spec.adapters.all(a, a.uri != "
            "self.metadata.name && a.fineTuneJobRef.name != '')"
        )
    )
    assert fields == [
        "spec.adapters",
        "spec.adapters",
        "spec.adapters[].uri",
        "metadata.name",
        "spec.adapters[].fineTuneJobRef.name",
    ]
    with pytest.raises(KeyError):
        node_for(openapi("LLMDeployment"), "spec.adapters[].url")


def rule_cases() -> Iterator[tuple[str, CrossFieldRule, dict[str, Any]]]:
    for kind, obj in all_samples():
        _, schema_errors, _ = admit(kind, obj)
        if schema_errors:
            continue
        for rule in RULES[kind]:
            yield kind, rule, obj


@pytest.mark.parametrize("kind", KINDS)
def test_cel_verdicts_equal_python_verdicts(kind: str) -> None:
    """Each rule, on every schema-valid sample: CEL on what the apiserver stores (nulls
    pruned, defaults applied) says what `CrossFieldRule.check` says on the raw object."""
    seen: dict[str, set[bool]] = {rule.cel: set() for rule in RULES[kind]}
    for _, rule, obj in (case for case in rule_cases() if case[0] == kind):
        stored, _, _ = admit(kind, obj)
        raw_scope = value_at(obj, rule.scope)
        python = rule.check(raw_scope) if isinstance(raw_scope, dict) else True
        verdict = cel(rule.cel, value_at(stored, rule.scope))
        assert verdict == python, (rule.path, rule.cel, obj["spec"])
        assert rule.check(value_at(stored, rule.scope)) == python, (rule.path, obj["spec"])
        seen[rule.cel].add(verdict)
    for expression, verdicts in seen.items():
        assert verdicts == {True, False}, f"no sample passes and fails: {expression}"


@pytest.mark.parametrize("sample", all_samples(), ids=sample_id)
def test_apiserver_and_llmray_reject_the_same(sample: tuple[str, dict[str, Any]]) -> None:
    kind, obj = sample
    _, schema_errors, cel_messages = admit(kind, obj)
    errors = python_errors(kind, obj)
    assert bool(errors) == bool(schema_errors or cel_messages), (errors, schema_errors)
    if not schema_errors:
        # Rule errors read the same from kubectl and from llmray.
        assert sorted(cel_messages) == sorted(errors)


def test_spec_is_immutable() -> None:
    schema = openapi("FineTuneJob")
    spec_rules = schema["properties"]["spec"]["x-kubernetes-validations"]
    (immutable,) = [r for r in spec_rules if "oldSelf" in r["rule"]]
    assert immutable == {"rule": "self == oldSelf", "message": crdgen.IMMUTABLE_SPEC_MESSAGE}
    assert "is immutable" in immutable["message"] and immutable["message"].startswith("spec")
    assert not [r for _, r in rules_in(openapi("LLMDeployment")) if "oldSelf" in r["rule"]]

    def stored_spec(changes: dict[str, Any]) -> dict[str, Any]:
        return admit("FineTuneJob", patched(FINETUNEJOB, changes))[0]["spec"]

    old = stored_spec({})
    assert cel(immutable["rule"], old, old)
    # Re-applying the same YAML with defaults spelled out is no change...
    assert cel(immutable["rule"], stored_spec({"spec.method": "full", "spec.strategy": {}}), old)
    # ...any edit is.
    for edit in (
        {"spec.hyperparameters.learningRate": 1e-4},
        {"spec.dataset.train": "s3://bucket/other.jsonl"},
        {"spec.compute.nodeSelector": {"a": "b"}},
        {"spec.env": [{"name": "X", "value": "1"}]},
    ):
        assert not cel(immutable["rule"], stored_spec(edit), old), edit


# -- (e) kubernetes-validate ----------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(crdgen.render_crds()))
def test_files_are_valid_customresourcedefinitions(name: str) -> None:
    for doc in yaml.safe_load_all((CRDS / name).read_text()):
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    broken = copy.deepcopy(crdgen.render_crds()[name])
    broken["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["type"] = 7
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, kubernetes_validate.latest_version(), strict=True)
