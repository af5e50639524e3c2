"""The README's code blocks run as copied. Each block is preceded by a marker:
``<!-- readme-test: fast -->`` (run here), ``slow`` (run in order in a fresh copy of the tree by
``pytest -m slow``: the model install, the quickstart and the commands that use its
checkpoint), ``ci`` (the set-up commands, which ``.ci/run`` itself runs) or ``skip (reason)``."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(?:<!-- readme-test: (?P<mark>[^>]*?) -->\n)?```(?P<lang>\w*)\n(?P<code>.*?)```", re.S)


def blocks() -> list[tuple[str, str, str]]:
    return [(m["mark"] or "", m["lang"], m["code"]) for m in BLOCK.finditer((ROOT / "README.md").read_text())]


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")  # this environment's lightning-edit
    env.setdefault("MPLBACKEND", "Agg")
    return env


def _run(lang: str, code: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    if lang == "bash":
        cmd = ["bash", "-eo", "pipefail", "-c", code]
    elif lang == "python":
        cmd = [sys.executable, "-c", code]
    else:
        raise AssertionError(f"README block in {lang!r}: give it a readme-test marker of skip")
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


def test_every_code_block_is_classified():
    found = blocks()
    assert len(found) >= 5
    for mark, lang, code in found:
        assert mark.split(" ")[0] in ("fast", "slow", "ci", "skip"), f"README block without a readme-test marker:\n{code}"
        assert lang in ("bash", "python"), f"README block in {lang!r}:\n{code}"
        if mark.startswith("skip"):
            assert re.fullmatch(r"skip \(.+\)", mark), "a skipped block says why"


def test_the_set_up_commands_are_what_ci_runs():
    """The README's two commands (install + main job, install + tests) are the ones .ci/run uses."""
    (code,) = [c for m, _, c in blocks() if m == "ci"]
    ci = (ROOT / ".ci" / "run").read_text().replace(" --quiet", "")
    lines = [line.split("#")[0].strip() for line in code.strip().splitlines()]
    assert len(lines) == 2 and "lightning-edit fit -c configs/quickstart.yaml" in lines[0] and "pytest" in lines[1]
    for segment in (s.strip() for s in lines[1].split("&&")):
        assert segment.replace("pip install", "python -m pip install", 1) in ci, f"{segment!r} is not what .ci/run runs"
    assert lines[0].split("&&")[0].strip() == lines[1].split("&&")[0].strip()  # the same torch


def test_fast_blocks_run_as_copied():
    fast = [(lang, code) for m, lang, code in blocks() if m == "fast"]
    assert fast
    for lang, code in fast:
        r = _run(lang, code, ROOT, timeout=300)
        assert r.returncode == 0, f"README block failed ({r.returncode}):\n{code}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"


@pytest.mark.slow
def test_slow_blocks_run_in_order_in_a_fresh_copy(tmp_path):
    """The main job first (from the set-up block), then every slow block in README order, in a
    copy of the tree without caches (as a fresh clone has it): model install included."""
    copy = tmp_path / "clone"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", ".venv", "checkpoints", "logs", "*.egg-info",
                                                               "__pycache__", ".pytest_cache", "lightning_logs"))
    steps = []
    for mark, lang, code in blocks():
        if mark == "ci":  # the main job only: installing and the test suite are .ci/run's
            job = [s.strip() for line in code.splitlines() for s in line.split("#")[0].split("&&")]
            steps.append(("bash", "\n".join(s for s in job if s.startswith("lightning-edit"))))
        elif mark == "slow":
            steps.append((lang, code))
    for lang, code in steps:
        r = _run(lang, code, copy, timeout=1800)
        assert r.returncode == 0, f"README block failed ({r.returncode}):\n{code}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"


def test_configuration_reference_is_current():
    """docs/configuration.md is generated from the code (python tools/config_reference.py)."""
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "config_reference.py"), "--check"], cwd=ROOT,
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    text = (ROOT / "docs" / "configuration.md").read_text()
    for key in ("`model.layers`", "`model.residual.steps`", "`editor.stats.corpus`", "`data.batch_size`", "`report.probes`"):
        assert key in text
