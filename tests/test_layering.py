"""The layers, read from the imports (those inside functions count): services know nothing of the
HTTP layer, and the server package nothing of the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:  # relative: resolve against the file's package
                package = ".".join(("loreg", *path.relative_to(ROOT).parent.parts)).split(".")
                base = ".".join(package[: len(package) - node.level + 1] + [node.module])
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def offenders(folder: str, forbidden: str) -> list[str]:
    return [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in sorted((ROOT / folder).rglob("*.py"))
        for line, name in imports(path)
        if name == forbidden or name.startswith(forbidden + ".")
    ]


def test_services_import_nothing_from_the_api() -> None:
    assert offenders("registry/services", "loreg.registry.api") == []


def test_the_server_package_imports_nothing_from_the_cli() -> None:
    assert offenders("registry", "loreg.cli") == []


def test_the_walk_sees_imports_inside_functions(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("import os\n\n\ndef f():\n    from loreg.cli import config\n")
    assert imports(probe) == [(1, "os"), (5, "loreg.cli.config")]
