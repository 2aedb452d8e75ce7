"""Timing of one case: every contender of the case gets the same inputs, is warmed up (a
compiled contender compiles during its first warm-up call, which is not timed), and then the
contenders run interleaved, round after round (the order rotated each round), so that a slow
phase of a noisy machine hits all of them alike; each reports the median of at least
``repeats`` runs of forward + backward, with the gradients of the inputs set to None before
each run. On CUDA the same call also measures each contender's peak memory
(:func:`fusedloss.bench.memory.measure_cuda`)."""
from __future__ import annotations

import gc
import statistics
import time
from typing import Dict, List

import torch

from fusedloss.bench import Family, NotInstalled, Step, Unavailable
from fusedloss.bench.memory import clear_grads, free, is_oom, measure_cuda


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(step: Step, inputs: dict, device: str) -> float:
    """Seconds of one forward + backward (CUDA: between two events around the step)."""
    clear_grads(inputs)
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


def run_case(fam: Family, case: dict, device: str, repeats: int, log) -> Dict[str, dict]:
    """Time every contender of one case, interleaved. Returns name -> record: ``status``
    ("ok", "not installed", "skipped: why", "OOM", "error: ..."), ``first_call_s``, ``loss``,
    ``warm_s``, ``times_ms``, ``median_ms``, and on CUDA ``memory``."""
    fam = fam.seen_by(case)
    records: Dict[str, dict] = {name: {"status": "ok"} for name in fam.contenders}
    torch._dynamo.reset()  # each case compiles its own static graph
    free(device)
    try:
        inputs = fam.make_inputs(case, device)
    except Exception as e:  # noqa: BLE001
        why = "OOM building inputs" if is_oom(e) else f"error building inputs: {e!r}"
        return {name: {"status": why} for name in fam.contenders}

    steps: Dict[str, Step] = {}
    warm = 3 if device == "cuda" else 1
    for name, build in fam.contenders.items():
        rec = records[name]
        try:
            step = build(case, inputs)
            clear_grads(inputs)
            _sync(device)
            t0 = time.perf_counter()
            loss = step()  # compiles, for a compiled contender: not timed
            _sync(device)
            rec["first_call_s"] = time.perf_counter() - t0
            rec["loss"] = float(loss.float())
            est = rec["first_call_s"]
            extra = warm - 1 + (1 if name == fam.baselines[1] else 0)
            for _ in range(extra):
                est = timed(step, inputs, device)
            rec["warm_s"] = est
            steps[name] = step
        except NotInstalled as e:
            rec["status"], rec["why"] = "not installed", str(e)
        except Unavailable as e:
            rec["status"] = f"skipped: {e}"
        except Exception as e:  # noqa: BLE001
            rec["status"] = "OOM" if is_oom(e) else f"error: {type(e).__name__}: {e}"
        if rec["status"] != "ok":
            free(device)  # after the except block, which kept the failed step's frames alive
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
                times[name].append(timed(steps[name], inputs, device))
            except Exception as e:  # noqa: BLE001
                records[name]["status"] = "OOM" if is_oom(e) else f"error: {e!r}"
            if records[name]["status"] != "ok":
                free(device)
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
                records[name]["memory"] = measure_cuda(step, inputs)
    del steps, inputs
    free(device)
    return records
