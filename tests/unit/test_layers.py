"""The dependency direction of STYLE.md, checked on the source: the core imports no process
package and not the CLI; the agent and the coordinator never import each other.

(import-linter cannot see these packages: setuptools' package-dir maps cli/, coordinator/ and
edge_agent/ under fsl_edge only through an import hook, and grimp walks the fsl_edge folder.)
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"fsl_edge": ROOT / "fsl_edge", "fsl_edge.cli": ROOT / "cli",
            "fsl_edge.coordinator": ROOT / "coordinator", "fsl_edge.edge_agent": ROOT / "edge_agent",
            "fsl_edge.split_worker": ROOT / "split_worker"}
# A split-server worker is the coordinator's trunk scaled out: it reads the coordinator's
# settings (the same config file), never the other way round.
FORBIDDEN = {
    "fsl_edge": ("fsl_edge.cli", "fsl_edge.coordinator", "fsl_edge.edge_agent", "fsl_edge.split_worker"),
    "fsl_edge.coordinator": ("fsl_edge.edge_agent", "fsl_edge.cli", "fsl_edge.split_worker"),
    "fsl_edge.edge_agent": ("fsl_edge.coordinator", "fsl_edge.cli", "fsl_edge.split_worker"),
    "fsl_edge.split_worker": ("fsl_edge.edge_agent", "fsl_edge.cli"),
}


def imports_of(path: Path, package: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this file's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found |= {f"{module}.{a.name}" for a in node.names}
    return found


def sources(package: str):
    folder = PACKAGES[package]
    files = folder.glob("*.py") if package == "fsl_edge" else folder.rglob("*.py")
    return sorted(files)


@pytest.mark.parametrize("package", list(FORBIDDEN))
def test_layering(package):
    checked = 0
    for path in sources(package):
        for module in imports_of(path, package):
            for banned in FORBIDDEN[package]:
                assert not (module == banned or module.startswith(banned + ".")), \
                    f"{path.relative_to(ROOT)} imports {module}: {package} must not import {banned}"
        checked += 1
    assert checked > 0, f"no sources found for {package}"


def test_checker_sees_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from .coordinator import server\nimport fsl_edge.edge_agent.main\n")
    found = imports_of(bad, "fsl_edge")
    assert "fsl_edge.coordinator.server" in found and "fsl_edge.edge_agent.main" in found
