"""The engine package stays free of Ray and gRPC: importing all of it loads neither."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = ("ray", "grpc", "actors", "cluster", "deploy")


def test_no_engine_module_imports_ray_grpc_or_the_layers_above():
    offenders = []
    for path in sorted((REPO / "specmoe").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            offenders += [f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    allowed = {"specmoe/__init__.py: deploy.client"}  # specmoe.connect() forwards to the client, lazily
    assert [o for o in offenders if o not in allowed] == []


def test_importing_every_engine_module_loads_neither_ray_nor_grpc():
    modules = sorted(
        ".".join(p.relative_to(REPO).with_suffix("").parts) for p in (REPO / "specmoe").rglob("*.py") if p.name != "__init__.py"
    )
    code = "import importlib, sys\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules) + \
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'grpc')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
