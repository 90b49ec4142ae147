"""The layers contract ([tool.importlinter] in pyproject.toml) holds, and it is not vacuous: a lower layer that
imports a higher one breaks it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def lint_imports(package_parent: Path) -> subprocess.CompletedProcess[str]:
    """Run import-linter with the project's contract on the ``aggregator`` package found in ``package_parent``."""
    script = Path(sys.executable).parent / "lint-imports"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "importlinter.cli"]
    env = {**os.environ, "PYTHONPATH": str(package_parent)}
    return subprocess.run([*command, "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=package_parent,
                          env=env, capture_output=True, text=True, timeout=300)


def test_the_package_keeps_its_layers() -> None:
    done = lint_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 kept, 0 broken" in done.stdout


def test_a_value_module_importing_the_runtime_breaks_the_contract(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "aggregator", tmp_path / "aggregator", ignore=shutil.ignore_patterns("__pycache__"))
    values = tmp_path / "aggregator" / "values.py"
    values.write_text(values.read_text() + "\n\nfrom aggregator import runtime  # noqa: E402  a lower layer, upwards\n")
    done = lint_imports(tmp_path)
    assert done.returncode != 0
    assert "aggregator.values is not allowed to import aggregator.runtime" in done.stdout
