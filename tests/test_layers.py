"""The packages' layering, read from the source. core imports no project package; data_plane only core;
trainers only core and data_plane; tune neither tessera nor cluster; cluster nothing of the project at
import time (its commands import what they run); tessera, the command line, anything. Every section's
config schema lives in core (core/*_config.py, composed by core/run_config.py), so every package takes
a validated config without reaching up; and the run config imports no torch."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROJECT = {"core", "data_plane", "trainers", "tune", "cluster", "tessera"}
MAY_IMPORT = {"core": set(), "data_plane": {"core"}, "trainers": {"core", "data_plane"},
              "tune": {"core", "data_plane", "trainers"}, "tessera": PROJECT}


def imports(path: Path, module_level_only: bool = False) -> list[tuple[int, str]]:
    """(line, module) of the absolute imports of a file: all of them (lazy ones inside functions count),
    or only those that run when the module is imported."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else ast.walk(tree)
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_a_package_imports_only_the_layers_below(package):
    wrong = [f"{path.relative_to(ROOT)}:{line} {module}"
             for path in sorted((ROOT / package).rglob("*.py")) for line, module in imports(path)
             if module.split(".")[0] in PROJECT - {package} - MAY_IMPORT[package]]
    assert not wrong, "imports that reach up or across:\n" + "\n".join(wrong)


def test_cluster_imports_nothing_of_the_project_when_loaded():
    wrong = [f"{path.relative_to(ROOT)}:{line} {module}"
             for path in sorted((ROOT / "cluster").rglob("*.py")) for line, module in imports(path, True)
             if module.split(".")[0] in PROJECT - {"cluster"}]
    assert not wrong, "module-level imports of project code in cluster:\n" + "\n".join(wrong)
    code = ("import sys, cluster, cluster.spec, cluster.backends, cluster.registry; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('core', 'data_plane', 'trainers', 'tune', 'tessera')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def test_the_run_config_imports_no_torch():
    code = ("import sys, core.run_config, tessera.config; "
            "print(sorted(m for m in ('torch', 'monai', 'deepspeed', 'ray') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_volume_ingest_and_slide_ingest_do_not_import_each_others_internals():
    volumes = {module for _, module in imports(ROOT / "data_plane" / "volumes.py")}
    assert "data_plane.ingest" not in volumes  # the cycle ingest <-> volumes goes through data_plane.sources
