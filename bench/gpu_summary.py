"""The short summary bench/gpu_check.sh prints last, from the files its parts wrote in OUT:
parts.csv (each part's status and seconds), gpu_check.csv (attention), bench-*.csv (steps,
launches, optimizer), precompile/bench-*.csv (the background compiles), test_cuda_graphs.xml
(pytest) and pretrain_smoke/summary.json. Standard library only, but for the energy-vs-MAE lines
(energyvit.benchmark.report).

    python bench/gpu_summary.py OUT
"""
from __future__ import annotations

import csv
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def read_csv(path: Path) -> tuple[dict, list[dict]]:
    """('#' header lines as a dict, rows)."""
    header, lines = {}, []
    for line in path.read_text().splitlines():
        if line.startswith("# "):
            k, _, v = line[2:].partition(": ")
            header[k] = v
        else:
            lines.append(line)
    return header, list(csv.DictReader(lines))


def parts(out: Path) -> str:
    path = out / "parts.csv"
    if not path.exists():
        return "parts: no parts.csv"
    rows = [[r["part"], r["status"], r["seconds"], r["limit_s"]] for r in csv.DictReader(path.open())]
    return table(["part", "status", "s", "limit s"], rows)


def attention(out: Path) -> str:
    path = out / "gpu_check.csv"
    if not path.exists():
        return "attention: no gpu_check.csv"
    header, rows = read_csv(path)
    bad = [r for r in rows if r["kind"] == "correctness" and r["ok"] == "False"]
    lines = [f"attention on {header.get('device', '?')}: correctness {header.get('all_correctness_ok', '?')}"
             + "".join(f"; FAILED {r['dtype']} N={r['n']} {r['output']} rel err {r['rel_err']} (tol {r['tol']})"
                       for r in bad)]
    def cell(r):
        device = r.get("device_ms", "")
        return (r["ms"] + (f" ({device})" if device and device[0].isdigit() else "")) if r["ms"] else r["note"][:12]

    timing = {(r["dtype"], r["n"], r["op"], r["impl"]): cell(r) for r in rows if r["kind"] == "timing"}
    impls = sorted({k[3] for k in timing}, key=lambda i: (i != "fused", i))
    keys = sorted({k[:3] for k in timing}, key=lambda k: (k[0], int(k[1]), ["fwd", "fwd+bwd", "bwdbwd"].index(k[2])))
    if keys:
        lines.append("attention ms through autograd (in parentheses: its kernels alone on the device, profiler):")
        lines.append(table(["dtype", "N", "op", *[f"{i} ms" for i in impls]],
                           [[*k, *[timing.get((*k, i), "") for i in impls]] for k in keys]))
    ops = [[r["dtype"], r["n"], r["op"], r["impl"], r["ms"], r["note"][:110]] for r in rows if r["kind"] == "op"]
    if ops:
        lines.append(table(["dtype", "N", "op alone", "layout", "ms", "autotuner's configs"], ops))
    host = [[r["dtype"], r["n"], r["impl"], r["ms"], r["note"].split("; ")[1] if r["ms"] else r["note"][:60]]
            for r in rows if r["kind"] == "host"]
    if host:
        lines.append(table(["dtype", "N", "fwd+bwd chain", "host ms", "device (profiler)"], host))
    return "\n".join(lines)


def bench_rows(out: Path) -> list[dict]:
    rows = []
    for path in sorted(out.glob("bench-*.csv")):
        rows += list(csv.DictReader(path.open()))
    return rows


def compiles(out: Path, rows: list[dict]) -> str:
    """The background precompile's graphs (seconds to compile, cache) beside the first call of the
    bench's row of the same graph (which loads it from the cache when the precompile finished first)."""
    pre = [r for path in sorted((out / "precompile").glob("bench-*.csv"))
           for r in csv.DictReader(path.open()) if r["suite"] == "compile"]
    if not pre:
        return ""
    key = lambda r: (r["model"], r["restore_steps"], r["backend"])  # noqa: E731
    first = {key(r): r for r in rows if r["suite"] == "step"}

    def bench_cell(r):
        b = first.get(key(r))
        if b is None or not b["first_call_s"]:
            return b["status"] if b else "no row"
        cache = [part for part in b["note"].split("; ") if part.startswith("Inductor cache")]
        return f"{b['first_call_s']} ({cache[0][len('Inductor cache: '):] if cache else 'no cache count'})"

    return "compiled graphs: background precompile (compiled, not run) and the first call of the row:\n" + table(
        ["model", "K", "mode", "precompile", "s", "cache", "first call s (cache)"],
        [[r["model"].replace("_patch16", ""), r["restore_steps"], r["backend"], r["status"], r["first_call_s"],
          r["note"][len("Inductor cache: "):] if r["note"].startswith("Inductor cache") else r["error"][:40],
          bench_cell(r)] for r in pre])


def steps(rows: list[dict]) -> str:
    step = [r for r in rows if r["suite"] == "step"]
    if not step:
        return "steps: no bench rows"
    modes = list(dict.fromkeys(r["backend"] for r in step))
    shapes = list(dict.fromkeys((r["model"], r["restore_steps"]) for r in step))
    by = {(r["model"], r["restore_steps"], r["backend"]): r for r in step}

    def cell(r):
        if r is None:
            return ""
        if r["status"] not in ("ok", "fallback-eager"):
            return r["status"]
        x = f" ({float(r['speedup_vs_eager']):.2f}x)" if r["speedup_vs_eager"] else ""
        return f"{float(r['ms']):.1f}{x}" + ("*" if r["status"] == "fallback-eager" else "")

    def mfu(r):
        if r is None or r["status"] != "ok" or not r["mfu"]:
            return ""
        iqr = 100 * (float(r["ms_q3"]) - float(r["ms_q1"])) / float(r["ms"]) if r.get("ms_q1") else float("nan")
        return f"{r['mfu']} / {r['mfu_peak']} ±{iqr:.0f}%"

    lines = [f"train step ms (x eager: energy vs eager, MAE vs mae); {step[0]['dtype']}, batch {step[0]['batch']}, "
             f"{step[0]['img_size']} px; * = fell back; energy: the model pretrain builds (energy head included); "
             "mae*: MAE loss + backward (SDPA; mae-math: math attention)"]
    grid = [[m.replace("_patch16", ""), k or "-"] for m, k in shapes]
    lines.append(table(["model", "K", *modes], [g + [cell(by.get((m, k, mode))) for mode in modes]
                                                for g, (m, k) in zip(grid, shapes)]))
    lines.append("MFU vs the matmul timed before the row / vs the datasheet peak, ±IQR of the step's time in %:")
    lines.append(table(["model", "K", *modes], [g + [mfu(by.get((m, k, mode))) for mode in modes]
                                                for g, (m, k) in zip(grid, shapes)]))
    try:
        from energyvit.benchmark.report import energy_vs_mae

        lines += energy_vs_mae(step)
    except ImportError as e:  # no energyvit on the path: the tables above still stand
        lines.append(f"energy vs MAE: not computed ({e})")
    checks = [r for r in step if r["grad_rel_err_vs_eager"]]
    if checks:
        lines.append("gradients vs the eager step (relative error): " + "; ".join(
            f"{r['model'].replace('_patch16', '')} K={r['restore_steps']} {r['backend']} {r['grad_rel_err_vs_eager']}"
            for r in checks))
    return "\n".join(lines)


def counted_by(timer: str) -> str:
    if "CUDA kernels" in timer:
        return "CUDA kernels (profiler)"
    if "Inductor" in timer:
        return "CPU proxy: Inductor kernels + extern + eager ops"
    return "CPU proxy: aten ops that launch a kernel"


def launches(rows: list[dict]) -> str:
    counted = [r for r in rows if r["suite"] == "launches" and r["launches"]]
    if not counted:
        return "launches: none counted"
    return "kernel launches per step (launch_detail in the bench CSV breaks them down):\n" + table(
        ["model", "K", "mode", "launches", "/ eager", "counted as"],
        [[r["model"].replace("_patch16", ""), r["restore_steps"] or "-", r["backend"], r["launches"],
          r["launches_vs_eager"], counted_by(r["timer"])] for r in counted])


def optimizer(rows: list[dict]) -> str:
    opt = [r for r in rows if r["suite"] == "optimizer"]
    if not opt:
        return ""
    return "AdamW step (ms; params vs eager AdamW after 2 steps):\n" + table(
        ["model", "mode", "status", "ms", "rel diff"],
        [[r["model"].replace("_patch16", ""), r["backend"], r["status"], r["ms"], r["grad_rel_err_vs_eager"]]
         for r in opt])


def graph_tests(out: Path) -> str:
    path = out / "test_cuda_graphs.xml"
    if not path.exists():
        return "CUDA graph tests: no result file"
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    failed = [c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None or c.find("error") is not None]
    return (f"CUDA graph tests (tests/test_cuda_graphs.py): {suite.get('tests')} tests, {suite.get('failures')} "
            f"failures, {suite.get('errors')} errors, {suite.get('skipped')} skipped"
            + (f"; failed: {', '.join(failed)}" if failed else ""))


def smoke(out: Path) -> str:
    path = out / "pretrain_smoke" / "summary.json"
    if not path.exists():
        return "pretrain smoke: no summary.json"
    s = json.loads(path.read_text())
    last = {name: log[-1]["loss"] for name, log in s["logs"].items() if log}
    return (f"pretrain smoke: {'PASS' if s['ok'] else 'FAIL'}; last-epoch loss "
            + ", ".join(f"{k} {v:.5f}" for k, v in last.items()) + f"; --cuda_graphs run {s.get('graphs', '?')}")


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results/local")
    rows = bench_rows(out)
    sections = [parts(out), attention(out), steps(rows), compiles(out, rows), launches(rows), optimizer(rows),
                graph_tests(out), smoke(out)]
    print("\n===== summary =====")
    for section in sections:
        if section:
            print(section + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
