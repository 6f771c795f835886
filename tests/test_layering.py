"""Product, not lab: the engine never imports the tooling (moe_offload.tools) or the command line (cli.py).

The engine is every module of moe_offload except cli.py and tools/. cli.py is the front door and may import both;
tools may import the engine but not cli (that was the cli <-> benchmark/simulate cycle). The check reads the
source (ast), so an import hidden inside a function counts as much as one at the top; then every module of the
package must import.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import moe_offload

PACKAGE = moe_offload.__name__
ROOT = Path(moe_offload.__file__).resolve().parent
# the only imports a module may lack on some machines (fastapi, uvicorn: the [serve] extra, moe_offload/server)
OPTIONAL = {"triton", "numba", "llvmlite", "fastapi", "uvicorn", "starlette"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, name: str, is_package: bool = False) -> set[str]:
    """Absolute names of everything `source` (the module `name`) imports, anywhere in the file. For
    `from X import y` both X and X.y are listed, since y may be a submodule."""
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def forbidden(imports: set[str], banned: tuple[str, ...]) -> set[str]:
    return {name for name in imports if any(name == b or name.startswith(b + ".") for b in banned)}


def package_files() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def is_tool(name: str) -> bool:
    return name == f"{PACKAGE}.tools" or name.startswith(f"{PACKAGE}.tools.")


ENGINE = {name: path for name, path in package_files().items() if name != f"{PACKAGE}.cli" and not is_tool(name)}
TOOLS = {name: path for name, path in package_files().items() if is_tool(name)}


def imports_of(path: Path) -> set[str]:
    return imported_modules(path.read_text(encoding="utf-8"), module_name(path), path.name == "__init__.py")


@pytest.mark.parametrize("name", sorted(ENGINE))
def test_engine_imports_no_tools_and_no_cli(name):
    bad = forbidden(imports_of(ENGINE[name]), (f"{PACKAGE}.tools", f"{PACKAGE}.cli"))
    assert not bad, f"{name} (engine) imports {sorted(bad)}: the engine must not depend on the lab or the CLI"


@pytest.mark.parametrize("name", sorted(TOOLS))
def test_tools_do_not_import_cli(name):
    bad = forbidden(imports_of(TOOLS[name]), (f"{PACKAGE}.cli",))
    assert not bad, f"{name} imports {sorted(bad)}: cli imports the tools, so this is an import cycle"


def test_policy_sees_expert_ids_only():
    """policy/ (slot table, LRU, LFRU, MIN, allocation, prefetch) is replayed offline on the CPU: no torch, nothing
    of the mechanism, only its own modules; only the tensor forms (policy/device_lru.py, device_lfru.py) import
    torch."""
    tensor_forms = ("device_lru.py", "device_lfru.py")
    for path in sorted((ROOT / "policy").glob("*.py")):
        if path.name in tensor_forms:
            continue
        found = {name for name in imports_of(path) if not name.startswith(f"{PACKAGE}.policy.")}
        assert not forbidden(found, ("torch", "numpy", PACKAGE)), (path.name, sorted(found))
    assert all("torch" in imports_of(ROOT / "policy" / name) for name in tensor_forms)


def test_the_check_sees_real_imports():
    """The scan must find what is there, or the tests above would pass on anything."""
    assert {f"{PACKAGE}.cache", f"{PACKAGE}.policy", f"{PACKAGE}.pipeline"} <= set(ENGINE)
    assert {f"{PACKAGE}.tools.benchmark", f"{PACKAGE}.tools.simulate", f"{PACKAGE}.tools.info"} <= set(TOOLS)
    assert f"{PACKAGE}.policy" in imports_of(ENGINE[f"{PACKAGE}.cache"])
    cli = imports_of(ROOT / "cli.py")  # imports inside functions included
    assert {f"{PACKAGE}.tools.benchmark", f"{PACKAGE}.tools.info"} <= cli
    assert forbidden(cli, (f"{PACKAGE}.tools",))
    sneaky = "def f():\n    from ..tools import simulate\n    import moe_offload.cli\n"
    found = imported_modules(sneaky, f"{PACKAGE}.kernels.some_kernel")
    assert forbidden(found, (f"{PACKAGE}.tools", f"{PACKAGE}.cli")) == {
        f"{PACKAGE}.tools", f"{PACKAGE}.tools.simulate", f"{PACKAGE}.cli"}
    assert not forbidden(imported_modules("from . import toolsmith\n", f"{PACKAGE}.x"), (f"{PACKAGE}.tools",))


def test_every_module_imports():
    failures: list[str] = []
    names: list[str] = []

    def on_error(name: str) -> None:
        failures.append(f"{name}: package failed to import")

    for info in pkgutil.walk_packages(moe_offload.__path__, f"{PACKAGE}.", onerror=on_error):
        names.append(info.name)
        try:
            importlib.import_module(info.name)
        except ModuleNotFoundError as err:
            if (err.name or "").split(".")[0] not in OPTIONAL:
                failures.append(f"{info.name}: {err!r}")
        except Exception as err:  # noqa: BLE001  (any failure to import is the finding)
            failures.append(f"{info.name}: {err!r}")
    assert not failures, "\n".join(failures)
    assert set(names) >= set(ENGINE) - {PACKAGE} | set(TOOLS) | {f"{PACKAGE}.cli"}
