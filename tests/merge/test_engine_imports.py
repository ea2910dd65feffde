"""The merge engine runs on a bare GPU host: it imports nothing but the standard library, torch, numpy,
safetensors, the error table and the pure `formats` modules (the LoRA rules and the safetensors parser).

Read from the source (every import statement, inside functions and TYPE_CHECKING blocks too), following
loreg's own modules: what the engine's allowed loreg modules import must keep to the same rule.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the `loreg` package
MERGE = REPO / "registry" / "merge"
NOT_ENGINE = {"worker.py", "combine_worker.py", "__init__.py"}  # the workers (database, storage) call the engine, not the reverse

THIRD_PARTY = {"torch", "numpy", "safetensors"}
RULES = "loreg.registry.formats.lora"
ALLOWED_LOREG = {"loreg.registry.errors", RULES, "loreg.registry.formats.safetensors"}
PACKAGES = {"loreg", "loreg.registry", "loreg.registry.formats", "loreg.registry.merge"}  # empty __init__ files


def _engine_modules() -> set[str]:
    return {f"loreg.registry.merge.{p.stem}" for p in MERGE.glob("*.py") if p.name not in NOT_ENGINE}


def _path(module: str) -> Path | None:
    parts = module.split(".")[1:]
    for candidate in (REPO.joinpath(*parts).with_suffix(".py"), REPO.joinpath(*parts, "__init__.py")):
        if parts and candidate.is_file():
            return candidate
    return REPO / "__init__.py" if not parts else None


def imports(source: str, module: str) -> set[str]:
    """Every module ``source`` (the text of ``module``) imports, by absolute name, wherever the statement is.

    ``from package import name`` counts as ``package.name`` when that is a loreg module, else as ``package``.
    """
    package = module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base == "__future__":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if base.startswith("loreg") and _path(sub) is not None else base)
    return found


def violations(source: str, module: str, allowed_loreg: set[str], third_party: set[str]) -> list[str]:
    """The imports of ``module`` outside the standard library, ``third_party`` and ``allowed_loreg``."""
    bad = []
    for name in sorted(imports(source, module)):
        top = name.split(".")[0]
        if top == "loreg":
            if name not in allowed_loreg and name not in PACKAGES:
                bad.append(f"{module} imports {name}")
        elif top not in sys.stdlib_module_names and top not in third_party:
            bad.append(f"{module} imports {name}")
    return bad


def test_the_engine_and_what_it_reaches_in_loreg_import_only_what_a_bare_gpu_host_has() -> None:
    engine = _engine_modules()
    assert {"loreg.registry.merge.engine", "loreg.registry.merge.plan", "loreg.registry.merge.pipeline",
            "loreg.registry.merge.ops"} <= engine
    allowed = engine | ALLOWED_LOREG
    seen: set[str] = set()
    todo = sorted(engine)
    bad: list[str] = []
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        path = _path(module)
        assert path is not None, module
        source = path.read_text()
        bad += violations(source, module, allowed, THIRD_PARTY)
        todo += [m for m in imports(source, module) if m.startswith("loreg") and m in allowed]
    assert bad == []
    assert ALLOWED_LOREG <= seen  # the engine uses the rules module, not copies of its rules


def test_the_lora_rules_the_safetensors_parser_and_the_error_table_import_only_the_standard_library() -> None:
    for module in (RULES, "loreg.registry.formats.safetensors", "loreg.registry.errors"):
        path = _path(module)
        assert path is not None
        assert violations(path.read_text(), module, {"loreg.registry.errors"}, set()) == []


def test_the_check_refuses_formats_peft_wherever_the_import_is_written() -> None:
    """formats.peft needs pydantic and RE2, formats.validate needs formats.peft: neither may enter the engine."""
    allowed = _engine_modules() | ALLOWED_LOREG
    module = "loreg.registry.merge.plan"
    sources = {
        "top level": "from loreg.registry.formats.peft import AdapterConfig\n",
        "package form": "from loreg.registry.formats import lora, peft\n",
        "relative": "from ..formats import validate\n",
        "plain import": "import loreg.registry.formats.validate\n",
        "type checking": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                         "    from loreg.registry.formats.peft import AdapterConfig\n",
        "in a function": "def f():\n    from loreg.registry.formats.peft import parse_adapter_config\n",
        "the worker": "from loreg.registry.merge import worker\n",
        "pydantic": "def f():\n    import pydantic\n",
    }
    for case, source in sources.items():
        assert violations(source, module, allowed, THIRD_PARTY), case
    fine = "import os\nimport torch\nfrom loreg.registry.formats import lora\nfrom . import ops\n"
    assert violations(fine, module, allowed, THIRD_PARTY) == []
