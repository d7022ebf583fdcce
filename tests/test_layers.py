"""The layers of the house (ARCHITECTURE.md) for what import-linter cannot see: it takes packages
as roots, so `.importlinter` covers utils, models, dataset and benchmarks, and this test reads the
imports (lazy ones inside functions too) of the top-level modules and of the entry points.

From the bottom: utils/ (nothing of the project); models/ and dataset/ (utils only); then the
top-level modules in TOP_ORDER, each importing the packages and the modules before it; then the
entry points (a file with a `__main__` block), which import no other entry point.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("utils", "models", "dataset", "benchmarks")
TOP_ORDER = ("inference", "helper", "engine", "cli")  # each may import the ones before it
LIBRARIES_WITH_A_MAIN = {"dataset.synthetic"}  # a library (tests, demo, benchmarks) that also runs as a command
# bench_inria_eval is bench_inference's command line with Inria's defaults put in front
ENTRY_POINTS_THAT_WRAP = {"benchmarks.bench_inria_eval": {"benchmarks.bench_inference"}}


def imported(path: Path) -> set[str]:
    """Dotted names a file imports (absolute imports; `from a import b` gives a and a.b)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def is_entry_point(path: Path) -> bool:
    return "__main__" in path.read_text() and any(
        isinstance(n, ast.If) and "__main__" in ast.unparse(n.test) for n in ast.parse(path.read_text()).body)


TOP_LEVEL = sorted(p for p in ROOT.glob("*.py"))
PACKAGE_FILES = sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))
ENTRY_POINTS = {module_name(p) for p in TOP_LEVEL + PACKAGE_FILES if is_entry_point(p)} - LIBRARIES_WITH_A_MAIN


def project_imports(path: Path) -> set[str]:
    """The project's modules a file imports (top-level module names, or dotted package modules)."""
    tops = {p.stem for p in TOP_LEVEL}
    found = set()
    for name in imported(path):
        head = name.split(".")[0]
        if head in tops:
            found.add(head)
        elif head in PACKAGES and (ROOT / Path(*name.split("."))).with_suffix(".py").exists():
            found.add(name)
        elif head in PACKAGES and (ROOT / Path(*name.split(".")) / "__init__.py").exists():
            found.add(name)
    return found


def test_every_top_level_module_has_a_place():
    unplaced = [p.name for p in TOP_LEVEL if p.stem not in TOP_ORDER and p.stem not in ENTRY_POINTS]
    assert not unplaced, f"add each to TOP_ORDER (a layer) or give it a __main__ block (an entry point): {unplaced}"


@pytest.mark.parametrize("path", PACKAGE_FILES, ids=lambda p: module_name(p))
def test_packages_import_no_top_level_module(path):
    tops = {p.stem for p in TOP_LEVEL}
    wrong = {m for m in project_imports(path) if m in tops}
    if module_name(path).startswith("benchmarks"):  # benchmarks sit on top: anything but an entry point
        wrong = {m for m in wrong if m in ENTRY_POINTS}
    assert not wrong, f"{module_name(path)} imports {sorted(wrong)}"


@pytest.mark.parametrize("name", TOP_ORDER)
def test_top_level_modules_import_only_lower_layers(name):
    allowed = set(TOP_ORDER[: TOP_ORDER.index(name)])
    tops = {p.stem for p in TOP_LEVEL}
    wrong = {m for m in project_imports(ROOT / f"{name}.py") if m in tops and m not in allowed}
    assert not wrong, f"{name} imports {sorted(wrong)}; it may import {sorted(allowed) or 'no top-level module'}"


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_entry_points_import_no_other_entry_point(name):
    path = ROOT / (name.replace(".", "/") + ".py")
    wrong = {m for m in project_imports(path) if m in ENTRY_POINTS and m != name} - ENTRY_POINTS_THAT_WRAP.get(name, set())
    assert not wrong, f"{name} imports the entry point(s) {sorted(wrong)}: move what they share to a module"


def test_the_reader_sees_lazy_imports(tmp_path):
    """A check that cannot fail would prove nothing: an import inside a function counts."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from helper import STAGES\n    import engine.x\n")
    assert imported(f) == {"helper", "helper.STAGES", "engine.x"}
