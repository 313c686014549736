"""What a results file records about where it ran: git commit, CPU model, versions, load; and the
error helpers every suite shares."""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
from pathlib import Path

SOURCE_ROOT = Path(__file__).resolve().parents[2]  # the checkout, when the package runs from one

class Unavailable(Exception):
    """The backend or mode cannot run here at all (not installed, no device)."""


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {line}"[:300]


# ------------------------------------------------------------------------------------ environment
def git_commit(root: Path = SOURCE_ROOT) -> str:
    """The commit of the checkout at `root` (+ a mark for uncommitted changes); an installed copy
    outside a checkout has none, and says so, unless ENERGYVIT_GIT_COMMIT names it (a copy of a
    checkout without .git, e.g. on a GPU machine)."""
    given = os.environ.get("ENERGYVIT_GIT_COMMIT", "").strip()
    if given and not (root / ".git").exists():
        return f"{given} (ENERGYVIT_GIT_COMMIT)"
    try:
        c = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        commit = c.stdout.strip() or "none (not a git checkout)"
        d = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=10)
        return commit + (" +uncommitted changes" if d.stdout.strip() else "")
    except Exception as e:  # noqa: BLE001  (no git, not a checkout)
        return f"unknown ({type(e).__name__})"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def mean_std(values: list[float]) -> dict:
    """Mean, sample standard deviation and the values themselves, as the results files keep them."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception as e:  # noqa: BLE001
        return f"n/a ({first_line(e)})"

