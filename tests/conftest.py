"""Shared fixtures. Integration tests share one local Ray (starting Ray costs ~6 s)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"

# Nothing here may reach a model hub; fail fast instead of retrying for a minute. Set before
# collection (huggingface_hub reads it at import), for the whole session, then restored.
SESSION_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
_session_env = pytest.MonkeyPatch()
# Set by pytest itself, or by a library when first imported (`import ray` sets
# RAY_CLIENT_MODE, accelerate PYTORCH_NVML_BASED_CUDA_CHECK, deepspeed TORCHINDUCTOR_CACHE_DIR;
# in `make test-images` the first import happens inside a test): not a test's doing.
SET_BY_OTHERS = {
    "PYTEST_CURRENT_TEST",
    "RAY_CLIENT_MODE",
    "PYTORCH_NVML_BASED_CUDA_CHECK",
    "TORCHINDUCTOR_CACHE_DIR",
    "_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR",  # inductor's own, set when it compiles a graph
}


def pytest_configure(config: pytest.Config) -> None:
    for name, value in SESSION_ENV.items():
        if name not in os.environ:
            _session_env.setenv(name, value)


def pytest_unconfigure(config: pytest.Config) -> None:
    _session_env.undo()


@pytest.fixture(autouse=True)
def _environment_is_restored() -> Iterator[None]:
    """A test that changes os.environ must undo it (monkeypatch.setenv / delenv do): the next
    test, and every process a later test starts, would see the change."""
    before = dict(os.environ)
    yield
    after = dict(os.environ)
    changed = sorted(
        k
        for k in before.keys() | after.keys()
        if before.get(k) != after.get(k) and k not in SET_BY_OTHERS
    )
    assert not changed, f"the test left os.environ changed: {changed}"


@pytest.fixture(scope="session")
def llmray_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private LLMRAY_HOME for the session: runs, jobs and caches of the tests."""
    home = tmp_path_factory.mktemp("llmray-home")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LLMRAY_HOME", str(home))
        yield home


@pytest.fixture(scope="session")
def ray_session(llmray_home: Path):
    """One embedded Ray for every integration test (the launcher reuses it). Starting it sets
    Ray Serve's variables in this process (llmray.localray): they are undone afterwards."""
    ray = pytest.importorskip("ray")
    from llmray.localray import ensure_ray

    before = dict(os.environ)
    ensure_ray(num_cpus=os.cpu_count() or 2)
    yield ray
    ray.shutdown()
    os.environ.clear()
    os.environ.update(before)


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


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API (moto's server over HTTP) that s3fs talks to as to AWS."""
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch):
    import fsspec

    for key, value in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3_endpoint,
    }.items():
        monkeypatch.setenv(key, value)
    fsspec.filesystem("s3").clear_instance_cache()
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    if not fs.exists("llmray-test"):
        fs.mkdir("llmray-test")
    return fs
