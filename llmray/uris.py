"""Model, dataset, checkpoint and output locations: one URI grammar for every field.

    file:///abs/path        a local path (also: a plain path, relative to the YAML's folder)
    pvc://CLAIM/path        a PersistentVolumeClaim; pods mount it at $LLMRAY_PVC_ROOT/CLAIM
    s3://bucket/key         through fsspec + s3fs   (pip install 'llmray[cloud]')
    gs://bucket/key         through fsspec + gcsfs  (pip install 'llmray[cloud]')
    hf://ORG/NAME[/FILE]    the Hugging Face Hub, through huggingface_hub (read only)

`fetch` makes any of them a local path (downloading into a cache once), `upload` publishes a
finished local folder, `storage_path_for_ray` turns a checkpoint location into what Ray Train's
`storage_path` takes. A source that cannot be reached fails in seconds with a message naming
the spec field, never after minutes of retries.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

REMOTE_SCHEMES = ("s3", "gs", "hf")
SCHEMES = ("file", "pvc", *REMOTE_SCHEMES)
# Where pods mount PersistentVolumeClaims (the operator mounts pvc://CLAIM at ROOT/CLAIM).
DEFAULT_PVC_ROOT = "/mnt/llmray/pvc"
# How long to wait for the Hub before saying it is unreachable: without this probe,
# huggingface_hub retries for ~47 s on a machine without internet.
HUB_PROBE_SECONDS = 3.0
CLOUD_HELP = "install the cloud extra: pip install 'llmray[cloud]' (s3fs, gcsfs)"


class UriError(ValueError):
    """A location that is malformed, missing or unreachable (the message names the field)."""


@dataclass(frozen=True)
class Uri:
    scheme: str  # one of SCHEMES; plain paths are "file"
    authority: str  # bucket, claim or hub org; "" for file
    path: str  # without a leading slash for remote schemes; as written for file

    @property
    def remote(self) -> bool:
        return self.scheme in REMOTE_SCHEMES


def parse(uri: str, *, field: str = "") -> Uri:
    where = f"{field}: " if field else ""
    if not uri or any(c.isspace() for c in uri):
        raise UriError(f"{where}{uri!r} is not a location")
    if "://" not in uri:
        return Uri("file", "", uri)
    parsed = urlparse(uri)
    scheme = parsed.scheme
    if scheme not in SCHEMES:
        raise UriError(f"{where}{uri}: scheme {scheme!r} is not one of {', '.join(SCHEMES)}")
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise UriError(f"{where}{uri}: a file URI has three slashes: file:///abs/path")
        return Uri("file", "", parsed.path)
    if not parsed.netloc:
        raise UriError(f"{where}{uri}: {scheme}:// needs a bucket, claim or org name")
    return Uri(scheme, parsed.netloc, parsed.path.lstrip("/"))


def is_remote(uri: str) -> bool:
    return parse(uri).remote


def pvc_root() -> Path:
    from llmray.paths import pod_path

    return Path(os.environ.get("LLMRAY_PVC_ROOT") or pod_path(DEFAULT_PVC_ROOT))


def local_path(uri: str, base_dir: Path, *, field: str = "") -> Path | None:
    """The local filesystem path of a file / relative / pvc location; None for remote ones."""
    u = parse(uri, field=field)
    if u.scheme == "file":
        path = Path(u.path).expanduser()
        return path if path.is_absolute() else (Path(base_dir) / path).resolve()
    if u.scheme == "pvc":
        return pvc_root() / u.authority / u.path
    return None


def fetch(
    uri: str,
    base_dir: Path,
    cache_dir: Path,
    *,
    revision: str | None = None,
    field: str = "",
) -> Path:
    """A local path holding what `uri` names (file or folder), downloaded once into the cache."""
    where = f"{field}: " if field else ""
    u = parse(uri, field=field)
    path = local_path(uri, base_dir, field=field)
    if path is not None:
        if not path.exists():
            raise UriError(f"{where}{uri}: {path} does not exist")
        return path
    if u.scheme == "hf":
        return _fetch_hub(u, Path(cache_dir) / "hf", revision, where)
    return _fetch_fsspec(uri, u, Path(cache_dir) / u.scheme, where)


def upload(local: Path, uri: str, base_dir: Path, *, field: str = "spec.output.uri") -> str:
    """Publish the finished folder `local` at `uri`; readers never see a half-written model.

    Locally the folder is written next to the target and renamed into place. Object stores
    have no rename: files are put one by one (the caller writes the completion record, e.g.
    the job status, only after this returns).
    """
    where = f"{field}: " if field else ""
    u = parse(uri, field=field)
    path = local_path(uri, base_dir, field=field)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        shutil.copytree(local, staging, dirs_exist_ok=True)
        old = path.with_name(f".{path.name}.old")
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
        staging.rename(path)
        shutil.rmtree(old, ignore_errors=True)
        return str(path)
    if u.scheme == "hf":
        raise UriError(
            f"{where}{uri}: hf:// is read only; write the model to s3://, gs://, pvc:// or a path"
        )
    fs = _filesystem(u.scheme, where)
    remote = f"{u.authority}/{u.path}".rstrip("/")
    fs.put(f"{local}/", f"{remote}/", recursive=True)
    return uri


def put_file(data: bytes, uri: str, base_dir: Path, *, field: str = "") -> str:
    """Write one file (e.g. predictions.jsonl) at `uri`: locally written beside and renamed
    into place, on an object store put whole."""
    where = f"{field}: " if field else ""
    u = parse(uri, field=field)
    path = local_path(uri, base_dir, field=field)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
        return str(path)
    if u.scheme == "hf":
        raise UriError(f"{where}{uri}: hf:// is read only; write to s3://, gs://, pvc:// or a path")
    fs = _filesystem(u.scheme, where)
    fs.pipe_file(f"{u.authority}/{u.path}", data)
    return uri


def storage_path_for_ray(uri: str, base_dir: Path, *, field: str = "") -> str:
    """Ray Train's `storage_path`: an absolute local path, or s3:// / gs:// as is (pyarrow)."""
    where = f"{field}: " if field else ""
    u = parse(uri, field=field)
    path = local_path(uri, base_dir, field=field)
    if path is not None:
        return str(path)
    if u.scheme == "hf":
        raise UriError(
            f"{where}{uri}: checkpoints cannot go to the Hub; use s3://, gs://, pvc:// or a path"
        )
    return uri


def _filesystem(scheme: str, where: str):
    import fsspec

    try:
        return fsspec.filesystem(scheme)
    except ImportError as err:
        raise UriError(
            f"{where}{scheme}:// needs a filesystem driver: {CLOUD_HELP} ({err})"
        ) from err


def _fetch_fsspec(uri: str, u: Uri, cache_root: Path, where: str) -> Path:
    """Download a remote file or folder; reuse the cached copy while the remote is unchanged."""
    fs = _filesystem(u.scheme, where)
    remote = f"{u.authority}/{u.path}".rstrip("/")
    try:
        listing = fs.find(remote, detail=True, withdirs=False)
    except (FileNotFoundError, PermissionError, OSError) as err:
        raise UriError(f"{where}{uri}: cannot list it ({type(err).__name__}: {err})") from err
    if not listing:
        raise UriError(f"{where}{uri} does not exist (or is an empty folder)")
    # The fingerprint of what is there now: name, size, and etag / mtime where the store has one.
    fingerprint = {
        name: [
            info.get("size"),
            str(
                info.get("ETag")
                or info.get("etag")
                or info.get("LastModified")
                or info.get("mtime")
                or ""
            ),
        ]
        for name, info in sorted(listing.items())
    }
    key = hashlib.sha256(uri.encode()).hexdigest()[:16]
    target = cache_root / key / Path(u.path or u.authority).name
    marker = cache_root / key / "fetched.json"
    if marker.exists() and json.loads(marker.read_text()) == fingerprint and target.exists():
        return target
    shutil.rmtree(cache_root / key, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    single_file = list(listing) == [remote]
    if single_file:
        fs.get(remote, str(target))
    else:
        for name in listing:
            dest = target / os.path.relpath(name, remote)
            dest.parent.mkdir(parents=True, exist_ok=True)
            fs.get(name, str(dest))
    marker.write_text(json.dumps(fingerprint))
    return target


def _fetch_hub(u: Uri, cache_root: Path, revision: str | None, where: str) -> Path:
    from huggingface_hub import constants, hf_hub_download, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    parts = u.path.split("/", 1)
    if not parts[0]:
        raise UriError(f"{where}hf://{u.authority}: name the model as hf://ORG/NAME")
    repo_id = f"{u.authority}/{parts[0]}"
    filename = parts[1] if len(parts) > 1 and parts[1] else None
    offline = bool(constants.HF_HUB_OFFLINE) or not _reachable(constants.ENDPOINT)
    kwargs = {
        "repo_id": repo_id,
        "revision": revision,
        "cache_dir": str(cache_root),
        "local_files_only": offline,
        "token": os.environ.get("HF_TOKEN") or None,
    }
    try:
        if filename:
            return Path(hf_hub_download(filename=filename, **kwargs))
        return Path(snapshot_download(**kwargs))
    except LocalEntryNotFoundError as err:
        why = (
            "HF_HUB_OFFLINE is set"
            if constants.HF_HUB_OFFLINE
            else f"{constants.ENDPOINT} is not reachable from here"
        )
        raise UriError(
            f"{where}hf://{repo_id}: {why} and the model is not in the cache {cache_root}; "
            "download it where the Hub is reachable and give a file://, pvc://, s3:// or gs:// "
            "location instead (or set HF_ENDPOINT to a mirror)"
        ) from err
    except Exception as err:  # the hub's own errors: gated, missing repo, bad token ...
        raise UriError(f"{where}hf://{repo_id}: {type(err).__name__}: {err}") from err


def _reachable(endpoint: str, timeout: float = HUB_PROBE_SECONDS) -> bool:
    """Can a TCP connection reach the Hub's host? Cheap, and bounded by `timeout`."""
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False
