"""Repository hygiene: ruff is clean and CI runs the README's own test command."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_is_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    proc = subprocess.run(
        [ruff, "check", "loramux", "tests", "benchmarks"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff_format_is_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    proc = subprocess.run(
        [ruff, "format", "--check", "loramux", "tests", "benchmarks"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "<!-- test-command -->" in readme and "<!-- serve-command -->" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert "test-command" in ci and "README.md" in ci
    head = readme.split("## ", 1)[0]  # both commands open the README, before any section
    assert head.index("<!-- serve-command -->") < head.index("<!-- test-command -->")


def test_every_package_folder_has_an_init_so_a_regular_install_ships_it():
    for folder in (ROOT / "loramux").rglob("*"):
        if folder.is_dir() and folder.name != "__pycache__" and any(folder.glob("*.py")):
            assert (folder / "__init__.py").is_file(), f"{folder} has no __init__.py"


def test_the_readme_python_examples_import_only_what_the_readme_install_brings():
    """Issue 28: the README's `openai` example failed after the README's own install (`pip install
    -e .`, no extras): every module a README Python block imports is a main dependency (or loramux)."""
    import re
    import tomllib

    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks
    imported = {
        m.group(1).split(".")[0]
        for b in blocks
        for m in re.finditer(r"^\s*(?:from|import)\s+([A-Za-z_][\w.]*)", b, flags=re.M)
    }
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=!\[ ;]", d, maxsplit=1)[0].replace("-", "_") for d in deps}
    stdlib = set(sys.stdlib_module_names)
    missing = sorted(imported - names - stdlib - {"loramux"})
    assert not missing, f"README examples import {missing}, which `pip install -e .` does not install"
