"""Build the images here with podman: stand-in bases, then the three CPU images on them.

    python -m tests.images.build base      # make base-image: Debian, python + ray stand-ins
    python -m tests.images.build images    # make images: operator, trainer and server (cpu)
    python -m tests.images.build sizes     # the built images' sizes (BENCHMARKS.md)

No registry but Debian's and PyPI answers on these machines, so nothing is pulled: the bases
are made with debootstrap (`tar | podman import`) and tests/images/*-standin.Containerfile.
Podman runs as root with the `runc` runtime and the cgroupfs manager (crun refuses the
hybrid cgroup layout here) and /etc/containers/containers.conf setting `default_ulimits = []`
(the sandbox refuses podman's default RLIMIT_NPROC); `make podman-setup` installs both.

pip inside a build uses this machine's own package-index settings, passed in at build time
and never written into a committed file: the settings pip itself reports (`pip config
list`: /etc/pip.conf, /etc/xdg/pip, the user's pip.conf) with the PIP_* variables on top
(they win, as in pip), merged into one pip.conf under ~/.cache that is mounted read-only at
/etc/pip.conf during each RUN; every local path those settings name (find-links folders with
the CPU torch wheel, file:// indexes, the CA bundle, constraint files) is mounted read-only
at the same path. The host network (`--network host`) reaches the same indexes as the host.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
# Global podman options for every call (see the module docstring).
PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs"]
STANDIN_REPO = "localhost/llmray-standin"
DEBIAN = f"{STANDIN_REPO}/debian:bookworm"
PYTHON_STANDIN = f"{STANDIN_REPO}/python:3.11-slim"
# e.g. localhost/llmray-standin/ray:2.60.0-py311-cpu
RAY_STANDIN_TAG = "{ray}-py311-cpu"
# Where images built on the stand-ins are tagged (never the release names on ghcr.io).
IMAGE_REPO = "localhost/llmray"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llmray-images"
# debootstrap's base: what the Dockerfiles need of Debian: Python 3.11 for venvs, its headers
# (C++ extensions such as DeepSpeed's ops build against them; Ray's conda Python and
# python:3.11-slim ship them), CA roots.
DEBOOTSTRAP_INCLUDE = "python3,python3-venv,libpython3.11-dev,ca-certificates"


def constraint(name: str) -> str:
    """The version constraints.txt pins, e.g. constraint("ray") -> "2.60.0"."""
    for line in (REPO / "constraints.txt").read_text().splitlines():
        pin = line.split("#", 1)[0].strip()
        if pin.lower().startswith(f"{name.lower()}=="):
            return pin.split("==", 1)[1]
    raise KeyError(f"constraints.txt pins no {name}")


def version() -> str:
    import llmray

    return llmray.__version__


def ray_standin() -> str:
    return f"{STANDIN_REPO}/ray:{RAY_STANDIN_TAG.format(ray=constraint('ray'))}"


def image_names() -> dict[str, str]:
    """The three CPU images built here, e.g. {"trainer": "localhost/llmray/trainer:0.1.0"}."""
    return {kind: f"{IMAGE_REPO}/{kind}:{version()}" for kind in ("operator", "trainer", "server")}


# --- this machine's pip settings ---------------------------------------------------------------


def pip_settings(config_list: str, environ: dict[str, str]) -> dict[str, dict[str, str]]:
    """`pip config list` output (`global.find-links='/opt/wheels'`) and PIP_* variables
    (`PIP_FIND_LINKS`, which pip applies to every command, i.e. `global`) as pip.conf
    sections; a variable wins over a file, as in pip."""
    sections: dict[str, dict[str, str]] = {}
    for line in config_list.splitlines():
        match = re.match(r"^([\w-]+)\.([\w-]+)=(.*)$", line.strip())
        if match:
            section, key, value = match.groups()
            sections.setdefault(section, {})[key] = _unquote(value)
    for name, value in environ.items():
        if name.startswith("PIP_") and name != "PIP_CONFIG_FILE":
            sections.setdefault("global", {})[name[4:].lower().replace("_", "-")] = value
    return sections


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def local_paths(sections: dict[str, dict[str, str]]) -> list[Path]:
    """The host folders and files the settings name, to mount at the same path: plain
    absolute paths that exist, and file:// URLs (for an index, its folder's parent: a
    `simple/` page links to `../../files/...`)."""
    found: list[Path] = []
    for values in sections.values():
        for value in values.values():
            for word in value.split():
                if word.startswith("file://"):
                    path = Path(word.removeprefix("file://"))
                    path = path.parent if path.name == "simple" else path
                elif word.startswith("/"):
                    path = Path(word)
                else:
                    continue
                if path.exists() and path not in found:
                    found.append(path)
    return found


def render_pip_conf(sections: dict[str, dict[str, str]]) -> str:
    parser = configparser.ConfigParser(interpolation=None)
    for section, values in sections.items():
        parser[section] = values
    out = []
    for section in parser.sections():
        out.append(f"[{section}]")
        out += [f"{key} = {value}" for key, value in parser[section].items()]
    return "\n".join(out) + "\n"


def host_pip_settings() -> dict[str, dict[str, str]]:
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    sections = pip_settings(listed, dict(os.environ))
    if "index-url" not in sections.get("global", {}):
        # The index pip uses when none is set, asked of pip itself: the Dockerfiles' CPU
        # torch index (TORCH_INDEX_URL) is replaced by it, and the CPU wheel then comes from
        # the find-links folder (2.13.0+cpu sorts above the index's 2.13.0).
        from pip._internal.models.index import PyPI

        sections.setdefault("global", {})["index-url"] = PyPI.simple_url
    return sections


def build_mounts(sections: dict[str, dict[str, str]]) -> list[str]:
    """`podman build` options: the merged pip.conf at /etc/pip.conf and every local path the
    settings name, read-only (and the host's CA bundle: pip's `cert` names it)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    conf = CACHE / "pip.conf"
    conf.write_text(render_pip_conf(sections))
    options = ["--volume", f"{conf}:/etc/pip.conf:ro"]
    for path in local_paths(sections):
        options += ["--volume", f"{path}:{path}:ro"]
    return options


# --- podman ------------------------------------------------------------------------------------


def podman(*args: str, check: bool = True, capture: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run([*PODMAN, *args], check=check, text=True, capture_output=capture)


def image_exists(name: str) -> bool:
    return podman("image", "exists", name, check=False).returncode == 0


def build(
    name: str,
    containerfile: Path,
    context: Path,
    build_args: dict[str, str],
    extra: Sequence[str] = (),
) -> float:
    """podman build with the host network and this machine's pip settings; layers cached
    (a rebuild reruns only what changed). Returns the seconds it took."""
    args = ["build", "--network", "host", "--layers", "-f", str(containerfile), "-t", name]
    for key, value in build_args.items():
        args += ["--build-arg", f"{key}={value}"]
    start = time.monotonic()
    podman(*args, *build_mounts(host_pip_settings()), *extra, str(context))
    return time.monotonic() - start


def debian_mirror() -> str | None:
    """The Debian mirror this machine's apt uses (its bookworm `URIs:` / `deb` line)."""
    sources = Path("/etc/apt/sources.list.d")
    texts = [p.read_text() for p in sorted(sources.glob("*.sources"))] if sources.exists() else []
    for text in texts:
        for stanza in text.split("\n\n"):
            uris = re.search(r"^URIs:\s*(\S+)", stanza, flags=re.M)
            suites = re.search(r"^Suites:.*\bbookworm\b", stanza, flags=re.M)
            if uris and suites and "security" not in uris[1]:
                return uris[1]
    listing = Path("/etc/apt/sources.list")
    if listing.exists():
        match = re.search(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+bookworm\s", listing.read_text(), re.M)
        if match:
            return match[1]
    return None


def base() -> dict[str, float]:
    """The Debian image (debootstrap), then the python and ray stand-ins on it."""
    took: dict[str, float] = {}
    if not image_exists(DEBIAN):
        start = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="llmray-rootfs-", dir="/var/tmp") as root:
            mirror = debian_mirror()
            subprocess.run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    f"--include={DEBOOTSTRAP_INCLUDE}",
                    "bookworm",
                    root,
                    *([mirror] if mirror else []),
                ],
                check=True,
            )
            tar = subprocess.Popen(["tar", "-C", root, "-c", "."], stdout=subprocess.PIPE)
            subprocess.run([*PODMAN, "import", "-", DEBIAN], stdin=tar.stdout, check=True)
            assert tar.wait() == 0, "tar of the Debian root file system failed"
        took["debian"] = time.monotonic() - start
    with tempfile.TemporaryDirectory(prefix="llmray-standin-") as context:
        shutil.copy(REPO / "constraints.txt", context)
        took["python-standin"] = build(
            PYTHON_STANDIN, HERE / "python-standin.Containerfile", Path(context), {}
        )
        took["ray-standin"] = build(
            ray_standin(),
            HERE / "ray-standin.Containerfile",
            Path(context),
            {"RAY_VERSION": constraint("ray")},
        )
    return took


def images(kinds: Sequence[str] = ("operator", "trainer", "server")) -> dict[str, float]:
    """The CPU images on the stand-ins, the repository root as context (as `make images`)."""
    names = image_names()
    pip = host_pip_settings()["global"]
    dockerfiles = {
        "operator": REPO / "operator" / "Dockerfile",
        "trainer": REPO / "trainer_image" / "Dockerfile",
        "server": REPO / "serve_image" / "Dockerfile",
    }
    took = {}
    for kind in kinds:
        args = {"VERSION": version()}
        if kind == "operator":
            args["BASE_IMAGE"] = PYTHON_STANDIN
        else:
            args |= {"BASE_IMAGE": ray_standin(), "VARIANT": "cpu"}
            args["TORCH_INDEX_URL"] = pip["index-url"]
        took[kind] = build(names[kind], dockerfiles[kind], REPO, args)
    return took


def sizes() -> dict[str, int]:
    """Bytes of each stand-in and built image (podman's uncompressed size)."""
    names = [DEBIAN, PYTHON_STANDIN, ray_standin(), *image_names().values()]
    out = {}
    for name in names:
        if image_exists(name):
            (info,) = json.loads(podman("image", "inspect", name, capture=True).stdout)
            out[name] = int(info["Size"])
    return out


def main(argv: list[str]) -> int:
    command, *rest = argv or ["images"]
    if command == "base":
        result: dict = base()
    elif command == "images":
        result = images(rest or ("operator", "trainer", "server"))
    elif command == "sizes":
        result = {name: f"{size / 1e9:.2f} GB" for name, size in sizes().items()}
    else:
        print(__doc__, file=sys.stderr)
        return 2
    for key, value in result.items():
        print(f"{key}: {value:.0f} s" if isinstance(value, float) else f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
