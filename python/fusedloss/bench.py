"""The benchmark engine behind ``python -m fusedloss.bench``.

Usage::

    python -m fusedloss.bench [--device cpu|cuda] [--large] [--family margin] [--with pairs]
                              [--out DIR] [--repeats 5] [--dtype float32|bfloat16|float16]
                              [--no-memory] [--case TEXT]

(``--suite NAME`` is an alias of ``--family NAME``; ``--with NAME`` runs a family after the
default ones.)

Writes ``bench_<device>.md``, ``bench_<device>.json`` and ``bench_<device>.png`` to ``--out``
(default ``bench/results``, relative to the working directory) and prints the markdown table.
The md and json are also rewritten after every case, marked partial, so that a run cut short
(a time limit) leaves its finished cases behind.

The engine knows nothing about any loss. A *family* is one function, registered with
``@family("name")``, that returns a :class:`Family`: its cases (plain dicts of shape
parameters), a function building the inputs of a case, and its contenders (name ->
function ``(case, inputs) -> step``; ``step()`` runs forward and backward and returns the
loss). The families live in ``fusedloss.benchmarks`` (one module per op family: margin,
spherical, pairs, sharded), which :func:`load_families` imports. Adding a loss family is one
new function there; the timing, the memory measurement, the ratios, the tables, the json and
the plot come from the engine.

Timing: every contender of a case gets the same inputs, is warmed up (a compiled contender
compiles during its first warm-up call, which is not timed), and then the contenders run
interleaved, round after round (the order rotated each round), so that a slow phase of a
noisy machine hits all of them alike; each reports the median of at least ``--repeats``
runs of forward + backward, with the gradients of the inputs set to None before each run.

Memory: see :func:`_measure_memory_cpu` (CPU: a fresh subprocess per case and contender,
``ru_maxrss``) and :func:`_measure_memory_cuda` (``torch.cuda.max_memory_allocated``).

This module imports neither matplotlib nor triton at import time.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

MiB = 1 << 20
_MEM_MARK = "FUSEDLOSS_BENCH_MEMORY "
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


class Unavailable(Exception):
    """A contender that cannot run here (backend not built, library not installed)."""


class NotInstalled(Unavailable):
    """A peer library that is not installed: its row stays in the table, "not installed"."""

    def __init__(self, dist: str):
        super().__init__(f"{dist} not installed")


# --------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------

Step = Callable[[], torch.Tensor]
Contender = Callable[[dict, dict], Step]  # (case, inputs) -> step; raises Unavailable


@dataclasses.dataclass
class Family:
    """What a loss family gives the engine.

    cases: dicts with at least ``N``, ``C``, ``dtype`` (a key of DTYPES) and ``label``
        (a short human name of the case); the plot draws one line per contender against
        ``C`` for the cases that agree in everything but ``C`` and the keys in
        ``plot_along``, titled with the label less its part from " C=" on (or less its
        last word when it has no " C="); a case with ``plot_x`` (a key of the case) and
        ``plot_x_label`` is drawn against that key instead of ``C``.
    make_inputs(case, device) -> dict: built once per case and shared by its contenders;
        ``inputs["leaves"]`` lists the tensors whose ``.grad`` the engine resets to None;
        ``inputs["report"]``, when present, maps a contender to what its steps measured
        themselves (``memory`` of processes the engine does not see, ``details``: lines for
        the notes, any json-able figures), merged into its record after the timing; a record
        that has ``memory`` then is not measured again.
    contenders: name -> (case, inputs) -> step. ``step()`` runs forward and backward and
        returns the loss. Names in ``fused`` get a bandwidth figure, ``baselines`` =
        (eager name, compiled name) are the references of the ratio columns.
    bytes_moved(case) -> int or None: the bytes the fused kernels read and write, for GB/s.
    flops(case) -> int or None: the floating-point operations of one forward + backward of
        a fused contender, for TFLOP/s (matmul-bound families, where GB/s says little).
    mem_factor: rough peak bytes of the hungriest contender in units of N*C*itemsize,
        inputs included; a case that would not fit in the free memory is skipped.
    case_view(family, case) -> Family or None: the family as one case sees it, for a family
        whose cases differ in inputs or contenders (None: every case sees the family).
    targets: goals to report (never to assert), each a dict with ``case`` (the key/values a
        case must match), ``contender``, and ``time_vs_eager`` / ``memory_vs_eager``: the
        largest acceptable contender / eager-baseline ratio of time / peak extra memory;
        with ``baseline`` (a contender name) the ratios are to that contender instead.
    x_label: what ``C`` is, for the plot's x axis.
    plot_along: case keys besides ``C`` that vary along one plotted line (a family whose
        ``N`` grows with ``C``).
    """

    name: str
    cases: List[dict]
    make_inputs: Callable[[dict, str], dict]
    contenders: Dict[str, Contender]
    baselines: tuple = ("baseline-eager", "baseline-compile")
    fused: tuple = ()
    bytes_moved: Callable[[dict], Optional[int]] = lambda case: None
    flops: Callable[[dict], Optional[int]] = lambda case: None
    notes: List[str] = dataclasses.field(default_factory=list)
    mem_factor: float = 8.0
    case_view: Optional[Callable[["Family", dict], "Family"]] = None
    targets: List[dict] = dataclasses.field(default_factory=list)
    x_label: str = "number of classes C"
    plot_along: tuple = ()

    def seen_by(self, case: dict) -> "Family":
        """The family as `case` sees it (see case_view)."""
        return self.case_view(self, case) if self.case_view is not None else self


FAMILIES: Dict[str, Callable[..., Family]] = {}
# A family in DEFAULT_FAMILIES runs when --family is not given; others run when asked.
DEFAULT_FAMILIES: List[str] = []


def family(name: str, default: bool = True):
    """Register ``fn(device, large, dtypes) -> Family`` under ``name``."""

    def register(fn):
        FAMILIES[name] = fn
        if default:
            DEFAULT_FAMILIES.append(name)
        return fn

    return register


def compiled(fn: Callable) -> Callable:
    """torch.compile for a baseline: static shapes, so each case gets its own graph, as a
    training run with fixed shapes would. The engine resets dynamo between cases."""
    return torch.compile(fn, dynamic=False)


def grid(Ns, Cs, dtypes, **params) -> List[dict]:
    """Cases: every dtype x N x C, with ``params`` in each."""
    return [dict(N=n, C=c, dtype=d, **params) for d in dtypes for n in Ns for c in Cs]


def peers() -> Dict[str, str]:
    """Installed peer libraries of the cross-entropy families: name -> version (import-guarded,
    nothing imported)."""
    found = {}
    for dist, mod in (("liger-kernel", "liger_kernel"), ("cut-cross-entropy", "cut_cross_entropy")):
        if importlib.util.find_spec(mod) is not None:
            try:
                found[dist] = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                found[dist] = "?"
    return found


def api(name: str) -> Callable:
    """The public function ``fusedloss.<name>``; Unavailable where this build lacks it."""
    import fusedloss

    fn = getattr(fusedloss, name, None)
    if fn is None:
        raise Unavailable(f"fusedloss.{name} is not in this build")
    return fn


def kernel_check(backend: str, op: str, device: torch.device) -> str:
    """The backend that `backend` resolves to for `op` on `device`; Unavailable where it
    cannot run there (backend missing, or no kernel of `op` for it)."""
    from fusedloss._ops import resolve_backend

    try:
        return resolve_backend(backend, device, op)
    except (RuntimeError, ValueError) as exc:
        raise Unavailable(str(exc)) from exc


# The modules of fusedloss.benchmarks register the families when imported. They import this
# engine, so the engine imports them only when a run needs the registry (no import cycle).
_FAMILY_MODULES = ("margin", "spherical", "pairs", "sharded")
# Names that moved to a family module and are still importable from here.
_MOVED = {"arcface_baseline": "margin", "arcface_linear_baseline": "margin",
          "plain_ce_baseline": "margin", "linear_ce_baseline": "margin",
          "spherical_linear_baseline": "spherical"}


def load_families() -> Dict[str, Callable[..., Family]]:
    """Import the family modules (registration order = order of the default run)."""
    for name in _FAMILY_MODULES:
        importlib.import_module(f"fusedloss.benchmarks.{name}")
    return FAMILIES


def __getattr__(name: str):
    if name in _MOVED:
        return getattr(importlib.import_module(f"fusedloss.benchmarks.{_MOVED[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------

def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _clear(inputs):
    for leaf in inputs["leaves"]:
        leaf.grad = None


def _timed(step, inputs, device) -> float:
    """Seconds of one forward + backward."""
    _clear(inputs)
    if device == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def _is_oom(e: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(e, oom) or "out of memory" in str(e).lower()


def _free(device):
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _proc_kib_field(path: str, field: str) -> Optional[int]:
    """The bytes of a ``<field>: <n> kB`` line of a /proc file; None where it cannot be read."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _mem_available() -> Optional[int]:
    return _proc_kib_field("/proc/meminfo", "MemAvailable")


def run_case(fam: Family, case: dict, device: str, repeats: int, log) -> Dict[str, dict]:
    """Time every contender of one case, interleaved. Returns name -> record."""
    fam = fam.seen_by(case)
    records: Dict[str, dict] = {name: {"status": "ok"} for name in fam.contenders}
    torch._dynamo.reset()  # each case compiles its own static graph
    _free(device)
    try:
        inputs = fam.make_inputs(case, device)
    except Exception as e:  # noqa: BLE001
        why = "OOM building inputs" if _is_oom(e) else f"error building inputs: {e!r}"
        return {name: {"status": why} for name in fam.contenders}

    steps: Dict[str, Step] = {}
    warm = 3 if device == "cuda" else 1
    for name, build in fam.contenders.items():
        rec = records[name]
        try:
            step = build(case, inputs)
            _clear(inputs)
            _sync(device)
            t0 = time.perf_counter()
            loss = step()  # compiles, for a compiled contender: not timed
            _sync(device)
            rec["first_call_s"] = time.perf_counter() - t0
            rec["loss"] = float(loss.float())
            est = rec["first_call_s"]
            extra = warm - 1 + (1 if name == fam.baselines[1] else 0)
            for _ in range(extra):
                est = _timed(step, inputs, device)
            rec["warm_s"] = est
            steps[name] = step
        except NotInstalled as e:
            rec["status"], rec["why"] = "not installed", str(e)
        except Unavailable as e:
            rec["status"] = f"skipped: {e}"
        except Exception as e:  # noqa: BLE001
            rec["status"] = "OOM" if _is_oom(e) else f"error: {type(e).__name__}: {e}"
        if rec["status"] != "ok":
            _free(device)  # after the except block, which kept the failed step's frames alive
        log(f"  {name:<18} warm-up {rec.get('first_call_s', float('nan')):7.2f} s  {rec['status']}")

    # Rounds: at least `repeats`; more when a round is quick (up to ~1 s per contender).
    slowest = max([records[n]["warm_s"] for n in steps] or [1.0])
    rounds = max(repeats, min(100, int(1.0 / max(slowest, 1e-6))))
    times: Dict[str, List[float]] = {name: [] for name in steps}
    order = list(steps)
    for r in range(rounds):
        gc.collect()
        for name in order[r % len(order):] + order[: r % len(order)]:
            if records[name]["status"] != "ok":
                continue
            try:
                times[name].append(_timed(steps[name], inputs, device))
            except Exception as e:  # noqa: BLE001
                records[name]["status"] = "OOM" if _is_oom(e) else f"error: {e!r}"
            if records[name]["status"] != "ok":
                _free(device)
    for name, ts in times.items():
        if ts and records[name]["status"] == "ok":
            records[name]["times_ms"] = [t * 1e3 for t in ts]
            records[name]["median_ms"] = statistics.median(ts) * 1e3
    for name, measured in inputs.get("report", {}).items():  # see Family.make_inputs
        if records[name]["status"] == "ok":
            records[name].update(measured)

    if device == "cuda":
        for name, step in steps.items():
            if records[name]["status"] == "ok":
                records[name]["memory"] = _measure_memory_cuda(step, inputs)
    del steps, inputs
    _free(device)
    return records


# --------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------

def _measure_memory_cuda(step, inputs) -> dict:
    """Peak extra device memory of one forward + backward after warm-up:
    ``max_memory_allocated`` during the step, after ``reset_peak_memory_stats``, minus
    ``memory_allocated`` just before it (the inputs, with their gradients set to None).
    The gradient the step leaves behind is part of the figure."""
    try:
        _clear(inputs)
        gc.collect()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        _clear(inputs)
        return {"method": "cuda max_memory_allocated - memory_allocated before the step",
                "base_bytes": base, "peak_bytes": peak, "extra_bytes": peak - base}
    except Exception as e:  # noqa: BLE001
        err = "OOM" if _is_oom(e) else repr(e)
    _clear(inputs)
    _free("cuda")
    return {"error": err}


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (and so ``ru_maxrss``) to the current RSS by
    writing 5 to /proc/self/clear_refs (Linux >= 4.0). False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _vmhwm_bytes() -> Optional[int]:
    """The same high-water mark as /proc/self/status reports it (per address space)."""
    return _proc_kib_field("/proc/self/status", "VmHWM")


def _maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def _measure_memory_child(spec: dict) -> dict:
    """Runs in a fresh ``python -m fusedloss.bench --measure-memory SPEC`` process.

    1. imports (torch, fusedloss, the family) and builds the case's inputs, in place, with
       no temporaries; a compiled contender then runs one full warm-up step (compilation)
       and drops its gradient, since compiling is not what is measured;
    2. base = the peak RSS so far, after resetting the high-water mark to the current RSS
       where /proc/self/clear_refs allows it (then base = RSS just before the step);
    3. runs ONE forward + backward (the first one, for the eager contenders);
    4. extra = ``ru_maxrss`` after the step - base. The gradient the step leaves behind is
       part of the figure.
    """
    import fusedloss  # noqa: F401 - count the package in the base

    load_families()
    device = "cpu"
    fam = FAMILIES[spec["family"]](device, spec["large"], [spec["case"]["dtype"]])
    fam = fam.seen_by(spec["case"])
    case, name = spec["case"], spec["contender"]
    inputs = fam.make_inputs(case, device)
    step = fam.contenders[name](case, inputs)
    warmed = name == fam.baselines[1]
    if warmed:
        step()
        _clear(inputs)
    gc.collect()
    reset = _reset_peak_rss()
    if warmed and not reset:
        raise RuntimeError("cannot tell the step's peak from the compilation's without "
                           "/proc/self/clear_refs")
    base, base_hwm = _maxrss_bytes(), _vmhwm_bytes()
    step()
    peak, peak_hwm = _maxrss_bytes(), _vmhwm_bytes()
    if base_hwm is not None and base > base_hwm + 64 * MiB:
        # ru_maxrss still holds a peak from before this program (see _measure_memory_cpu).
        raise RuntimeError(f"ru_maxrss {base / MiB:.0f} MiB > VmHWM {base_hwm / MiB:.0f} MiB "
                           "before the step: the peak RSS was inherited from the parent")
    return {"method": ("ru_maxrss after the step - RSS before it (high-water mark reset via "
                       "/proc/self/clear_refs)" if reset else
                       "ru_maxrss after the step - ru_maxrss after imports and inputs"),
            "hwm_reset": reset, "warm_up_step": warmed,
            "base_bytes": base, "peak_bytes": peak, "extra_bytes": peak - base,
            "vmhwm_extra_bytes": None if base_hwm is None else peak_hwm - base_hwm}


def _measure_memory_cpu(fam_name: str, large: bool, case: dict, name: str,
                        timeout: float = 900) -> dict:
    """Peak extra resident memory of one forward + backward, in a fresh subprocess."""
    spec = json.dumps({"family": fam_name, "large": large, "case": case, "contender": name})
    cmd = [sys.executable, "-m", "fusedloss.bench", "--measure-memory", spec]
    if os.path.exists("/bin/sh"):
        # Linux carries a process's peak RSS across exec (into the new program's ru_maxrss):
        # spawned straight from this big process, the child would start with our peak. A
        # small shell that forks the child gives it a fresh account.
        cmd = ["/bin/sh", "-c", '"$0" "$@"; exit $?'] + cmd
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in p.stdout.splitlines():
        if line.startswith(_MEM_MARK):
            return json.loads(line[len(_MEM_MARK):])
    tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or [f"exit {p.returncode}"]
    return {"error": f"exit {p.returncode}: {tail[0][:200]}"}


# --------------------------------------------------------------------------------------
# The run, the table, the json, the plot
# --------------------------------------------------------------------------------------

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


def _derive(fam: Family, case: dict, records: Dict[str, dict]) -> None:
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
    peers = "".join(f", {k} {v}" for k, v in m.get("peers", {}).items())
    lines.append(f"- versions: python {m['python']}, torch {m['torch']}, "
                 f"triton {m['triton'] or 'not installed'}, fusedloss {m['fusedloss']}{git}{peers}")
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
    lines.append("- GB/s (fusedloss contenders of the families on cos: margin, ce): bytes counted "
                 "= forward reads cos and writes the gradient (N·C each), backward reads and "
                 "writes the gradient once more to scale it: 4·N·C·itemsize bytes / time. Target "
                 "gathers, per-row statistics and the targets are not counted. TFLOP/s: for the "
                 "matmul-bound families (margin_linear), see their note.")
    lines.append("- inputs (margin, ce): cos uniform in (-0.8, 0.8), random targets, fixed seed. "
                 "In every family the losses of all contenders are checked against the eager "
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
        if rows[0]["family"] != "margin":
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


def _targets(plan, results) -> List[dict]:
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


def _finish(result: dict, plan, t_start: float) -> None:
    """Derived figures and targets of the cases in `plan`, and the wall time so far."""
    for fam, case in plan:
        rows = {r["contender"]: r["record"] for r in result["results"]
                if r["family"] == fam.name and r["case"] is case}
        _derive(fam, case, rows)
    result["targets"] = _targets(plan, result["results"])
    result["wall_s"] = time.perf_counter() - t_start


def run(args, checkpoint: Optional[Callable[[dict], None]] = None) -> dict:
    """Run the benchmark. ``checkpoint(result)``, when given, is called with the results so
    far (``result["partial"]`` says what is missing) after every case, so that a run cut
    short by a time limit still leaves its finished cases behind."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch")
    load_families()
    names = args.family or [n for n in DEFAULT_FAMILIES]
    if args.family is None and device == "cuda" and peers():
        names.append("ce")
    names += [n for n in getattr(args, "also", None) or [] if n not in names]
    dtypes = [args.dtype] if args.dtype else None

    def log(s):
        print(s, file=sys.stderr, flush=True)

    t_start = time.perf_counter()
    result = {"device": device, "repeats": args.repeats, "large": args.large,
              "command": " ".join(["python -m fusedloss.bench"] + sys.argv[1:]),
              "machine": machine_info(device), "results": [], "family_notes": [], "notes": []}
    plan = []
    for fname in names:
        fam = FAMILIES[fname](device, args.large, dtypes)
        result["family_notes"] += fam.notes
        result.setdefault("plot", {})[fam.name] = {"x_label": fam.x_label,
                                                   "along": list(fam.plot_along)}
        plan += [(fam, case) for case in fam.cases
                 if not getattr(args, "case", None) or any(t in case["label"] for t in args.case)]
    for i, (fam, case) in enumerate(plan):
        log(f"[{i + 1}/{len(plan)}] {fam.name}: {case['label']}")
        need = fam.mem_factor * case["N"] * case["C"] * DTYPES[case["dtype"]].itemsize
        avail = _mem_available() if device == "cpu" else None
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
            _finish(result, plan[: i + 1], t_start)
            checkpoint(result)
    if device == "cpu" and not args.no_memory:
        log("memory: one fresh subprocess per (case, contender)")
        for row in result["results"]:
            rec = row["record"]
            if rec["status"] == "ok" and "memory" not in rec:
                rec["memory"] = _measure_memory_cpu(row["family"], args.large, row["case"],
                                                    row["contender"])
                mem = rec["memory"]
                log(f"  {row['case']['label']:<32} {row['contender']:<18} "
                    + (f"{mem['extra_bytes'] / MiB:9.1f} MiB" if "extra_bytes" in mem
                       else mem.get("error", "?")))
    if args.no_memory:
        result["notes"].append("memory not measured (--no-memory)")
    result.pop("partial", None)
    _finish(result, plan, t_start)
    return result


def main(argv=None) -> int:
    load_families()
    p = argparse.ArgumentParser(prog="python -m fusedloss.bench",
                                description="Benchmark fusedloss against the baselines users run "
                                            "today (eager and torch.compile) and peer libraries.")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda if available, else cpu")
    p.add_argument("--large", action="store_true", help="add the large cases")
    p.add_argument("--family", "--suite", dest="family", action="append", choices=sorted(FAMILIES),
                   help="loss family to run (repeatable; --suite is an alias); default: "
                        + ", ".join(DEFAULT_FAMILIES)
                        + " (+ ce on CUDA when a peer library is installed); not by default: "
                        + ", ".join(n for n in sorted(FAMILIES) if n not in DEFAULT_FAMILIES))
    p.add_argument("--with", dest="also", action="append", default=None, metavar="FAMILY",
                   choices=sorted(FAMILIES),
                   help="run this family too, after the default ones or those of --family "
                        "(repeatable), e.g. "
                        "--with pairs --with sharded")
    p.add_argument("--out", default=os.path.join("bench", "results"), help="default: bench/results")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed runs per contender, at least (default 5)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="only this dtype (default: float32 on CPU, bfloat16 and float32 on CUDA)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    p.add_argument("--case", action="append", default=None, metavar="TEXT",
                   help="only the cases whose label contains TEXT (repeatable: any of them), "
                        "e.g. --suite sharded --case 'gloo rank'")
    p.add_argument("--measure-memory", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.measure_memory is not None:
        print(_MEM_MARK + json.dumps(_measure_memory_child(json.loads(args.measure_memory))),
              flush=True)
        return 0
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
    # The families register in the module fusedloss.bench, which `python -m` does not run as
    # such (it runs this file as __main__): hand over to that module.
    from fusedloss.bench import main as _main

    sys.exit(_main())
