"""Locations of models, data, checkpoints and outputs: parsing, local paths, S3, the Hub."""

from __future__ import annotations

import socket
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


def test_hub_offline_fails_with_advice_and_no_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # conftest sets HF_HUB_OFFLINE=1, as a cluster without internet would: nothing is tried.
    def connect(*args, **kwargs):
        raise AssertionError(f"a connection was tried: {args}")

    monkeypatch.setattr(socket, "create_connection", connect)
    with pytest.raises(UriError, match=r"spec.baseModel.uri: hf://org/model: HF_HUB_OFFLINE"):
        uris.fetch("hf://org/model", tmp_path, tmp_path / "c", field="spec.baseModel.uri")


def _closed_port() -> int:
    """A local port nothing listens on (bound, then released): connecting is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_hub_is_reported_without_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not offline by configuration, but the endpoint does not answer: one probe, then the
    cache only (huggingface_hub alone would retry for ~47 s)."""
    from huggingface_hub import constants

    endpoint = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    probes = []
    real = socket.create_connection

    def connect(address, timeout=None, *args, **kwargs):
        probes.append((address, timeout))
        return real(address, timeout, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", connect)
    with pytest.raises(UriError, match=rf"hf://org/model: {endpoint} is not reachable"):
        uris.fetch("hf://org/model", tmp_path, tmp_path / "c")
    # One probe, bounded (a blackholed address gives up after HUB_PROBE_SECONDS).
    assert [timeout for _, timeout in probes] == [uris.HUB_PROBE_SECONDS]


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


def test_pod_paths_are_rooted_where_the_pod_root_says(tmp_path, monkeypatch):
    """$LLMRAY_POD_ROOT: where a pod's /etc/llmray, /tmp/llmray and PVC mounts are when the
    pod's files are not at / (the KubeRay replay's pods); unset, paths are as written."""
    from llmray.paths import pod_path

    monkeypatch.delenv("LLMRAY_POD_ROOT", raising=False)
    monkeypatch.delenv("LLMRAY_PVC_ROOT", raising=False)
    assert pod_path("/etc/llmray/trainer.json") == Path("/etc/llmray/trainer.json")
    assert uris.pvc_root() == Path(uris.DEFAULT_PVC_ROOT)
    monkeypatch.setenv("LLMRAY_POD_ROOT", str(tmp_path))
    assert pod_path("/etc/llmray/trainer.json") == tmp_path / "etc/llmray/trainer.json"
    assert pod_path("relative.json") == Path("relative.json")
    assert uris.pvc_root() == tmp_path / "mnt/llmray/pvc"
