"""The install a fresh machine gets: every declared dependency is pinned in constraints.txt at a
version inside its declared range, and every range stops below the next major release."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        reqs += [Requirement(r) for r in extra]
    return reqs


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_every_dependency_is_pinned_inside_its_declared_range():
    pins = _pins()
    for req in _requirements():
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        if name == "torch":  # the user installs the build for their hardware first (CI: 2.13.0)
            assert "torch" not in pins
            continue
        assert name in pins, f"{req.name} is declared in pyproject.toml but not pinned in constraints.txt"
        assert req.specifier.contains(Version(pins[name]), prereleases=True), \
            f"constraints.txt pins {req.name}=={pins[name]} outside the declared {req.specifier}"


def test_every_range_stops_below_a_next_release():
    for req in _requirements():
        assert any(s.operator in ("<", "<=", "==", "~=") for s in req.specifier), \
            f"{req} has no upper bound: a new major release could change behaviour unnoticed"


def test_imports_point_down_without_a_circle():
    """The package's import graph has no circle (imports inside functions count too), no import
    points up a layer (docs/architecture.md), and no
    module imports one of the package's own modules, or the standard library, inside a function
    (only optional or heavy third-party packages are imported lazily)."""
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(__file__).resolve().parents[1] / "tools" / "import_graph.py"
    out = subprocess.run([sys.executable, str(tool), "-v"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "cycles (incl. function-level imports): []" in out.stdout
    assert "imports pointing up: []" in out.stdout  # engine < data / evaluation / longform < stream / builtin / trace < shell
    inner = [line.split(":", 1)[1].strip() for line in out.stdout.splitlines() if line.startswith("  inner ")]
    own = [s for s in inner if "lightning_edit" in s]
    stdlib = [s for s in inner if s.split()[1].split(".")[0] in sys.stdlib_module_names]
    assert not own and not stdlib, own + stdlib
