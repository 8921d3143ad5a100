"""Locations of models, data, checkpoints and outputs: parsing, local paths, S3, the Hub."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from llmray import uris
from llmray.uris import UriError


@pytest.mark.parametrize(
    ("uri", "scheme", "authority", "path"),
    [
        ("data/train.jsonl", "file", "", "data/train.jsonl"),
        ("/abs/train.jsonl", "file", "", "/abs/train.jsonl"),
        ("file:///abs/train.jsonl", "file", "", "/abs/train.jsonl"),
        ("s3://bucket/runs/a", "s3", "bucket", "runs/a"),
        ("gs://bucket", "gs", "bucket", ""),
        ("pvc://models/smollm2", "pvc", "models", "smollm2"),
        ("hf://HuggingFaceTB/SmolLM2-135M", "hf", "HuggingFaceTB", "SmolLM2-135M"),
    ],
)
def test_parse(uri: str, scheme: str, authority: str, path: str) -> None:
    assert uris.parse(uri) == uris.Uri(scheme, authority, path)


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("ftp://host/x", "scheme 'ftp' is not one of"),
        ("file://host/x", "three slashes"),
        ("s3:///key", "needs a bucket"),
        ("", "is not a location"),
    ],
)
def test_parse_rejects_with_field(uri: str, message: str) -> None:
    with pytest.raises(UriError, match=f"^spec.dataset.train: .*{message}"):
        uris.parse(uri, field="spec.dataset.train")


def test_relative_paths_are_relative_to_the_yaml_folder(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "t.jsonl").write_text("{}\n")
    got = uris.fetch("data/t.jsonl", tmp_path, tmp_path / "cache")
    assert got == tmp_path / "data" / "t.jsonl"
    assert uris.fetch(f"file://{got}", Path("/elsewhere"), tmp_path / "cache") == got


def test_missing_local_path_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(UriError, match=r"^spec.baseModel.uri: models/nope: .*does not exist"):
        uris.fetch("models/nope", tmp_path, tmp_path / "cache", field="spec.baseModel.uri")


def test_pvc_maps_to_the_mount_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMRAY_PVC_ROOT", str(tmp_path))
    (tmp_path / "claim" / "m").mkdir(parents=True)
    assert uris.fetch("pvc://claim/m", Path("/"), tmp_path / "c") == tmp_path / "claim" / "m"
    assert uris.storage_path_for_ray("pvc://claim/runs", Path("/")) == str(
        tmp_path / "claim" / "runs"
    )


def test_upload_replaces_a_local_folder_whole(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    (first / "old.bin").write_text("1")
    second.mkdir()
    (second / "config.json").write_text("{}")
    target = tmp_path / "out" / "model"
    uris.upload(first, str(target), tmp_path)
    uris.upload(second, "out/model", tmp_path)  # relative to base_dir
    assert sorted(p.name for p in target.iterdir()) == ["config.json"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["model"]  # no staging left


def test_hub_and_storage_refuse_writes(tmp_path: Path) -> None:
    with pytest.raises(UriError, match="read only"):
        uris.upload(tmp_path, "hf://org/name", tmp_path)
    with pytest.raises(UriError, match=r"spec\.checkpointing\.storageUri: .*cannot go to the Hub"):
        uris.storage_path_for_ray("hf://org/x", tmp_path, field="spec.checkpointing.storageUri")
    assert uris.storage_path_for_ray("s3://b/runs", tmp_path) == "s3://b/runs"


def test_hub_offline_fails_fast_with_advice(tmp_path: Path) -> None:
    # conftest sets HF_HUB_OFFLINE=1, as a cluster without internet would.
    start = time.monotonic()
    with pytest.raises(UriError, match=r"spec.baseModel.uri: hf://org/model: HF_HUB_OFFLINE"):
        uris.fetch("hf://org/model", tmp_path, tmp_path / "c", field="spec.baseModel.uri")
    assert time.monotonic() - start < 5


def test_unreachable_hub_fails_in_seconds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    # Not offline by configuration, but the endpoint does not answer (a blackholed address):
    # the probe gives up after HUB_PROBE_SECONDS instead of ~47 s of retries.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://10.255.255.1")
    start = time.monotonic()
    with pytest.raises(UriError, match=r"hf://org/model: https://10.255.255.1 is not reachable"):
        uris.fetch("hf://org/model", tmp_path, tmp_path / "c")
    assert time.monotonic() - start < uris.HUB_PROBE_SECONDS + 3


@pytest.fixture(scope="module")
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


def test_s3_upload_then_fetch_round_trip(s3, tmp_path: Path) -> None:
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text('{"a": 1}')
    (model / "sub" / "w.bin").write_bytes(b"\0" * 10)
    uris.upload(model, "s3://llmray-test/models/m1", tmp_path)

    cache = tmp_path / "cache"
    got = uris.fetch("s3://llmray-test/models/m1", tmp_path, cache)
    assert (got / "config.json").read_text() == '{"a": 1}'
    assert (got / "sub" / "w.bin").read_bytes() == b"\0" * 10
    # Unchanged remote: the cached copy is reused; changed remote: fetched again.
    assert uris.fetch("s3://llmray-test/models/m1", tmp_path, cache) == got
    s3.pipe("llmray-test/models/m1/config.json", b'{"a": 2}')
    again = uris.fetch("s3://llmray-test/models/m1", tmp_path, cache)
    assert (again / "config.json").read_text() == '{"a": 2}'

    single = uris.fetch("s3://llmray-test/models/m1/config.json", tmp_path, cache)
    assert single.is_file()


def test_s3_missing_object_names_the_field(s3, tmp_path: Path) -> None:
    with pytest.raises(UriError, match=r"^spec.dataset.train: s3://llmray-test/nope.jsonl"):
        uris.fetch(
            "s3://llmray-test/nope.jsonl", tmp_path, tmp_path / "c", field="spec.dataset.train"
        )
