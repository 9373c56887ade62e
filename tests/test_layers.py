"""Imports run one way (ARCHITECTURE.md): a module of llmc imports only from its own row or rows below it.

Read from the source (every `from X import` / `import X`, at module level or inside functions), so a
new import that climbs back up fails here instead of growing a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = ["commands", "driver", "stages", "report", "serving", "measure", "runtime", "frontend", "engine", "recipe",
        "passes", "plugins", "leaf"]
SAME_ROW = {"passes": "plugins", "plugins": "passes"}  # siblings: a pass may name the plugin it targets


def row(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] in ("passes", "plugins"):
        return parts[0]
    if parts[0] != "compiler":
        return None
    if len(parts) == 1:
        return "leaf"
    if parts[1] == "triton_models":  # re-exports of compiler.serving.triton_models
        return "serving"
    if parts[1] == "__main__":
        return "commands"
    return parts[1] if parts[1] in ROWS else "leaf"


def imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
        elif isinstance(node, ast.Import):
            out += [alias.name for alias in node.names]
    return out


def test_every_import_points_down_or_sideways():
    files = [p for folder in ("compiler", "passes", "plugins") for p in (ROOT / folder).rglob("*.py")]
    assert len(files) > 80
    upward = []
    for path in files:
        source = row(".".join(path.relative_to(ROOT).with_suffix("").parts))
        for target in map(row, imports(path)):
            if target and ROWS.index(target) < ROWS.index(source) and SAME_ROW.get(source) != target:
                upward.append(f"{path.relative_to(ROOT)} ({source}) imports {target}")
    assert not upward, "\n".join(upward)


def test_the_check_sees_an_upward_import(tmp_path):
    assert row("compiler.driver.build") == "driver" and row("compiler.graph_io") == "leaf"
    assert ROWS.index(row("compiler.stages.state")) < ROWS.index(row("compiler.runtime.runner"))
    bad = tmp_path / "m.py"
    bad.write_text("def f():\n    from compiler.driver.build import run_build\n")
    assert imports(bad) == ["compiler.driver.build"]
