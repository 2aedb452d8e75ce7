"""Peak memory of one forward + backward of a contender.

CUDA (:func:`measure_cuda`): ``torch.cuda.max_memory_allocated`` during the step, after
``reset_peak_memory_stats``, minus ``memory_allocated`` just before it.

CPU (:func:`measure_cpu`): a fresh process per (case, contender),
``python -m fusedloss.bench.memory SPEC`` (SPEC: json of family, module, large, case,
contender), which builds the case's inputs, runs one step and prints one line
``FUSEDLOSS_BENCH_MEMORY <json>``: the peak resident set of the step beyond what the process
held before it (see :func:`measure_child`).
"""
from __future__ import annotations

import gc
import importlib
import json
import os
import resource
import subprocess
import sys
from typing import Optional

import torch

from fusedloss.bench import FAMILIES, MiB

MARK = "FUSEDLOSS_BENCH_MEMORY "


def is_oom(e: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(e, oom) or "out of memory" in str(e).lower()


def free(device: str) -> None:
    """Collect garbage and, on CUDA, return the cached blocks."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def clear_grads(inputs: dict) -> None:
    """The gradients of the case's leaves set to None: each step allocates its own."""
    for leaf in inputs["leaves"]:
        leaf.grad = None


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


def mem_available() -> Optional[int]:
    """MemAvailable of /proc/meminfo in bytes; None where it cannot be read."""
    return _proc_kib_field("/proc/meminfo", "MemAvailable")


def measure_cuda(step, inputs) -> dict:
    """Peak extra device memory of one forward + backward after warm-up:
    ``max_memory_allocated`` during the step, after ``reset_peak_memory_stats``, minus
    ``memory_allocated`` just before it (the inputs, with their gradients set to None).
    The gradient the step leaves behind is part of the figure."""
    try:
        clear_grads(inputs)
        gc.collect()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        clear_grads(inputs)
        return {"method": "cuda max_memory_allocated - memory_allocated before the step",
                "base_bytes": base, "peak_bytes": peak, "extra_bytes": peak - base}
    except Exception as e:  # noqa: BLE001
        err = "OOM" if is_oom(e) else repr(e)
    clear_grads(inputs)
    free("cuda")
    return {"error": err}


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (and so ``ru_maxrss``) to the current RSS by
    writing 5 to /proc/self/clear_refs (Linux >= 4.0). False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def vmhwm_bytes() -> Optional[int]:
    """The RSS high-water mark as /proc/self/status reports it (per address space)."""
    return _proc_kib_field("/proc/self/status", "VmHWM")


def _maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def measure_child(spec: dict) -> dict:
    """Runs in a fresh ``python -m fusedloss.bench.memory SPEC`` process.

    1. imports (torch, fusedloss, the family's module) and builds the case's inputs, in
       place, with no temporaries; a compiled contender then runs one full warm-up step
       (compilation) and drops its gradient, since compiling is not what is measured;
    2. base = the peak RSS so far, after resetting the high-water mark to the current RSS
       where /proc/self/clear_refs allows it (then base = RSS just before the step);
    3. runs ONE forward + backward (the first one, for the eager contenders);
    4. extra = ``ru_maxrss`` after the step - base. The gradient the step leaves behind is
       part of the figure.
    """
    import fusedloss  # noqa: F401 - count the package in the base

    importlib.import_module(spec["module"])  # registers the family
    device = "cpu"
    fam = FAMILIES[spec["family"]](device, spec["large"], [spec["case"]["dtype"]])
    fam = fam.seen_by(spec["case"])
    case, name = spec["case"], spec["contender"]
    inputs = fam.make_inputs(case, device)
    step = fam.contenders[name](case, inputs)
    warmed = name == fam.baselines[1]
    if warmed:
        step()
        clear_grads(inputs)
    gc.collect()
    reset = reset_peak_rss()
    if warmed and not reset:
        raise RuntimeError("cannot tell the step's peak from the compilation's without "
                           "/proc/self/clear_refs")
    base, base_hwm = _maxrss_bytes(), vmhwm_bytes()
    step()
    peak, peak_hwm = _maxrss_bytes(), vmhwm_bytes()
    if base_hwm is not None and base > base_hwm + 64 * MiB:
        # ru_maxrss still holds a peak from before this program (see measure_cpu).
        raise RuntimeError(f"ru_maxrss {base / MiB:.0f} MiB > VmHWM {base_hwm / MiB:.0f} MiB "
                           "before the step: the peak RSS was inherited from the parent")
    return {"method": ("ru_maxrss after the step - RSS before it (high-water mark reset via "
                       "/proc/self/clear_refs)" if reset else
                       "ru_maxrss after the step - ru_maxrss after imports and inputs"),
            "hwm_reset": reset, "warm_up_step": warmed,
            "base_bytes": base, "peak_bytes": peak, "extra_bytes": peak - base,
            "vmhwm_extra_bytes": None if base_hwm is None else peak_hwm - base_hwm}


def measure_cpu(fam_name: str, large: bool, case: dict, name: str,
                timeout: float = 900) -> dict:
    """Peak extra resident memory of one forward + backward, in a fresh subprocess."""
    spec = json.dumps({"family": fam_name, "module": FAMILIES[fam_name].__module__,
                       "large": large, "case": case, "contender": name})
    cmd = [sys.executable, "-m", "fusedloss.bench.memory", spec]
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
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or [f"exit {p.returncode}"]
    return {"error": f"exit {p.returncode}: {tail[0][:200]}"}


def child_main(argv) -> int:
    """The entry of the measuring process: one argument, the json SPEC of measure_cpu."""
    if len(argv) != 1:
        print("usage: python -m fusedloss.bench.memory SPEC (json, made by measure_cpu)",
              file=sys.stderr)
        return 2
    print(MARK + json.dumps(measure_child(json.loads(argv[0]))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
