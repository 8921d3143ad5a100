"""The llmray.io/v1alpha1 models: defaults, every error at once by field path, each
cross-field rule, URI and quantity checks, unknown fields, YAML files named in errors."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmray.api import (
    FineTuneJob,
    LLMDeployment,
    SpecError,
    load_resource,
    parse_finetunejob,
    parse_llmdeployment,
    parse_resource,
)
from llmray.api.loader import load_documents

REPO = Path(__file__).resolve().parent.parent
DELETE = object()  # patch value: remove the key

FINETUNEJOB: dict[str, Any] = {
    "apiVersion": "llmray.io/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "demo", "namespace": "ml"},
    "spec": {
        "baseModel": {"uri": "hf://meta-llama/Llama-2-7b-hf"},
        "dataset": {"train": "s3://bucket/gsm8k/train.jsonl"},
    },
}
LLMDEPLOYMENT: dict[str, Any] = {
    "apiVersion": "llmray.io/v1alpha1",
    "kind": "LLMDeployment",
    "metadata": {"name": "demo"},
    "spec": {"model": {"uri": "s3://bucket/models/gsm8k-7b"}},
}

# The FineTuneJob of DESIGN.md, field for field (status left out: it is written, not applied).
DESIGN_FINETUNEJOB = """
apiVersion: llmray.io/v1alpha1
kind: FineTuneJob
metadata: {name: gsm8k-7b, namespace: ml}
spec:
  baseModel:
    uri: hf://meta-llama/Llama-2-7b-hf
    revision: main
    secretRef: {name: hf-token}
  dataset:
    train: s3://bucket/gsm8k/train.jsonl
    eval: s3://bucket/gsm8k/test.jsonl
    format: instruction
    specialTokens: ["<ASSISTANT>", "</ASSISTANT>", "<USER>", "</USER>"]
    maxSeqLength: 512
    maskPrompt: true
  method: lora
  lora: {rank: 8, alpha: 16, dropout: 0.05, targetModules: [q_proj, v_proj]}
  hyperparameters:
    epochs: 1
    maxSteps: null
    learningRate: 2.0e-5
    batchSizePerWorker: 16
    gradientAccumulationSteps: 1
    warmupRatio: 0.03
    weightDecay: 0.0
    lrScheduler: cosine
    seed: 42
    precision: bf16
    gradientCheckpointing: true
  strategy:
    type: deepspeed
    zeroStage: 3
    offloadOptimizer: true
    offloadParameters: false
  compute:
    accelerator: nvidia-gpu
    ipex: false
    workers: 6
    resourcesPerWorker: {cpu: "8", memory: 48Gi, gpu: 1}
    nodeSelector: {}
    tolerations: []
    rank0:
      nodeSelector: {llmray.io/memory-class: large}
      memory: 280Gi
  checkpointing:
    storageUri: s3://bucket/runs
    everySteps: 500
    keep: 2
  output:
    uri: s3://bucket/models/gsm8k-7b
    mergeLora: true
  maxRetries: 2
  activeDeadlineSeconds: 86400
  image: ""
  env: []
"""

DESIGN_LLMDEPLOYMENT = """
apiVersion: llmray.io/v1alpha1
kind: LLMDeployment
metadata: {name: gsm8k-7b, namespace: ml}
spec:
  model:
    uri: s3://bucket/models/gsm8k-7b
    servedName: gsm8k-7b
    secretRef: {name: s3-creds}
  engine: auto
  compute:
    accelerator: cpu
    ipex: true
    resourcesPerReplica: {cpu: "4", memory: 16Gi, gpu: 0}
    nodeSelector: {}
    tolerations: []
  scaling: {minReplicas: 1, maxReplicas: 4, targetOngoingRequests: 2}
  maxOngoingRequests: 16
  generation: {maxNewTokens: 256, maxPromptTokens: 2048, temperature: 0.7, topP: 0.95}
  apiKeySecretRef: {name: llm-api-key, key: key}
  image: ""
"""


def patched(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of `base` with dotted paths set (or removed with DELETE)."""
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


def errors_of(parse: Any, obj: Any) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse(obj)
    return [str(e) for e in info.value.errors]


# -- valid resources and defaults ----------------------------------------------------------


def test_design_examples_parse() -> None:
    job = parse_finetunejob(yaml.safe_load(DESIGN_FINETUNEJOB))
    assert job.spec.strategy.zeroStage == 3
    assert job.spec.compute.rank0 is not None
    assert job.spec.compute.rank0.nodeSelector == {"llmray.io/memory-class": "large"}
    assert job.spec.compute.rank0.memory == "280Gi"
    assert job.spec.hyperparameters.maxSteps is None  # `maxSteps: null` reads as unset
    dep = parse_llmdeployment(yaml.safe_load(DESIGN_LLMDEPLOYMENT))
    assert dep.spec.scaling.maxReplicas == 4
    assert dep.spec.apiKeySecretRef is not None and dep.spec.apiKeySecretRef.key == "key"


def test_finetunejob_defaults() -> None:
    spec = parse_finetunejob(FINETUNEJOB).spec
    assert spec.method == "full" and spec.lora is None
    assert spec.dataset.format == "instruction"
    assert spec.dataset.maxSeqLength == 512 and spec.dataset.maskPrompt is True
    assert spec.dataset.specialTokens == [] and spec.dataset.eval is None
    hp = spec.hyperparameters
    assert (hp.epochs, hp.maxSteps, hp.learningRate) == (1, None, 2.0e-5)
    assert (hp.batchSizePerWorker, hp.gradientAccumulationSteps) == (8, 1)
    assert (hp.lrScheduler, hp.seed, hp.precision) == ("cosine", 42, "fp32")
    assert hp.torchCompile is False and hp.gradientCheckpointing is False
    assert spec.strategy.type == "ddp" and spec.strategy.zeroStage is None
    assert spec.compute.accelerator == "cpu" and spec.compute.workers == 1
    assert spec.compute.resourcesPerWorker.cpu == 1
    assert spec.compute.resourcesPerWorker.memory is None
    assert spec.compute.rank0 is None and spec.compute.tolerations == []
    assert spec.checkpointing.everyEpoch is True and spec.checkpointing.keep == 2
    assert spec.output.uri is None and spec.output.mergeLora is True
    assert spec.maxRetries == 1 and spec.activeDeadlineSeconds is None
    assert spec.image == "" and spec.env == []


def test_lora_defaults() -> None:
    spec = parse_finetunejob(patched(FINETUNEJOB, {"spec.method": "lora", "spec.lora": {}})).spec
    assert spec.lora is not None
    assert (spec.lora.rank, spec.lora.alpha, spec.lora.dropout) == (8, 16, 0.05)
    assert spec.lora.targetModules == ["q_proj", "v_proj"]


def test_llmdeployment_defaults() -> None:
    spec = parse_llmdeployment(LLMDEPLOYMENT).spec
    assert spec.engine == "auto" and spec.image == "" and spec.apiKeySecretRef is None
    assert spec.model.fineTuneJobRef is None and spec.model.servedName is None
    assert spec.compute.accelerator == "cpu" and spec.compute.ipex is False
    assert (spec.scaling.minReplicas, spec.scaling.maxReplicas) == (1, 1)
    assert spec.scaling.targetOngoingRequests == 2 and spec.maxOngoingRequests == 16
    gen = spec.generation
    assert (gen.maxNewTokens, gen.maxPromptTokens, gen.temperature, gen.topP) == (
        256,
        2048,
        0.7,
        0.95,
    )


def test_models_are_camel_case_and_frozen() -> None:
    job = parse_finetunejob(FINETUNEJOB)
    dumped = job.model_dump(by_alias=True, exclude_none=True)
    assert "baseModel" in dumped["spec"] and "maxSeqLength" in dumped["spec"]["dataset"]
    assert parse_finetunejob(dumped) == job  # a dump parses back to the same resource
    with pytest.raises(ValueError):
        job.spec.method = "lora"  # type: ignore[misc]


def test_status_ignores_unknown_fields() -> None:
    obj = patched(
        FINETUNEJOB,
        {"status": {"phase": "Running", "progress": {"step": 3, "future": 1}, "newField": "x"}},
    )
    job = parse_finetunejob(obj)
    assert job.status is not None and job.status.phase == "Running"
    assert job.status.progress.step == 3


# -- every error at once, by path ----------------------------------------------------------


def test_every_error_is_reported_at_once_with_its_path() -> None:
    obj = patched(
        FINETUNEJOB,
        {
            "spec.baseModel.uri": "ftp://host/model",
            "spec.dataset.format": "csv",
            "spec.lora": {"rank": 0},
            "spec.strategy": {"zeroStage": 3},
            "spec.compute.resourcesPerWorker": {"cpu": "8 cores"},
            "spec.compute.tolerations": [{"effect": "Sometimes"}],
            "spec.env": [{"name": ""}],
            "spec.bogus": 1,
        },
    )
    with pytest.raises(SpecError) as info:
        parse_finetunejob(obj, source="job.yaml")
    lines = [str(e) for e in info.value.errors]
    assert lines == [
        "spec.baseModel.uri: must be a path or a URI with one of the schemes hf://, s3://, "
        "gs://, pvc://, file://",
        "spec.dataset.format: must be one of instruction, text, chat",
        "spec.lora.rank: input should be greater than or equal to 1",
        'spec.compute.resourcesPerWorker.cpu: must be a Kubernetes quantity such as "8", '
        '"500m" or "48Gi"',
        "spec.compute.tolerations[0].effect: must be one of NoSchedule, PreferNoSchedule, "
        "NoExecute",
        "spec.env[0].name: string should have at least 1 character",
        "spec.bogus: unknown field",
        "spec.lora: only allowed when spec.method is lora or qlora",
        "spec.strategy.zeroStage: only allowed when spec.strategy.type is deepspeed",
    ]
    message = str(info.value)
    assert message.startswith("job.yaml: invalid resource (9 error(s)):")
    assert "  spec.dataset.format: must be one of instruction, text, chat" in message


def test_required_fields_are_named() -> None:
    obj = patched(FINETUNEJOB, {"spec.dataset": DELETE, "spec.baseModel": {}})
    assert errors_of(parse_finetunejob, obj) == [
        "spec.baseModel.uri: required",
        "spec.dataset: required",
    ]
    assert errors_of(parse_finetunejob, patched(FINETUNEJOB, {"metadata": DELETE})) == [
        "metadata: required"
    ]


def test_not_a_mapping() -> None:
    assert errors_of(parse_finetunejob, ["a", "list"]) == [
        "(root): must be a mapping (a YAML object)"
    ]


@pytest.mark.parametrize(
    ("base", "parse", "path"),
    [
        (FINETUNEJOB, parse_finetunejob, "extra"),
        (FINETUNEJOB, parse_finetunejob, "spec.learningRate"),  # belongs in hyperparameters
        (FINETUNEJOB, parse_finetunejob, "spec.compute.gpus"),
        (FINETUNEJOB, parse_finetunejob, "spec.dataset.Format"),
        (LLMDEPLOYMENT, parse_llmdeployment, "spec.replicas"),
        (LLMDEPLOYMENT, parse_llmdeployment, "spec.model.name"),
        (LLMDEPLOYMENT, parse_llmdeployment, "spec.generation.max_tokens"),
    ],
)
def test_unknown_fields_are_rejected(base: dict[str, Any], parse: Any, path: str) -> None:
    assert errors_of(parse, patched(base, {path: 1})) == [f"{path}: unknown field"]


def test_wrong_kind_and_api_version() -> None:
    assert errors_of(parse_resource, {"kind": "RayJob"}) == [
        "kind: must be one of FineTuneJob, LLMDeployment"
    ]
    assert errors_of(parse_finetunejob, patched(FINETUNEJOB, {"apiVersion": "llmray.io/v1"})) == [
        "apiVersion: must be one of llmray.io/v1alpha1"
    ]


def test_metadata_name_must_be_a_dns_label() -> None:
    (line,) = errors_of(parse_finetunejob, patched(FINETUNEJOB, {"metadata.name": "Bad_Name"}))
    assert line.startswith("metadata.name: ")


# -- cross-field rules ---------------------------------------------------------------------

FINETUNEJOB_RULE_CASES = [
    # (changes, the error expected or None)
    ({"spec.lora": {}}, "spec.lora: only allowed when spec.method is lora or qlora"),
    ({"spec.method": "full", "spec.lora": {}}, "spec.lora"),
    ({"spec.method": "lora", "spec.lora": {}}, None),
    ({"spec.method": "lora"}, None),  # lora settings default
    ({"spec.method": "qlora", "spec.lora": {}}, "spec.method: qlora needs"),
    ({"spec.method": "qlora", "spec.compute.accelerator": "intel-gpu"}, "spec.method"),
    ({"spec.method": "qlora", "spec.compute.accelerator": "nvidia-gpu"}, None),
    (
        {"spec.strategy.zeroStage": 2},
        "spec.strategy.zeroStage: only allowed when spec.strategy.type is deepspeed",
    ),
    ({"spec.strategy": {"type": "ddp", "zeroStage": 1}}, "spec.strategy.zeroStage"),
    ({"spec.strategy": {"type": "deepspeed", "zeroStage": 1}}, None),
    ({"spec.strategy": {"type": "deepspeed"}}, None),
    ({"spec.strategy.zeroStage": None}, None),  # null reads as unset
    ({"spec.strategy.offloadOptimizer": True}, "spec.strategy.offloadOptimizer: only allowed"),
    ({"spec.strategy": {"type": "deepspeed", "offloadOptimizer": True}}, None),
    ({"spec.strategy.offloadOptimizer": False}, None),
    (
        {"spec.strategy": {"type": "deepspeed", "zeroStage": 2, "offloadParameters": True}},
        "spec.strategy.offloadParameters: needs spec.strategy.type deepspeed with zeroStage 3",
    ),
    (
        {"spec.strategy": {"type": "deepspeed", "offloadParameters": True}},
        "spec.strategy.offloadParameters",
    ),
    ({"spec.strategy": {"type": "deepspeed", "zeroStage": 3, "offloadParameters": True}}, None),
    (
        {"spec.dataset.eval": "s3://b/eval.jsonl", "spec.dataset.evalFraction": 0.1},
        "spec.dataset.evalFraction: set either spec.dataset.eval or spec.dataset.evalFraction",
    ),
    ({"spec.dataset.eval": "s3://b/eval.jsonl"}, None),
    ({"spec.dataset.evalFraction": 0.1}, None),
    (
        {"spec.compute": {"accelerator": "nvidia-gpu", "ipex": True}},
        "spec.compute.ipex: only with spec.compute.accelerator cpu or intel-gpu",
    ),
    ({"spec.compute": {"accelerator": "intel-gpu", "ipex": True}}, None),
    ({"spec.compute": {"ipex": True}}, None),  # cpu by default
    (
        {"spec.hyperparameters.precision": "fp16"},
        "spec.hyperparameters.precision: fp16 needs a GPU accelerator; use bf16 or fp32 on cpu",
    ),
    (
        {"spec.hyperparameters.precision": "fp16", "spec.compute.accelerator": "cpu"},
        "spec.hyperparameters.precision",
    ),
    ({"spec.hyperparameters.precision": "fp16", "spec.compute.accelerator": "nvidia-gpu"}, None),
    ({"spec.hyperparameters.precision": "bf16"}, None),
    (
        {"spec.hyperparameters.torchCompile": True, "spec.strategy.type": "deepspeed"},
        "spec.hyperparameters.torchCompile: only with spec.strategy.type ddp",
    ),
    ({"spec.hyperparameters.torchCompile": True}, None),
]


@pytest.mark.parametrize(("changes", "expected"), FINETUNEJOB_RULE_CASES)
def test_finetunejob_rules(changes: dict[str, Any], expected: str | None) -> None:
    obj = patched(FINETUNEJOB, changes)
    if expected is None:
        parse_finetunejob(obj)
    else:
        lines = errors_of(parse_finetunejob, obj)
        assert len(lines) == 1 and lines[0].startswith(expected), lines


LLMDEPLOYMENT_RULE_CASES = [
    (
        {"spec.model": {}},
        "spec.model: set exactly one of spec.model.uri and spec.model.fineTuneJobRef",
    ),
    ({"spec.model.fineTuneJobRef": {"name": "job"}}, "spec.model: set exactly one"),
    ({"spec.model": {"fineTuneJobRef": {"name": "job"}}}, None),
    ({"spec.model": {"uri": None, "fineTuneJobRef": {"name": "job"}}}, None),
    ({"spec.engine": "vllm"}, "spec.engine: vllm needs spec.compute.accelerator nvidia-gpu"),
    ({"spec.engine": "vllm", "spec.compute.accelerator": "nvidia-gpu"}, None),
    ({"spec.engine": "transformers"}, None),
    (
        {"spec.compute": {"accelerator": "nvidia-gpu", "ipex": True}},
        "spec.compute.ipex: only with spec.compute.accelerator cpu or intel-gpu",
    ),
    ({"spec.compute": {"accelerator": "cpu", "ipex": True}}, None),
    (
        {"spec.scaling": {"minReplicas": 3, "maxReplicas": 2}},
        "spec.scaling.minReplicas: must not exceed spec.scaling.maxReplicas",
    ),
    ({"spec.scaling": {"minReplicas": 2}}, "spec.scaling.minReplicas"),  # maxReplicas is 1
    ({"spec.scaling": {"minReplicas": 0, "maxReplicas": 4}}, None),
    ({"spec.scaling": {"minReplicas": 4, "maxReplicas": 4}}, None),
    ({"spec.adapters": [{"name": "a", "uri": "s3://b/a"}, {"name": "b", "uri": "s3://b/b"}]}, None),
    (
        {"spec.adapters": [{"name": "a"}]},
        "spec.adapters: each adapter sets exactly one of uri and fineTuneJobRef",
    ),
    (
        {"spec.adapters": [{"name": "a", "uri": "s3://b/a"}, {"name": "a", "uri": "s3://b/b"}]},
        "spec.adapters: adapter names must be unique",
    ),
    (
        {"spec.adapters": [{"name": "a", "uri": "s3://b/a", "minEvaluation": {"answer": 0.3}}]},
        "spec.adapters: minEvaluation is only allowed with fineTuneJobRef",
    ),
    (
        {"spec.adapters": [{"name": "demo", "uri": "s3://b/a"}]},  # metadata.name is demo
        "spec.adapters: an adapter may not take the served model's name",
    ),
    (
        {"spec.model.servedName": "base", "spec.adapters": [{"name": "base", "uri": "s3://b/a"}]},
        "spec.adapters: an adapter may not take the served model's name",
    ),
    (
        {"spec.model.servedName": "base", "spec.adapters": [{"name": "demo", "uri": "s3://b/a"}]},
        None,
    ),
    ({"spec.dtype": "bfloat16"}, None),
    ({"spec.quantization": "int8"}, "spec.quantization: unknown field"),
]

DESIGN_ADAPTERS = """
apiVersion: llmray.io/v1alpha1
kind: LLMDeployment
metadata: {name: llama-support, namespace: ml}
spec:
  model: {uri: hf://meta-llama/Llama-2-7b-hf}
  adapters:
    - {name: support-v3, fineTuneJobRef: {name: support-v3}, minEvaluation: {answer: 0.3}}
    - {name: legal, uri: s3://bucket/adapters/legal}
  maxLoadedAdapters: 8
  maxAdapterRank: 64
"""


def test_design_adapters_parse() -> None:
    dep = parse_llmdeployment(yaml.safe_load(DESIGN_ADAPTERS))
    support, legal = dep.spec.adapters
    assert support.fineTuneJobRef is not None and support.fineTuneJobRef.name == "support-v3"
    assert support.minEvaluation == {"answer": 0.3} and legal.uri == "s3://bucket/adapters/legal"
    assert (dep.spec.maxLoadedAdapters, dep.spec.maxAdapterRank) == (8, 64)
    plain = parse_llmdeployment(LLMDEPLOYMENT).spec
    assert (plain.adapters, plain.maxLoadedAdapters, plain.maxAdapterRank) == ([], None, 16)
    status = FineTuneJob.model_validate(
        {
            **FINETUNEJOB,
            "status": {
                "model": {"uri": "s3://m", "adapter": True, "baseModel": "hf://meta-llama/x"}
            },
        }
    ).status
    assert status is not None and status.model.adapter and status.model.baseModel


def test_adapter_errors_name_the_entry_field() -> None:
    obj = patched(
        LLMDEPLOYMENT,
        {"spec.adapters": [{"name": "ok", "uri": "s3://b/a"}, {"name": "bad name", "uri": "x y"}]},
    )
    lines = errors_of(parse_llmdeployment, obj)
    assert any(line.startswith("spec.adapters[1].name: ") for line in lines), lines
    assert any(line.startswith("spec.adapters[1].uri: ") for line in lines), lines


@pytest.mark.parametrize(("changes", "expected"), LLMDEPLOYMENT_RULE_CASES)
def test_llmdeployment_rules(changes: dict[str, Any], expected: str | None) -> None:
    obj = patched(LLMDEPLOYMENT, changes)
    if expected is None:
        parse_llmdeployment(obj)
    else:
        lines = errors_of(parse_llmdeployment, obj)
        assert len(lines) == 1 and lines[0].startswith(expected), lines


def test_several_rules_fail_together() -> None:
    obj = patched(
        LLMDEPLOYMENT,
        {
            "spec.model": {},
            "spec.engine": "vllm",
            "spec.scaling": {"minReplicas": 5, "maxReplicas": 2},
        },
    )
    assert [line.split(":")[0] for line in errors_of(parse_llmdeployment, obj)] == [
        "spec.model",
        "spec.engine",
        "spec.scaling.minReplicas",
    ]


# -- URIs, quantities, bounds --------------------------------------------------------------

GOOD_URIS = [
    "hf://meta-llama/Llama-2-7b-hf",
    "s3://bucket/key/train.jsonl",
    "gs://bucket/train.parquet",
    "pvc://claim/path/to/model",
    "pvc://claim",
    "file:///data/train.jsonl",
    "/data/train.jsonl",
    "../data/train.jsonl",
    "train.jsonl",
]
BAD_URIS = [
    "ftp://host/train.jsonl",
    "https://example.com/train.jsonl",
    "s3://",
    "hf:///no-org",
    "file://relative/path",
    "C:/data/train.jsonl",
    "has space.jsonl",
    "",
]


@pytest.mark.parametrize("uri", GOOD_URIS)
def test_uri_schemes_accepted(uri: str) -> None:
    obj = patched(
        FINETUNEJOB,
        {"spec.baseModel.uri": uri, "spec.dataset.train": uri, "spec.output.uri": uri},
    )
    parse_finetunejob(obj)
    parse_llmdeployment(patched(LLMDEPLOYMENT, {"spec.model.uri": uri}))


@pytest.mark.parametrize("uri", BAD_URIS)
def test_uri_schemes_rejected(uri: str) -> None:
    obj = patched(
        FINETUNEJOB,
        {
            "spec.baseModel.uri": uri,
            "spec.dataset.eval": uri,
            "spec.checkpointing.storageUri": uri,
        },
    )
    paths = [line.split(": ")[0] for line in errors_of(parse_finetunejob, obj)]
    assert paths == ["spec.baseModel.uri", "spec.dataset.eval", "spec.checkpointing.storageUri"]
    (line,) = errors_of(parse_llmdeployment, patched(LLMDEPLOYMENT, {"spec.model.uri": uri}))
    assert line.startswith("spec.model.uri: must be a path or a URI with one of the schemes")


@pytest.mark.parametrize("quantity", [1, 8, "8", "500m", "48Gi", "1.5", "2e3", "+1Ki"])
def test_quantities_accepted(quantity: int | str) -> None:
    obj = patched(FINETUNEJOB, {"spec.compute.resourcesPerWorker.memory": quantity})
    assert parse_finetunejob(obj).spec.compute.resourcesPerWorker.memory == quantity


@pytest.mark.parametrize("quantity", ["8 cores", "lots", "Gi", "", "1 Gi"])
def test_quantities_rejected(quantity: str) -> None:
    obj = patched(FINETUNEJOB, {"spec.compute.rank0": {"memory": quantity}})
    assert errors_of(parse_finetunejob, obj) == [
        'spec.compute.rank0.memory: must be a Kubernetes quantity such as "8", "500m" or "48Gi"'
    ]


@pytest.mark.parametrize(
    ("changes", "path"),
    [
        ({"spec.dataset.evalFraction": 0}, "spec.dataset.evalFraction"),
        ({"spec.dataset.evalFraction": 1}, "spec.dataset.evalFraction"),
        ({"spec.dataset.maxSeqLength": 4}, "spec.dataset.maxSeqLength"),
        ({"spec.hyperparameters.learningRate": 0}, "spec.hyperparameters.learningRate"),
        ({"spec.hyperparameters.maxSteps": 0}, "spec.hyperparameters.maxSteps"),
        ({"spec.compute.workers": 0}, "spec.compute.workers"),
        ({"spec.strategy": {"type": "deepspeed", "zeroStage": 4}}, "spec.strategy.zeroStage"),
        ({"spec.method": "lora", "spec.lora.targetModules": []}, "spec.lora.targetModules"),
        ({"spec.image": "x" * 1025}, "spec.image"),
        ({"spec.compute.tolerations": [{}] * 65}, "spec.compute.tolerations"),
        ({"spec.compute.nodeSelector": {"zone": "z" * 64}}, "spec.compute.nodeSelector.zone"),
        ({"spec.dataset.specialTokens": ["<" * 257]}, "spec.dataset.specialTokens[0]"),
        ({"spec.env": [{"name": "A"}] * 257}, "spec.env"),
        ({"spec.baseModel.uri": "s3://b/" + "k" * 2048}, "spec.baseModel.uri"),
    ],
)
def test_bounds(changes: dict[str, Any], path: str) -> None:
    (line,) = errors_of(parse_finetunejob, patched(FINETUNEJOB, changes))
    assert line.split(": ")[0] == path


# -- YAML files ----------------------------------------------------------------------------


def test_load_resource_from_file(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(DESIGN_FINETUNEJOB)
    job = load_resource(path)
    assert isinstance(job, FineTuneJob) and job.metadata.name == "gsm8k-7b"


def test_example_files_parse() -> None:
    examples = sorted((REPO / "examples").rglob("*.yaml"))
    assert examples, "no example YAML found"
    for path in examples:
        for doc in load_documents(path):
            if doc.get("apiVersion") == "llmray.io/v1alpha1":
                assert isinstance(parse_resource(doc, str(path)), FineTuneJob | LLMDeployment)


def test_load_resource_picks_the_kind_from_several_documents(tmp_path: Path) -> None:
    path = tmp_path / "both.yaml"
    path.write_text(DESIGN_FINETUNEJOB + "---\n" + DESIGN_LLMDEPLOYMENT)
    assert isinstance(load_resource(path, kind="LLMDeployment"), LLMDeployment)
    assert isinstance(load_resource(path, kind="FineTuneJob"), FineTuneJob)
    with pytest.raises(SpecError, match="expected exactly one resource, found 2") as info:
        load_resource(path)
    assert str(info.value).startswith(str(path))


def test_invalid_spec_in_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(DESIGN_FINETUNEJOB.replace("format: instruction", "format: csv"))
    with pytest.raises(SpecError) as info:
        load_resource(path)
    assert info.value.source == str(path)
    assert str(info.value).startswith(f"{path}: invalid resource (1 error(s)):")
    assert "spec.dataset.format: must be one of instruction, text, chat" in str(info.value)


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(SpecError) as info:
        load_resource(path)
    assert str(info.value).startswith(str(path))
    assert "(file): cannot read" in str(info.value)


def test_broken_yaml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("spec:\n  dataset: [unclosed\n")
    with pytest.raises(SpecError) as info:
        load_resource(path)
    assert str(info.value).startswith(str(path))
    assert "(file): not valid YAML" in str(info.value)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    with pytest.raises(SpecError, match="expected exactly one FineTuneJob, found 0"):
        load_resource(path, kind="FineTuneJob")
