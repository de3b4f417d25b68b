"""The packages' layering, read from the source: each package imports only itself and the packages below
it (core < data_plane < trainers < tune, cluster < tessera), with the schema modules (pydantic only)
the one exception every layer may take; and those schemas, with the run config composed of them,
import no torch."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYER = {"core": 0, "data_plane": 1, "trainers": 2, "tune": 3, "cluster": 3, "tessera": 4}
SCHEMAS = {"core.config", "core.run_config", "data_plane.config", "trainers.config", "tune.config"}


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in a file, at any depth (lazy imports count too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@pytest.mark.parametrize("package", sorted(LAYER))
def test_a_package_imports_only_itself_and_the_layers_below(package):
    wrong = []
    for path in sorted((ROOT / package).rglob("*.py")):
        here = module_name(path)
        for line, module in imports(path):
            top = module.split(".")[0]
            if top not in LAYER or top == package or module in SCHEMAS and here != "core.config":
                continue
            if here in SCHEMAS:
                wrong.append(f"{path.relative_to(ROOT)}:{line} {module} (a schema imports only schemas)")
            elif LAYER[top] >= LAYER[package]:
                wrong.append(f"{path.relative_to(ROOT)}:{line} {module}")
    assert not wrong, "imports that reach up or across:\n" + "\n".join(wrong)


def test_schemas_and_run_config_import_no_torch():
    code = ("import sys, core.run_config, tessera.config, cluster.spec; "
            "print(sorted(m for m in ('torch', 'monai', 'deepspeed', 'ray') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_volume_ingest_and_slide_ingest_do_not_import_each_others_internals():
    volumes = {module for _, module in imports(ROOT / "data_plane" / "volumes.py")}
    assert "data_plane.ingest" not in volumes  # the cycle ingest <-> volumes goes through data_plane.sources
