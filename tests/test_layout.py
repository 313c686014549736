"""Project layout promises: every test file runs under a CMake label, and kernels/ installs as
energyvit.kernels (no top-level `kernels` module in site-packages)."""
import re
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def test_every_test_file_belongs_to_a_cmake_suite():
    cmake = (ROOT / "CMakeLists.txt").read_text()
    listed = set(re.findall(r"tests/(test_\w+\.py)", cmake))
    on_disk = {p.name for p in (ROOT / "tests").glob("test_*.py")}
    assert on_disk <= listed, f"not in any CMake suite: {sorted(on_disk - listed)}"


def test_kernels_install_as_a_subpackage():
    setup = (ROOT / "setup.py").read_text()
    assert '"energyvit.kernels": "kernels"' in setup
    import energyvit.kernels

    assert Path(energyvit.kernels.__file__).parent.name == "kernels"
    assert energyvit.kernels.__name__ == "energyvit.kernels" and energyvit.__name__ == "energyvit"


def _imports(path: Path, package: str) -> set[str]:
    """energyvit modules that `path` imports anywhere (top level or inside functions)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("energyvit")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("energyvit"):
            # `from energyvit.commands import bench` imports the submodule when there is one
            found |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            base = f"{base}.{node.module}" if node.module else base
            found |= {f"{base}.{a.name}" for a in node.names} | ({base} if node.module else set())
    return found


def test_no_import_cycle_between_modules():
    modules = {}
    for path in (ROOT / "energyvit").rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    for path in (ROOT / "kernels").glob("*.py"):
        modules["energyvit.kernels" + ("" if path.stem == "__init__" else f".{path.stem}")] = path
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        graph[name] = {m for m in _imports(path, package) if m in modules and m != name}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [name, dep] if dep in path else [name, dep]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if dep not in state:
                visit(dep, path + [name])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_cli_reference_matches_the_parsers():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, str(ROOT / "docs" / "make_cli_tables.py"), "--check"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_readme_is_short_and_its_layout_names_real_paths():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 260
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    block = [line for line in layout.splitlines() if line.startswith("    ")]
    folder = ""
    for line in block:
        entry = line.strip().split("  ")[0]
        depth = (len(line) - len(line.lstrip())) // 2
        names = [n.strip() for n in entry.split(",") if n.strip()]
        for name in names:
            path = ROOT / (folder + name if depth > 2 else name)
            assert path.exists(), f"README Layout names {path.relative_to(ROOT)}, which does not exist"
            if depth == 2 and name.endswith("/"):
                folder = name
