"""``python -m fusedloss.bench``: run the benchmark families and write the report.

Usage::

    python -m fusedloss.bench [--device cpu|cuda] [--large] [--family NAME] [--with NAME]
                              [--out DIR] [--repeats 5] [--dtype float32|bfloat16|float16]
                              [--no-memory] [--case TEXT]

(``--suite NAME`` is an alias of ``--family NAME``; ``--with NAME`` runs a family after the
default ones; ``--help`` lists the families.)

Writes ``bench_<device>.md``, ``bench_<device>.json`` and ``bench_<device>.png`` to ``--out``
(default ``bench/results``, relative to the working directory) and prints the markdown table.
The md and json are also rewritten after every case, marked partial, so that a run cut short
(a time limit) leaves its finished cases behind. On a terminal, a progress bar (tqdm) shows
case k of n, the time elapsed and an estimate of the time left, then the same for the memory
runs; with stderr not a terminal (CI, a log file) only the per-case lines are printed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable, Optional

import torch

from fusedloss.bench import DEFAULTS, DTYPES, FAMILIES, MiB, default_families, load_families
from fusedloss.bench.memory import mem_available, measure_cpu
from fusedloss.bench.report import finish, machine_info, markdown, plot
from fusedloss.bench.timing import run_case


def run(args, checkpoint: Optional[Callable[[dict], None]] = None) -> dict:
    """Run the benchmark. ``checkpoint(result)``, when given, is called with the results so
    far (``result["partial"]`` says what is missing) after every case, so that a run cut
    short by a time limit still leaves its finished cases behind."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch")
    load_families()
    names = list(args.family or default_families(device))
    names += [n for n in getattr(args, "also", None) or [] if n not in names]
    dtypes = [args.dtype] if args.dtype else None
    log = _log_writer()

    t_start = time.perf_counter()
    result = {"device": device, "repeats": args.repeats, "large": args.large,
              "command": " ".join(["python -m fusedloss.bench"] + sys.argv[1:]),
              "machine": machine_info(device), "results": [], "family_notes": [], "notes": []}
    plan = []
    for fname in names:
        fam = FAMILIES[fname](device, args.large, dtypes)
        result["family_notes"] += [n for n in fam.notes if n not in result["family_notes"]]
        result.setdefault("plot", {})[fam.name] = {"x_label": fam.x_label,
                                                   "along": list(fam.plot_along)}
        plan += [(fam, case) for case in fam.cases
                 if not getattr(args, "case", None) or any(t in case["label"] for t in args.case)]
    bar = progress(len(plan), "case")
    for i, (fam, case) in enumerate(plan):
        log(f"[{i + 1}/{len(plan)}] {fam.name}: {case['label']}")
        bar.set_description(case["label"])
        need = fam.mem_factor * case["N"] * case["C"] * DTYPES[case["dtype"]].itemsize
        avail = mem_available() if device == "cpu" else None
        if avail is not None and need > 0.9 * avail:
            why = f"skipped: needs ~{need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available"
            records = {n: {"status": why} for n in fam.seen_by(case).contenders}
        else:
            records = run_case(fam, case, device, args.repeats, log)
        for name, rec in records.items():
            result["results"].append({"family": fam.name, "case": case, "contender": name,
                                      "record": rec})
        if checkpoint is not None:
            memory_later = device == "cpu" and not args.no_memory
            result["partial"] = (f"{i + 1} of {len(plan)} cases timed"
                                 + ("; memory not measured yet" if memory_later else ""))
            finish(result, plan[: i + 1], t_start)
            checkpoint(result)
        bar.update()
    bar.close()
    if device == "cpu" and not args.no_memory:
        log("memory: one fresh subprocess per (case, contender)")
        todo = [row for row in result["results"]
                if row["record"]["status"] == "ok" and "memory" not in row["record"]]
        bar = progress(len(todo), "run")
        for row in todo:
            rec = row["record"]
            bar.set_description(f"memory: {row['contender']}")
            rec["memory"] = measure_cpu(row["family"], args.large, row["case"], row["contender"])
            mem = rec["memory"]
            log(f"  {row['case']['label']:<32} {row['contender']:<18} "
                + (f"{mem['extra_bytes'] / MiB:9.1f} MiB" if "extra_bytes" in mem
                   else mem.get("error", "?")))
            bar.update()
        bar.close()
    if args.no_memory:
        result["notes"].append("memory not measured (--no-memory)")
    result.pop("partial", None)
    finish(result, plan, t_start)
    return result


class _NoBar:
    """What :func:`progress` gives where tqdm is not installed: a bar that shows nothing."""

    def set_description(self, text):
        pass

    def update(self):
        pass

    def close(self):
        pass


def progress(total: int, unit: str):
    """A tqdm bar on stderr (k of n, elapsed, estimated time left) while stderr is a terminal,
    silent when it is not (a log file, CI: tqdm's ``disable=None``) or where tqdm is not
    installed (the bench extra installs it). The per-case log lines are printed either way."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, unit=unit, file=sys.stderr, disable=None, dynamic_ncols=True)


def _log_writer():
    """A line printer to stderr that keeps a live progress bar below the lines."""
    try:
        from tqdm import tqdm
    except ImportError:
        return lambda text: print(text, file=sys.stderr, flush=True)
    return lambda text: tqdm.write(text, file=sys.stderr)


def _family_help() -> str:
    """Which families run without --family, for --help."""
    always = [n for n, rule in DEFAULTS.items() if rule is True]
    sometimes = [f"{n} ({(rule.__doc__ or 'on some machines').strip()})"
                 for n, rule in DEFAULTS.items() if callable(rule)]
    never = [n for n, rule in DEFAULTS.items() if rule is False]
    text = "default: " + ", ".join(always)
    if sometimes:
        text += "; also " + ", ".join(sometimes)
    if never:
        text += "; not by default: " + ", ".join(never)
    return text


def main(argv=None) -> int:
    load_families()
    p = argparse.ArgumentParser(prog="python -m fusedloss.bench",
                                description="Benchmark fusedloss against the baselines users run "
                                            "today (eager and torch.compile) and peer libraries.")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda if available, else cpu")
    p.add_argument("--large", action="store_true", help="add the large cases")
    p.add_argument("--family", "--suite", dest="family", action="append", choices=sorted(FAMILIES),
                   help="loss family to run (repeatable; --suite is an alias); " + _family_help())
    p.add_argument("--with", dest="also", action="append", default=None, metavar="FAMILY",
                   choices=sorted(FAMILIES),
                   help="run this family too, after the default ones or those of --family "
                        "(repeatable)")
    p.add_argument("--out", default=os.path.join("bench", "results"), help="default: bench/results")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed runs per contender, at least (default 5)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="only this dtype (default: float32 on CPU, bfloat16 and float32 on CUDA)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    p.add_argument("--case", action="append", default=None, metavar="TEXT",
                   help="only the cases whose label contains TEXT (repeatable: any of them)")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")

    os.makedirs(args.out, exist_ok=True)

    def write(result):
        stem = os.path.join(args.out, f"bench_{result['device']}")
        md = markdown(result)
        for ext, text in ((".md", md), (".json", json.dumps(result, indent=1))):
            with open(stem + ext + ".tmp", "w") as f:
                f.write(text)
            os.replace(stem + ext + ".tmp", stem + ext)  # a kill mid-write leaves the last one
        return stem, md

    result = run(args, checkpoint=write)
    stem, md = write(result)
    try:
        plot(result, stem + ".png")
    except ImportError as e:
        print(f"no plot: {e} (pip install matplotlib)", file=sys.stderr)
    print(md)
    print(f"wrote {stem}.md, {stem}.json, {stem}.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
