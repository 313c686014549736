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
