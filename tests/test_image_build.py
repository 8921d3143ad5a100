"""tests/images/build.py's pure parts: how this machine's pip settings reach a build."""

from __future__ import annotations

from pathlib import Path

from tests.images import build


def test_pip_settings_merge_the_files_and_let_variables_win() -> None:
    listed = (
        "global.find-links='/opt/wheels'\n"
        "global.extra-index-url='file:///opt/pypi/simple file:///opt/pypi-more/simple'\n"
        "global.cert='/etc/ssl/certs/ca-certificates.crt'\n"
        "install.no-compile='true'\n"
    )
    env = {"PIP_FIND_LINKS": "/srv/wheels", "PIP_DEFAULT_TIMEOUT": "180", "HOME": "/root"}
    sections = build.pip_settings(listed, env)
    assert sections["global"]["find-links"] == "/srv/wheels"  # PIP_* wins, as in pip
    assert sections["global"]["default-timeout"] == "180"
    assert sections["global"]["cert"] == "/etc/ssl/certs/ca-certificates.crt"
    assert sections["install"] == {"no-compile": "true"}
    text = build.render_pip_conf(sections)
    assert "[global]\n" in text and "extra-index-url = file:///opt/pypi/simple" in text


def test_local_paths_are_the_existing_folders_and_files_the_settings_name(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    index = tmp_path / "pypi" / "simple"
    index.mkdir(parents=True)
    cert = tmp_path / "ca.crt"
    cert.write_text("x")
    sections = {
        "global": {
            "find-links": str(wheels),
            # a simple/ page links to ../../files/: the index's parent is mounted
            "extra-index-url": f"file://{index} https://example.invalid/simple",
            "cert": str(cert),
            "constraint": str(tmp_path / "missing.txt"),
            "timeout": "60",
        }
    }
    assert build.local_paths(sections) == [wheels, tmp_path / "pypi", cert]


def test_images_are_tagged_apart_from_the_release_names() -> None:
    names = build.image_names()
    assert set(names) == {"operator", "trainer", "server"}
    assert all(n.startswith("localhost/llmray/") for n in names.values())
    assert build.ray_standin().endswith(f":{build.constraint('ray')}-py311-cpu")
