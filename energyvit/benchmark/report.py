"""The ratios between rows, the printed table and the energy-vs-MAE summary."""
from __future__ import annotations

from energyvit.benchmark.presets import MAE_MODES

EAGER_BACKENDS = ("math-eager", "eager", "mae")  # each suite's and step family's own reference


def add_ratios(rows: list[dict]) -> None:
    """speedup_vs_eager = eager ms / row ms, and launches_vs_eager = row launches / eager launches,
    for rows with an eager row of the same suite, shape, op and dtype (MAE rows have no K, so
    their eager row is the eager MAE step)."""
    def key(r):
        return (r["suite"], r["op"], r["dtype"], r["model"], r["img_size"], r["restore_steps"], r["batch"],
                r["heads"], r["n"], r["head_dim"])

    eager = [r for r in rows if r["status"] == "ok" and r["backend"] in EAGER_BACKENDS]
    ms = {key(r): float(r["ms"]) for r in eager if r["ms"] != ""}
    launches = {key(r): int(r["launches"]) for r in eager if r["launches"] != ""}
    for r in rows:
        if r["status"] not in ("ok", "fallback-eager"):
            continue
        if r["ms"] != "" and key(r) in ms:
            r["speedup_vs_eager"] = f"{ms[key(r)] / float(r['ms']):.4g}"
        if r["launches"] != "" and key(r) in launches:
            r["launches_vs_eager"] = f"{int(r['launches']) / launches[key(r)]:.3f}"


def format_table(rows: list[dict]) -> str:
    cols = [("suite", "suite"), ("op", "op"), ("backend", "backend"), ("shape", None), ("dtype", "dtype"),
            ("status", "status"), ("ms", "ms"), ("IQR %", None), ("reps", "reps"), ("device ms", "device_ms"),
            ("img/s", "images_per_s"), ("x eager", "speedup_vs_eager"), ("TFLOP/s", "tflops"),
            ("MFU", "mfu"), ("MFU peak", "mfu_peak"), ("peak MiB", "peak_mem_mib"), ("J/img", "energy_j_per_image"),
            ("launches", "launches"), ("/ eager", "launches_vs_eager"), ("error / note", None)]
    lines = []
    for r in rows:
        note = r["error"] or "; ".join(filter(None, [r.get("attn_kernel", ""), r["note"]]))
        if r["suite"] == "compile" and r["status"] == "ok":
            note = f"compiled in {r['first_call_s']} s; {note}"
        if r["suite"] in ("step", "launches", "compile"):
            shape = f"{r['model']}@{r['img_size']} K={r['restore_steps'] or '-'} B={r['batch']}"
        elif r["suite"] == "optimizer":
            shape = f"{r['model']} params"
        elif r["suite"] == "data":
            shape = f"{r['img_size']}px" + (f" B={r['batch']}" if r["op"].startswith("collate") else "")
        elif r["suite"] == "attention":
            shape = f"B={r['batch']} H={r['heads']} N={r['n']} d={r['head_dim']}"
        else:
            shape = f"{r['n']}^3"
        cells = []
        for title, k in cols:
            if title == "shape":
                cells.append(shape)
            elif title == "IQR %":
                cells.append(iqr_percent(r))
            elif title == "error / note":
                cells.append(note[:90])
            else:
                cells.append(str(r.get(k, "")))
        lines.append(cells)
    head = [c[0] for c in cols]
    widths = [max(len(head[i]), *(len(line[i]) for line in lines)) if lines else len(head[i]) for i in range(len(head))]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(c) for c in lines])


def iqr_percent(r: dict) -> str:
    """The interquartile range of a row's timed calls, in % of its median ('' without timing)."""
    try:
        return f"{100 * (float(r['ms_q3']) - float(r['ms_q1'])) / float(r['ms']):.1f}"
    except (KeyError, ValueError, ZeroDivisionError):
        return ""


def energy_vs_mae(rows: list[dict]) -> list[str]:
    """Per model and K: the fastest energy step row against the fastest MAE step row, in images/s
    and MFU, beside the bound at equal MFU (MAE's FLOPs per image / energy's)."""
    ok = [r for r in rows if r["suite"] == "step" and r["status"] == "ok" and r["images_per_s"]]
    lines = []
    for model in dict.fromkeys(r["model"] for r in ok):
        mine = [r for r in ok if r["model"] == model]
        mae = max((r for r in mine if r["backend"] in MAE_MODES), key=lambda r: float(r["images_per_s"]), default=None)
        if mae is None:
            continue
        for k in sorted({r["restore_steps"] for r in mine if r["backend"] not in MAE_MODES}, key=str):
            energy = max((r for r in mine if r["backend"] not in MAE_MODES and r["restore_steps"] == k),
                         key=lambda r: float(r["images_per_s"]))
            bound = (float(mae["flop"]) / int(mae["batch"])) / (float(energy["flop"]) / int(energy["batch"]))
            lines.append(
                f"{model} K={k}: energy {energy['backend']} {float(energy['images_per_s']):.1f} img/s "
                f"(MFU {energy['mfu'] or 'n/a'}, peak {energy['mfu_peak'] or 'n/a'}) vs MAE {mae['backend']} "
                f"{float(mae['images_per_s']):.1f} img/s (MFU {mae['mfu'] or 'n/a'}, peak {mae['mfu_peak'] or 'n/a'}): "
                f"{float(energy['images_per_s']) / float(mae['images_per_s']):.3f}x MAE's images/s; "
                f"at equal MFU {bound:.3f}x")
    return lines
