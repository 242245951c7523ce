"""The house's imports run one way and have no circles (pyproject's import-linter contracts).

import-linter reads imports inside functions too, so a lazy import cannot hide an upward one.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "quicksilver"
LINT = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))"


def _lint(root: Path) -> subprocess.CompletedProcess:
    """import-linter over the package under ``root/src`` with ``root/pyproject.toml``, in a fresh interpreter."""
    return subprocess.run([sys.executable, "-c", LINT], cwd=root, env={"PYTHONPATH": str(root / "src"), "PATH": ""},
                          capture_output=True, text=True, timeout=120)


def test_imports_keep_the_layers_and_have_no_circles():
    run = _lint(ROOT)
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_contract_catches_an_upward_import_inside_a_function(tmp_path):
    """A numerics module importing the engine lazily breaks the contracts (so the check above can fail)."""
    shutil.copytree(SRC, tmp_path / "src" / "quicksilver", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    quant = tmp_path / "src" / "quicksilver" / "quant.py"
    quant.write_text(quant.read_text() + "\n\ndef _upward():\n    from .engine import Engine\n\n    return Engine\n")
    run = _lint(tmp_path)
    assert run.returncode != 0
    assert "quicksilver.quant is not allowed to import quicksilver.engine" in run.stdout


def test_no_module_is_over_600_lines_and_engine_is_at_most_350():
    sizes = {p.relative_to(SRC).as_posix(): len(p.read_text().splitlines()) for p in SRC.rglob("*.py")}
    assert not {k: v for k, v in sizes.items() if v > 600}
    assert sizes["engine.py"] <= 350


def test_every_module_has_a_layer():
    """A module missing from the layers would escape the contract: each top-level module is named there."""
    import tomllib

    layers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]["layers"]
    named = {m.strip() for layer in layers for part in layer.split("|") for m in part.split(":")}
    modules = {p.stem for p in SRC.glob("*.py") if p.stem != "__init__"} | {p.name for p in SRC.iterdir() if (p / "__init__.py").is_file()}
    assert modules - named == set()
