"""The report of a run: the machine, the figures derived from the records (ratios, memory
multiples, GB/s, TFLOP/s, loss agreement), the families' targets, the markdown table and
its notes, and the plot (matplotlib, imported only by :func:`plot`)."""
from __future__ import annotations

import datetime
import importlib.metadata
import math
import os
import platform
import subprocess
import time
from typing import Dict, List, Optional

import torch

from fusedloss.bench import Family, MiB, peers


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_rev() -> Optional[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return rev.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(device: str) -> dict:
    import fusedloss

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device == "cuda" else None,
        "triton": _version("triton"),  # metadata only: triton is not imported here
        "fusedloss": getattr(fusedloss, "__version__", None) or _version("fusedloss"),
        "fusedloss_git": _git_rev(),
        "backends": {k: [bool(v[0]), str(v[1])] for k, v in fusedloss.backends().items()},
        "peers": peers(),
    }
    return info


def _fmt(x, spec, missing="–"):
    return missing if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def derive(fam: Family, case: dict, records: Dict[str, dict]) -> None:
    """Ratios, memory multiples, bandwidth and loss agreement, in place."""
    fam = fam.seen_by(case)
    eager, comp = (records.get(b, {}).get("median_ms") for b in fam.baselines)
    nc4 = case["N"] * case["C"] * 4
    ref_loss = records.get(fam.baselines[0], {}).get("loss")
    tol = 1e-4 if case["dtype"] == "float32" else 3e-2
    nbytes = fam.bytes_moved(case)
    flops = fam.flops(case)
    for name, rec in records.items():
        med = rec.get("median_ms")
        rec["x_vs_eager"] = eager / med if med and eager else None
        rec["x_vs_compile"] = comp / med if med and comp else None
        mem = rec.get("memory") or {}
        if "extra_bytes" in mem:
            rec["peak_extra_mib"] = mem["extra_bytes"] / MiB
            rec["x_nc4"] = mem["extra_bytes"] / nc4
        if name in fam.fused and med and nbytes:
            rec["bytes_moved"] = nbytes
            rec["gbps"] = nbytes / (med / 1e3) / 1e9
        if name in fam.fused and med and flops:
            rec["flops"] = flops
            rec["tflops"] = flops / (med / 1e3) / 1e12
        if rec.get("loss") is not None and ref_loss is not None:
            rel = abs(rec["loss"] - ref_loss) / max(abs(ref_loss), 1e-12)
            rec["loss_rel_diff_vs_eager"] = rel
            rec["loss_agrees"] = rel <= tol


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# fusedloss benchmark ({result['device']})", ""]
    lines.append(f"- date: {m['date']}")
    gpu = f"; GPU: {m['gpu']} (CUDA {m['cuda']})" if m.get("gpu") else ""
    lines.append(f"- machine: {m['cpu']}, {m['cpu_count']} logical CPUs, "
                 f"torch threads {m['torch_threads']}{gpu}")
    git = f" (git {m['fusedloss_git']})" if m.get("fusedloss_git") else ""
    peer_text = "".join(f", {k} {v}" for k, v in m.get("peers", {}).items())
    lines.append(f"- versions: python {m['python']}, torch {m['torch']}, "
                 f"triton {m['triton'] or 'not installed'}, "
                 f"fusedloss {m['fusedloss']}{git}{peer_text}")
    avail = ", ".join(f"{k} {'yes' if v[0] else 'no'}" for k, v in m["backends"].items())
    lines.append(f"- fusedloss backends: {avail}")
    lines.append(f"- command: `{result['command']}`; wall time {result['wall_s']:.0f} s")
    if result.get("partial"):
        lines.append(f"- PARTIAL RESULTS ({result['partial']}): the run has not finished, or was "
                     "cut short; the png, if any, is from an earlier run.")
    lines += ["", "| case | contender | time (ms) | x vs eager | x vs compile | peak extra MiB "
                  "| x N·C·4B | GB/s | TFLOP/s |",
              "|---|---|--:|--:|--:|--:|--:|--:|--:|"]
    skipped = []
    mismatches = []
    details = []  # a contender's own lines (Family.make_inputs, inputs["report"])
    for row in result["results"]:
        rec, label = row["record"], row["case"]["label"]
        if rec["status"] == "not installed":
            lines.append(f"| {label} | {row['contender']} | not installed "
                         "| – | – | – | – | – | – |")
            continue
        if rec["status"] != "ok":
            skipped.append(f"{label} / {row['contender']}: {rec['status']}")
            if not rec["status"].startswith(("OOM", "error")):
                continue
        mem = rec.get("memory") or {}
        mib = _fmt(rec.get("peak_extra_mib"), ",.0f", "OOM" if mem.get("error") == "OOM" else "–")
        time_s = _fmt(rec.get("median_ms"), ",.1f" if (rec.get("median_ms") or 0) >= 10 else ".3f",
                      rec["status"] if rec["status"] == "OOM" else "error"
                      if rec["status"] != "ok" else "–")
        lines.append(f"| {label} | {row['contender']} | {time_s} | "
                     f"{_fmt(rec.get('x_vs_eager'), '.2f')} | "
                     f"{_fmt(rec.get('x_vs_compile'), '.2f')} | "
                     f"{mib} | {_fmt(rec.get('x_nc4'), '.2f')} | {_fmt(rec.get('gbps'), '.1f')} | "
                     f"{_fmt(rec.get('tflops'), '.3g')} |")
        details += [f"{label} / {row['contender']}: {d}" for d in rec.get("details", ())]
        if rec.get("loss_agrees") is False:
            mismatches.append(f"{label} / {row['contender']}: loss {rec['loss']:.6g}, rel. diff "
                              f"{rec['loss_rel_diff_vs_eager']:.2e} from the eager baseline")
        if mem.get("error") and mem.get("error") != "OOM":
            skipped.append(f"{label} / {row['contender']}: memory measurement: {mem['error']}")
    goals = result.get("targets") or []
    if goals:
        vs = ("eager baseline" if all("vs" not in g for g in goals)
              else "the baseline named (the eager one where none is)")
        lines += ["", f"Targets (reported, not asserted; ratio = contender / {vs}, "
                      "lower is better):", ""]
    for g in goals:
        parts = []
        for what in ("time", "memory"):
            if f"{what}_target" in g:
                met = {True: "met", False: "NOT met", None: "not measured"}[g[f"{what}_met"]]
                parts.append(f"{what} / {g.get('vs', 'eager')} {_fmt(g[f'{what}_ratio'], '.3f')} "
                             f"(target ≤ {g[f'{what}_target']}: {met})")
        lines.append(f"- {g['family']}, {g['label']}, {g['contender']}: " + "; ".join(parts))
    lines += ["", "Notes:", ""]
    lines.append(f"- time: median of at least {result['repeats']} runs of forward + backward "
                 "(`loss.backward()`, input gradients set to None before each run), after "
                 "warm-up; compilation happens during warm-up and is not timed. The contenders of "
                 "a case run interleaved in one process. \"x vs eager\" / \"x vs compile\" = "
                 "baseline time / contender time (above 1: faster than the baseline).")
    if result["device"] == "cuda":
        lines.append("- peak extra memory: `torch.cuda.max_memory_allocated()` during one "
                     "forward + backward after `reset_peak_memory_stats()`, minus "
                     "`memory_allocated()` just before it (the inputs); the input gradient "
                     "the step leaves behind counts. \"x N·C·4B\" = that figure / one N x C fp32 "
                     "buffer.")
    else:
        lines.append("- peak extra memory: a fresh subprocess per (case, contender) imports, "
                     "builds the inputs (in place, no temporaries), resets the RSS high-water mark "
                     "(/proc/self/clear_refs; else the peak so far is the base), then runs ONE "
                     "forward + backward: `ru_maxrss` after it minus `ru_maxrss` before it. "
                     "For the eager contenders that step is their first; the compiled baseline "
                     "first runs one untimed step to compile (with the mark reset after it). "
                     "The input gradient the step leaves behind counts. \"x N·C·4B\" = that "
                     "figure / one N x C fp32 buffer.")
    lines.append("- GB/s / TFLOP/s (the fused contenders of a family that counts them): the "
                 "bytes its kernels must read and write / the floating-point operations of one "
                 "forward + backward, as the family's note says, / time.")
    lines.append("- In every family the losses of all contenders are checked against the eager "
                 "baseline (rel. tolerance 1e-4 fp32, 3e-2 bf16/fp16): "
                 + ("all agree." if not mismatches else "MISMATCHES below."))
    for note in result["family_notes"]:
        lines.append(f"- {note}")
    for s in result.get("notes", []):
        lines.append(f"- {s}")
    for s in details:
        lines.append(f"- {s}")
    for s in mismatches:
        lines.append(f"- LOSS MISMATCH: {s}")
    for s in skipped:
        lines.append(f"- not run: {s}")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_of = result.get("plot", {})  # family -> {"x_label", "along"}
    groups: Dict[tuple, List[dict]] = {}
    for row in result["results"]:
        c = row["case"]
        along = axes_of.get(row["family"], {}).get("along", ())
        free = ("C", "label", c.get("plot_x", "C"), *along)
        key = (row["family"],) + tuple((k, v) for k, v in sorted(c.items()) if k not in free)
        groups.setdefault(key, []).append(row)
    names = list(dict.fromkeys(r["contender"] for r in result["results"]))
    colour = {name: f"C{i % 10}" for i, name in enumerate(names)}  # same colour in every panel
    n = max(len(groups), 1)
    fig, axes = plt.subplots(n, 2, figsize=(12, 4.2 * n), squeeze=False)
    for ax_row, (key, rows) in zip(axes, groups.items()):
        c0 = rows[0]["case"]
        label = c0["label"]
        title = label.split(" C=")[0] if " C=" in label else label.rsplit(" ", 1)[0]
        x_label = axes_of.get(rows[0]["family"], {}).get("x_label", "number of classes C")
        x_key, x_label = c0.get("plot_x", "C"), c0.get("plot_x_label", x_label)
        title += f" ({rows[0]['family']})"
        for name in dict.fromkeys(r["contender"] for r in rows):
            pts = sorted(((r["case"][x_key], r["record"]) for r in rows if r["contender"] == name),
                         key=lambda p: p[0])
            xs = [p[0] for p in pts]
            t = [p[1].get("median_ms", float("nan")) for p in pts]
            mem = [p[1].get("peak_extra_mib", float("nan")) for p in pts]
            style = "--" if name.startswith("baseline") else "-"
            if any(not math.isnan(v) for v in t):
                ax_row[0].plot(xs, t, style, marker="o", label=name, color=colour[name])
            if any(not math.isnan(v) and v > 0 for v in mem):
                ax_row[1].plot(xs, mem, style, marker="o", label=name, color=colour[name])
        for ax, what in zip(ax_row, ("time of forward + backward (ms)", "peak extra memory (MiB)")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(x_label)
            ax.set_ylabel(what)
            ax.set_title(title)
            ax.grid(True, which="both", alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
    m = result["machine"]
    fig.suptitle(f"fusedloss {m['fusedloss']} on {m['gpu'] or m['cpu']} "
                 f"({m['torch_threads']} threads), torch {m['torch']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def targets(plan, results) -> List[dict]:
    """The Family.targets of the cases run: the ratios and whether each goal is met."""
    out = []
    for fam, case in plan:
        for goal in fam.targets:
            if any(case.get(k) != v for k, v in goal["case"].items()):
                continue
            rows = {r["contender"]: r["record"] for r in results
                    if r["family"] == fam.name and r["case"] is case}
            baseline = goal.get("baseline", fam.baselines[0])
            rec, eager = rows.get(goal["contender"], {}), rows.get(baseline, {})
            t, te = rec.get("median_ms"), eager.get("median_ms")
            m, me = ((rec.get("memory") or {}).get("extra_bytes"),
                     (eager.get("memory") or {}).get("extra_bytes"))
            entry = {"family": fam.name, "label": case["label"], "contender": goal["contender"],
                     "baseline": baseline}
            if "baseline" in goal:
                entry["vs"] = baseline
            for what, num, den in (("time", t, te), ("memory", m, me)):
                bound = goal.get(f"{what}_vs_eager")
                if bound is None:
                    continue
                ratio = num / den if num is not None and den else None
                entry.update({f"{what}_ratio": ratio, f"{what}_target": bound,
                              f"{what}_met": None if ratio is None else ratio <= bound})
            out.append(entry)
    return out


def finish(result: dict, plan, t_start: float) -> None:
    """Derived figures and targets of the cases in `plan`, and the wall time so far."""
    for fam, case in plan:
        rows = {r["contender"]: r["record"] for r in result["results"]
                if r["family"] == fam.name and r["case"] is case}
        derive(fam, case, rows)
    result["targets"] = targets(plan, result["results"])
    result["wall_s"] = time.perf_counter() - t_start

