"""A fresh install gets the versions the tests ran with, not the newest of the day.

requirements*.txt pin what we import; constraints.txt (bin/lock) pins what
those need in turn (Werkzeug, limits, greenlet, ...), and requirements.txt
applies it. A new release of one of them must not reach a deployment or CI
before the tests have run with it.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.support.server import REPO


def _pins(path: Path) -> dict[str, str]:
    """The `name==version` lines of a requirements or constraints file, by canonical name."""
    pins = re.findall(r"^([A-Za-z0-9._-]+)==(\S+)$", path.read_text(), re.M)
    return {canonicalize_name(name): version for name, version in pins}


def test_requirements_apply_the_constraints() -> None:
    assert "-c constraints.txt" in (REPO / "requirements.txt").read_text().splitlines()


def test_every_package_installed_for_the_app_and_its_tests_is_locked_at_its_installed_version() -> None:
    locked = _pins(REPO / "constraints.txt")
    direct = {**_pins(REPO / "requirements.txt"), **_pins(REPO / "requirements-dev.txt")}
    assert {name: locked.get(name) for name in direct} == direct
    # Everything the direct pins need, with the extras they ask for, walked through the installed metadata.
    todo = [(name, frozenset()) for name in direct]
    seen: set[tuple[str, frozenset[str]]] = set()
    unlocked: dict[str, str] = {}
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        version = metadata.version(name)
        if locked.get(name) != version:
            unlocked[name] = f"installed {version}, locked {locked.get(name)}"
        for spec in metadata.requires(name) or []:
            needed = Requirement(spec)
            if needed.marker is None or any(needed.marker.evaluate({"extra": extra}) for extra in extras or {""}):
                todo.append((canonicalize_name(needed.name), frozenset(needed.extras)))
    assert not unlocked, f"run bin/lock: {unlocked}"
    assert len(seen) > len(direct)  # the walk went past the direct pins
