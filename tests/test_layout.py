"""The package's plan holds: imports flow one way between the packages, and only the backbone table and
the backbones' own folders name a backbone (docs/backbones.md)."""

from __future__ import annotations

import ast
import pathlib
import re

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "mrrm_jax"

# Lower tiers first; a module may import its own package and any lower tier, never a higher one or a
# sibling of its own tier. The command lines (top-level modules) may import anything.
TIERS = [("core",), ("models",), ("data",), ("backbones",), ("scoring", "interop"),
         ("training", "benchmarks", "serving"), ("rl", "sources"), ("policy",)]
TIER = {package: level for level, packages in enumerate(TIERS) for package in packages}


def _imported_packages(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mrrm_jax":
            parts = node.module.split(".")
            names |= {alias.name for alias in node.names} if len(parts) == 1 else {parts[1]}
        elif isinstance(node, ast.Import):
            names |= {a.name.split(".")[1] for a in node.names if a.name.startswith("mrrm_jax.")}
    return names


def test_imports_flow_one_way():
    assert set(TIER) == {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        package = path.relative_to(PACKAGE).parts[0]
        if package not in TIER:  # a command line
            continue
        for name in _imported_packages(path) - {package}:
            if name in TIER and TIER[name] >= TIER[package]:
                upward.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert not upward, upward


def test_no_code_outside_the_backbones_branches_on_the_model():
    # a comparison with a backbone's name, or a type test of its config
    branch = re.compile(r"[!=]=\s*['\"](molmo2|qwen3_vl)['\"]|['\"](molmo2|qwen3_vl)['\"]\s*[!=]=|"
                        r"isinstance\([^)]*(Molmo2|Qwen3VL)Config")
    found = [f"{path.relative_to(PACKAGE)}:{number}" for path in sorted(PACKAGE.rglob("*.py"))
             if path.relative_to(PACKAGE).parts[0] != "backbones"
             for number, line in enumerate(path.read_text().splitlines(), 1) if branch.search(line)]
    assert not found, found
