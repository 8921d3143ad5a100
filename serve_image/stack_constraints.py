"""Constraints for installing after a package that brings its own pinned stack (vLLM).

    python stack_constraints.py constraints.txt > after.txt

Prints the version of every distribution installed now, then constraints.txt's pins for the
ones not installed: what comes next may add packages, never move one the stack chose.
(constraints.txt as a whole conflicts with vLLM's pins: fastapi, numpy, transformers, ...)
"""

from __future__ import annotations

import importlib.metadata
import re
import sys


def name(requirement: str) -> str:
    """PEP 503 normalized distribution name of `Foo_Bar[x]==1.0` -> `foo-bar`."""
    bare = re.split(r"[=<>~!;\[\s]", requirement.strip(), maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", bare).lower()


def merged(constraints: list[str], installed: dict[str, str]) -> list[str]:
    pins = [f"{n}=={v}" for n, v in sorted(installed.items())]
    rest = [
        line.strip()
        for line in constraints
        if line.strip() and not line.lstrip().startswith("#") and name(line) not in installed
    ]
    return pins + rest


def main() -> None:
    installed = {
        name(d.metadata["Name"]): d.version
        for d in importlib.metadata.distributions()
        if d.metadata["Name"]
    }
    with open(sys.argv[1]) as f:
        print("\n".join(merged(f.readlines(), installed)))


if __name__ == "__main__":
    main()
