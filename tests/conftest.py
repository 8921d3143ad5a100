"""Shared fixtures. Integration tests share one local Ray (starting Ray costs ~6 s)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"

# Nothing here may reach a model hub; fail fast instead of retrying for a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def llmray_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private LLMRAY_HOME for the session: runs, jobs and caches of the tests."""
    home = tmp_path_factory.mktemp("llmray-home")
    os.environ["LLMRAY_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def ray_session(llmray_home: Path):
    """One embedded Ray for every integration test (the launcher reuses it)."""
    ray = pytest.importorskip("ray")
    from llmray.localray import ensure_ray

    ensure_ray(num_cpus=os.cpu_count() or 2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from llmray_trainer.tiny_model import create_tiny_model

    return create_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 64 sample instructions: enough for a falling loss in a few seconds."""
    lines = (EXAMPLES / "data" / "instruction.jsonl").read_text().splitlines()[:64]
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path
