"""The sharded op family in the benchmark (family "sharded", not in the default run:
``--family sharded``). Registered with the engine, fusedloss.bench. Two parts.

**One rank's local work, in one process.** A rank of an 8-way run holds C / 8 classes of
every row of the gathered batch: its ``local_cos [N, C_local]`` (logit form) or its
``weight_shard [C_local, D]`` (linear form). Here that shard is the whole problem
(``class_start=0, num_classes=C_local``): without a process group the sharded functions run
with world size 1 and no collective, so the time is the local fused work, set against the
single-process ops on the same shard and against the chain users write today. The cases
marked "1-rank <backend> group" add the collectives of a real run, over a process group of
one rank (NCCL on CUDA, gloo on CPU).

**W ranks on this machine (CPU only).** The cases "PartialFC arcface, W gloo ranks" spawn W
processes (:class:`RankPool`), one rank each of a gloo group over 127.0.0.1, each holding
its shard of a ``fusedloss.nn.PartialFC(D, C, sample_rate=1.0, loss="arcface")`` and N / W
rows of the global batch; the parent times one step of all of them (forward + backward,
from its command to the last rank's answer) against the single-process
``fusedloss.nn.MarginSoftmaxHead`` (the fused linear op on all C classes, the same N rows,
the same weights), interleaved, and checks that the losses agree. Each rank reports the
peak resident memory of its first step beyond its inputs (the module and its rows of the
batch; the head: the engine's measurement, also the first step of a fresh process) and the
bytes it sent, counted by :class:`CollectiveCounter`, which wraps the
torch.distributed collectives and files each call under the tag that fusedloss.distributed
issued it with (``fusedloss.distributed.traffic``): the agreement on errors (batch sizes and
input checks, the table of every rank's shard and input digests), the combining all_reduces
(4 N floats: independent of C), the embedding all-gather (N / W x D per rank: O(N D)), the
label all-gather (N / W int64) and the embedding-gradient reduction (a reduce-scatter of the
N x D gathered gradient, padded to W equal blocks: each rank receives the sum of its own
N / W rows), each as its payload and as the bytes the
collective puts on the rank's wire (a reduce-scatter (W - 1) / W of its payload, half of an
all_reduce's 2 (W - 1) / W). A machine with 2 cores runs the W ranks on the same 2 cores,
so the time there shows what the collectives and the split cost, not the speed-up of W
machines.

**A multi-machine run** (the same per-rank measurement, over NCCL on GPUs, or gloo on CPU
machines): ``python -m fusedloss.benchmarks.sharded`` is the script each rank of
``torchrun`` runs. On each of 2 machines with 8 GPUs each (HOST = the first machine's
address, reachable from the other; any free port)::

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \\
             --rdzv-endpoint HOST:29400 --rdzv-id partialfc-bench \\
             -m fusedloss.benchmarks.sharded --classes 10000000 --batch 128 --dim 512

Every rank builds its shard of PartialFC(512, 10M) and 128 rows of its own (a global batch
of 16 x 128), runs 2 warm-up and 10 timed steps, and rank 0 prints each rank's median step
time, peak memory beyond its inputs (CUDA: ``max_memory_allocated``) and bytes sent per
step by kind (payloads, and the bytes on the wire of a ring algorithm). The script is, in short::

    dist.init_process_group("nccl")                        # torchrun sets RANK, WORLD_SIZE, ...
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    head = fusedloss.nn.PartialFC(512, 10_000_000, sample_rate=1.0, loss="arcface",
                                  device="cuda")       # this rank's 1/16 of the classes
    x = torch.randn(128, 512, device="cuda", requires_grad=True)   # this rank's embeddings
    y = torch.randint(0, 10_000_000, (128,), device="cuda")        # and labels
    for _ in range(12):
        loss = head(x, y)          # all-gathers x and y, the shard's fused work, 2 all_reduces
        loss.backward()            # one reduce-scatter: each rank gets its rows' gradient
        head.weight.grad = x.grad = None

(one machine: ``torchrun --standalone --nproc-per-node 8 -m fusedloss.benchmarks.sharded``).
"""
import atexit
import dataclasses
import datetime
import gc
import multiprocessing
import os
import socket
import statistics
import sys
import time
import traceback
import weakref
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

import fusedloss
from fusedloss import distributed as fdist
from fusedloss.bench import (DTYPES, SHORT, Contender, Family, MiB, Unavailable, api, compiled,
                             family)
from fusedloss.bench.memory import reset_peak_rss, vmhwm_bytes
from fusedloss.benchmarks.margin import cos_inputs, linear_inputs

WORLD = 8  # the run whose per-rank shapes the cases take
_UNSHARDED = "fusedloss (unsharded op)"


def sharded_arcface_baseline(cos, t, class_start=0, scale=64.0, m2=0.5):
    """The local work of a class-sharded ArcFace as users write it today (PartialFC style):
    this rank's logits with the margin on the targets it holds, then the log-sum-exp from
    the row maximum and the sum of exponentials, which a real run all_reduces across ranks
    (MAX, then SUM, and SUM of the target logit) where the comments say. At world size 1
    those reductions are the identity, and the loss is ArcFace's cross-entropy."""
    local = t - class_start
    here = (local >= 0) & (local < cos.shape[1])
    col = torch.where(here, local, torch.zeros_like(local))[:, None]
    cy = cos.gather(1, col)
    theta = torch.acos(cy.clamp(-1 + 1e-7, 1 - 1e-7))
    margin_logit = torch.where(here[:, None], torch.cos(theta + m2), cy)
    logits = cos.scatter(1, col, margin_logit) * scale
    row_max = logits.max(1, keepdim=True).values.detach()  # all_reduce MAX
    sum_exp = (logits - row_max).exp().sum(1)  # all_reduce SUM
    z_y = torch.where(here, logits.gather(1, col).squeeze(1), 0.0)  # all_reduce SUM
    return (sum_exp.log() + row_max.squeeze(1) - z_y).mean()


def sharded_arcface_linear_baseline(x, w_shard, t, class_start=0, scale=64.0, m2=0.5):
    """The linear form: the cosines of the normalised rows with this rank's class centres,
    then `sharded_arcface_baseline` (the embedding gradient, all_reduced in a real run)."""
    cos = F.linear(F.normalize(x), F.normalize(w_shard)).clamp(-1, 1)
    return sharded_arcface_baseline(cos, t, class_start, scale, m2)


# --------------------------------------------------------------------------------------
# Contenders
# --------------------------------------------------------------------------------------

def _is_linear(case: dict) -> bool:
    """The linear form (embeddings and a weight shard), which the multi-rank cases take."""
    return case["variant"].startswith(("linear", PARTIALFC))


def shard_args(case: dict, inputs: dict) -> tuple:
    """The positional tensors of every contender: (cos, target) or (x, w_shard, target)."""
    if _is_linear(case):
        return inputs["e"], inputs["w"], inputs["target"]
    return inputs["cos"], inputs["target"]


def _step(loss_of, args):
    def step():
        loss = loss_of(*args)
        loss.backward()
        return loss.detach()

    return step


def _destroy_default_group():
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def one_rank_group(device: torch.device):
    """The default process group, made here with one rank (NCCL for CUDA tensors, gloo for
    CPU ones) over an in-process store, destroyed at exit unless the caller destroys it
    first; (group, backend name)."""
    import torch.distributed as dist

    if not dist.is_available():
        raise Unavailable("torch.distributed is not available in this build of torch")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                device_id=device if device.type == "cuda" else None)
        atexit.register(_destroy_default_group)
    if dist.get_world_size() != 1 or dist.get_backend() != backend:
        raise Unavailable(f"a default process group of {dist.get_world_size()} ranks "
                          f"({dist.get_backend()}) already exists; need 1 rank of {backend}")
    return dist.group.WORLD, backend


def loss_function(case: dict, kind: str, group=None):
    """``loss_of(*shard_args(case, inputs))`` of one contender: kind "sharded" (the sharded
    function of the case's form on the whole shard, class_start 0 and num_classes C_local,
    over ``group``: None for no process group), "unsharded" (margin_cross_entropy /
    linear_margin_cross_entropy on the same shard) or "chain" (the baseline, eager)."""
    margins = dict(scale=case["scale"], m2=case["m2"])
    linear = _is_linear(case)
    if kind == "sharded":
        fn = api("linear_sharded_margin_cross_entropy" if linear
                 else "sharded_margin_cross_entropy")
        kw = dict(class_start=0, num_classes=case["C"], group=group, **margins)
    elif kind == "unsharded":
        fn = fusedloss.linear_margin_cross_entropy if linear else fusedloss.margin_cross_entropy
        kw = margins
    else:
        fn = sharded_arcface_linear_baseline if linear else sharded_arcface_baseline
        kw = dict(class_start=0, **margins)
    return lambda *args: fn(*args, **kw)


def _sharded_contender(with_group: bool) -> Contender:
    """The sharded function without a process group or over the 1-rank one."""

    def build(case, inputs):
        args = shard_args(case, inputs)
        group = one_rank_group(args[0].device)[0] if with_group else None
        return _step(loss_function(case, "sharded", group), args)

    return build


def _unsharded_contender(case, inputs):
    return _step(loss_function(case, "unsharded"), shard_args(case, inputs))


def _chain_contender(compile_it: bool) -> Contender:
    def build(case, inputs):
        loss_of = loss_function(case, "chain")
        return _step(compiled(loss_of) if compile_it else loss_of, shard_args(case, inputs))

    return build


# --------------------------------------------------------------------------------------
# W ranks on this machine: PartialFC over a gloo group, against the single-process head
# --------------------------------------------------------------------------------------

PARTIALFC = "partialfc"  # the variant of the multi-rank cases
_HEAD = "fusedloss.nn.MarginSoftmaxHead (1 process)"
GROUP_TIMEOUT_S = 300.0  # the process groups' timeout (steps at C = 1M take seconds here)
_SEED = 4242
MULTI_RANK_N, MULTI_RANK_C, MULTI_RANK_WORLDS = 128, 1_000_000, (1, 2, 4)
_WEIGHT_BLOCK = 8192  # rows of the global classifier drawn from one seed


_PARTIALFC = "fusedloss.nn.PartialFC (W gloo ranks)"


def partialfc_case(world: int, N: int, D: int, C: int, dtype: str = "float32") -> dict:
    """A multi-rank case: a global batch of N rows (split over the ranks as classes are),
    D-dimensional embeddings, C classes, ArcFace (scale 64, m2 0.5), sample_rate 1. Plotted
    against W."""
    ranks = f"{world} gloo rank" + ("s" if world > 1 else "")
    return dict(N=N, C=C, D=D, dtype=dtype, variant=PARTIALFC, world=world, loss="arcface",
                label=f"PartialFC arcface {SHORT[dtype]} N={N} D={D} C={C:,}, {ranks}",
                plot_x="world", plot_x_label=f"gloo ranks W (C = {C:,} classes)")


def fill_weight_rows(out: torch.Tensor, case: dict, start: int) -> torch.Tensor:
    """Fill ``out [count, D]`` with rows [start, start + count) of the case's global [C, D]
    classifier, in place: normal(0, 0.01) as PartialFC initialises it, each block of
    _WEIGHT_BLOCK rows drawn from its own seed, so that a rank makes its shard alone and the
    single-process head the whole, with the same values."""
    count, block = out.shape[0], _WEIGHT_BLOCK
    if count == 0:
        return out
    for b in range(start // block, (start + count - 1) // block + 1):
        rows = min(block, case["C"] - b * block)
        g = torch.Generator(device=out.device).manual_seed(_SEED + b)
        drawn = torch.empty(rows, out.shape[1], dtype=out.dtype, device=out.device)
        drawn.normal_(0.0, 0.01, generator=g)
        lo, hi = max(start, b * block), min(start + count, b * block + rows)
        out[lo - start: hi - start] = drawn[lo - b * block: hi - b * block]
    return out


def global_batch(case: dict, device="cpu"):
    """(embeddings [N, D] normal, labels [N] uniform in [0, C)), the same in every process."""
    g = torch.Generator(device=device).manual_seed(_SEED - 1)
    x = torch.empty(case["N"], case["D"], dtype=DTYPES[case["dtype"]], device=device)
    x.normal_(generator=g)
    return x, torch.randint(0, case["C"], (case["N"],), generator=g, device=device)


# --- counting the bytes of the collectives ----------------------------------------------------

# collective -> (position, keyword) of the tensor this rank contributes, and the bytes one rank
# puts on the wire per byte of it at world size W by the usual algorithm: ring all_reduce
# (a reduce-scatter, then an all-gather) 2 (W - 1) / W; ring all-gather W - 1; all_to_all and
# ring reduce-scatter (W - 1) / W (NCCL's; gloo's reduce_scatter runs an all_reduce, which is
# why fusedloss.distributed uses all_to_all there); broadcast from the source and reduce: 1.
_COLLECTIVES = {
    "all_reduce": (0, "tensor", lambda w: 2 * (w - 1) / w),
    "reduce": (0, "tensor", lambda w: 1.0),
    "broadcast": (0, "tensor", lambda w: 1.0),
    "all_gather": (1, "tensor", lambda w: w - 1),
    "all_gather_into_tensor": (1, "input_tensor", lambda w: w - 1),
    "reduce_scatter_tensor": (1, "input", lambda w: (w - 1) / w),
    "reduce_scatter_single": (1, "input", lambda w: (w - 1) / w),
    "all_to_all_single": (1, "input", lambda w: (w - 1) / w),
    "all_to_all": (1, "input_tensor_list", lambda w: (w - 1) / w),  # a list: its W tensors
    # the source's W tensors (torch.distributed.nn's all_to_all runs W of these on gloo)
    "scatter": (1, "scatter_list", lambda w: (w - 1) / w),
}
# Rooted collectives: the (position, keyword) of the source rank; only the source sends.
_SOURCE = {"broadcast": (1, "src"), "scatter": (2, "src")}
# The kind of a collective issued outside any fusedloss.distributed.traffic tag.
UNTAGGED = "bypassing fusedloss.distributed"
KINDS = (*fdist.TRAFFIC_KINDS, UNTAGGED)


class CollectiveCounter:
    """While installed, every collective called through the ``torch.distributed`` namespace
    (as fusedloss.distributed calls them) adds the bytes of the tensor this rank contributes
    (all_reduce / reduce: the tensor; all_gather: this rank's input; reduce-scatter and
    all_to_all: the whole input (of a list form: its tensors); broadcast and scatter: the
    tensor or list on the source rank) to
    ``sent[kind] = [bytes, calls]``, kind = the tag fusedloss.distributed issued the call
    under (``fdist.current_traffic()``; UNTAGGED for a collective issued without one), and
    the bytes the collective's usual algorithm puts on this rank's wire (_COLLECTIVES) to
    ``wire[kind]``. The payloads do not tell an all_reduce of N x D from a reduce-scatter of
    N x D; the wire bytes do (2 (W - 1) / W against (W - 1) / W of it)."""

    def __init__(self):
        self.sent: Dict[str, List[int]] = {}
        self.wire: Dict[str, List[int]] = {}
        self._saved = {}

    def install(self) -> "CollectiveCounter":
        import torch.distributed as dist

        for name, (pos, key, per_byte) in _COLLECTIVES.items():
            if hasattr(dist, name):  # reduce_scatter_single: torch 2.13 on
                self._saved[name] = original = getattr(dist, name)
                setattr(dist, name, self._counting(original, pos, key, per_byte,
                                                   _SOURCE.get(name)))
        return self

    def uninstall(self) -> None:
        import torch.distributed as dist

        for name, original in self._saved.items():
            setattr(dist, name, original)
        self._saved = {}

    def take(self):
        """(sent, wire) since the last take, reset."""
        taken = self.sent, self.wire
        self.sent, self.wire = {}, {}
        return taken

    def _counting(self, original, pos, key, per_byte, source):
        import torch.distributed as dist

        def collective(*args, **kwargs):
            payload = args[pos] if len(args) > pos else kwargs.get(key)
            if source is not None:  # a rooted collective: only its source sends
                src = args[source[0]] if len(args) > source[0] else kwargs[source[1]]
                payload = payload if dist.get_rank() == src else None
            payloads = payload if isinstance(payload, (list, tuple)) else [payload]
            nbytes = sum(t.numel() * t.element_size() for t in payloads if t is not None)
            kind = fdist.current_traffic() or UNTAGGED
            wire = round(nbytes * per_byte(dist.get_world_size(kwargs.get("group"))))
            for table, count in ((self.sent, nbytes), (self.wire, wire)):
                entry = table.setdefault(kind, [0, 0])
                entry[0] += count
                entry[1] += 1
            return original(*args, **kwargs)

        return collective


# --- one rank's step -------------------------------------------------------------------------

def _peak_memory_of(fn, device: torch.device):
    """(fn(), {"base_bytes", "peak_bytes", "extra_bytes"}): CPU: the resident set just before
    (the RSS high-water mark reset to it via /proc/self/clear_refs) and the high-water mark
    after (VmHWM); CUDA: memory_allocated before and max_memory_allocated during."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        if not reset_peak_rss():
            raise Unavailable("the RSS high-water mark cannot be reset (/proc/self/clear_refs)")
        base = vmhwm_bytes()
        out = fn()
        peak = vmhwm_bytes()
    return out, {"base_bytes": base, "peak_bytes": peak, "extra_bytes": peak - base}


class RankBench:
    """One rank's part of a multi-rank case: its shard of PartialFC (filled with its rows of
    the global classifier) and its rows of the global batch. ``step()`` runs forward +
    backward and reports the loss, the step time, the peak memory beyond the inputs and the
    bytes sent (payload and wire), by kind (from `counter`, installed by the caller)."""

    def __init__(self, case: dict, device: torch.device, counter: CollectiveCounter, group=None):
        self.device, self.counter = device, counter
        dtype = DTYPES[case["dtype"]]
        self.head = fusedloss.nn.PartialFC(case["D"], case["C"], sample_rate=1.0,
                                           loss=case["loss"], group=group, device=device,
                                           dtype=dtype)
        world, rank = self.head.world_size, self.head.rank
        with torch.no_grad():
            fill_weight_rows(self.head.weight, case, self.head.class_start)
        x, labels = global_batch(case, device)
        start, count = fdist.shard_range(case["N"], world, rank)
        self.x = x[start: start + count].clone().requires_grad_(True)
        self.labels = labels[start: start + count].clone()
        del x, labels
        gc.collect()

    def step(self, with_grads: bool = False) -> dict:
        """One forward + backward; with_grads adds this rank's gradients (numpy arrays)."""
        self.x.grad = self.head.weight.grad = None
        self.counter.take()

        def forward_backward():
            t0 = time.perf_counter()
            loss = self.head(self.x, self.labels)
            loss.backward()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            return loss.detach(), time.perf_counter() - t0

        (loss, seconds), memory = _peak_memory_of(forward_backward, self.device)
        sent, wire = self.counter.take()
        report = {"loss": float(loss), "step_s": seconds, "memory": memory, "sent": sent,
                  "wire": wire}
        if with_grads:  # numpy arrays: plain pickles through a pipe
            report["grad_x"] = self.x.grad.detach().cpu().numpy()
            report["grad_w"] = self.head.weight.grad.detach().cpu().numpy()
        return report


# --- W processes on this machine -------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank: int, world: int, port: int, threads: int, timeout_s: float, conn,
                 bench_class=None) -> None:
    """The loop of one spawned rank: ("setup", case) builds its bench (bench_class(case,
    device, counter), RankBench by default), ("step", kwargs) answers bench.step(**kwargs),
    ("close", None) ends; a failure answers ("error", text)."""
    import torch.distributed as dist

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    counter = CollectiveCounter().install()
    bench = None
    try:
        while True:
            try:
                what, arg = conn.recv()
            except EOFError:  # the parent is gone
                break
            if what == "close":
                break
            try:
                if what == "setup":
                    bench = None
                    gc.collect()
                    bench = (bench_class or RankBench)(arg, torch.device("cpu"), counter)
                    conn.send(("ok", None))
                else:
                    conn.send(("ok", bench.step(**arg)))
            except Exception:  # noqa: BLE001 - the parent raises it
                conn.send(("error", traceback.format_exc()))
    finally:
        counter.uninstall()
        dist.destroy_process_group()


def _stop_ranks(processes, conns) -> None:
    for conn in conns:
        try:
            conn.send(("close", None))
        except (OSError, ValueError):
            pass
    for p in processes:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
            p.join()
    for conn in conns:
        conn.close()


class RankPool:
    """W spawned processes, the ranks of a gloo group over 127.0.0.1 (a fresh port, the
    group made with a timeout), each with ``threads`` torch threads (default: this
    process's threads / W, at least 1), driven through pipes: ``setup(case)`` builds every
    rank's bench (``bench_class``, a module-level class with RankBench's constructor and
    ``step``; default RankBench), ``step()`` runs one step on every rank and returns their
    reports in rank order. A rank that fails, dies or does not answer within the group's
    timeout (plus a minute) raises here; ``close()`` (or garbage collection) ends the
    processes."""

    def __init__(self, world: int, threads: Optional[int] = None,
                 timeout_s: float = GROUP_TIMEOUT_S, bench_class=None):
        ctx = multiprocessing.get_context("spawn")
        threads = threads or max(1, torch.get_num_threads() // world)
        port, self.timeout_s = _free_port(), timeout_s
        self.processes, self.conns = [], []
        self._stop = weakref.finalize(self, _stop_ranks, self.processes, self.conns)
        for rank in range(world):
            mine, theirs = ctx.Pipe()
            p = ctx.Process(target=_rank_worker, args=(rank, world, port, threads, timeout_s,
                                                       theirs, bench_class), daemon=True)
            p.start()
            theirs.close()
            self.processes.append(p)
            self.conns.append(mine)

    def _ask(self, what: str, arg) -> list:
        for conn in self.conns:
            conn.send((what, arg))
        deadline = time.monotonic() + self.timeout_s + 60
        answers = []
        for rank, conn in enumerate(self.conns):
            try:
                ready = conn.poll(max(0.0, deadline - time.monotonic()))
                status, value = conn.recv() if ready else ("error", "no answer in time")
            except (EOFError, OSError):
                status, value = "error", "the process exited"
            if status != "ok":
                self.close()
                raise RuntimeError(f"rank {rank} of {len(self.conns)}, {what}: {value}")
            answers.append(value)
        return answers

    def setup(self, case: dict) -> None:
        self._ask("setup", case)

    def step(self, with_grads: bool = False) -> List[dict]:
        return self._ask("step", {"with_grads": with_grads})

    def close(self) -> None:
        self._stop()


# --- the contenders of a multi-rank case -----------------------------------------------------

def sent_summary(reports: List[dict], key: str = "sent") -> Dict[str, List[int]]:
    """kind -> [the most bytes any rank sent, its calls], in KINDS order, from rank reports:
    the payloads (key "sent") or the wire bytes (key "wire")."""
    out = {}
    for kind in KINDS:
        entries = [r[key][kind] for r in reports if kind in r[key]]
        if entries:
            out[kind] = [max(e[0] for e in entries), max(e[1] for e in entries)]
    return out


def sent_text(sent: Dict[str, List[int]]) -> str:
    """'kind B (calls), ...; total B' of a sent_summary."""
    kinds = ", ".join(f"{kind} {b:,} B ({calls} call{'s' if calls > 1 else ''})"
                      for kind, (b, calls) in sent.items())
    return f"{kinds}; total {sum(b for b, _ in sent.values()):,} B"


def _per_rank(values, unit) -> str:
    return " / ".join(f"{v / unit:,.0f}" for v in values)


def ranks_record(first: List[dict], last: List[dict]) -> dict:
    """The record of a multi-rank contender (PartialFC here, the pair losses across ranks in
    fusedloss.benchmarks.pairs_ranks) from the rank reports of the first step (the memory:
    the first step of fresh processes, as the engine measures every contender) and of the
    last one (the bytes by kind)."""
    extra = [r["memory"]["extra_bytes"] for r in first]
    peak = [r["memory"]["peak_bytes"] for r in first]
    sent, wire = sent_summary(last), sent_summary(last, "wire")
    same = all(r["sent"] == last[0]["sent"] for r in last)
    losses = {r["loss"] for r in last}
    details = [f"per rank (rank 0 / 1 / ...): peak extra MiB {_per_rank(extra, MiB)}; peak RSS "
               f"MiB, inputs included, {_per_rank(peak, MiB)}; forward + backward in the rank "
               f"(last step) ms {_per_rank([r['step_s'] for r in last], 1e-3)}"]
    who = "the same on every rank" if same else "the most of any rank"
    details.append(f"bytes sent per rank per step ({who}): {sent_text(sent)}")
    details.append(f"bytes on the wire per rank per step (the most of any rank; ring model): "
                   f"{sent_text(wire)}")
    if len(losses) > 1:
        details.append(f"THE RANKS' LOSSES DIFFER: {sorted(losses)}")
    return {"memory": {"method": "per rank: VmHWM after its first step - RSS before it "
                                 "(high-water mark reset via /proc/self/clear_refs); the "
                                 "largest over the ranks",
                       "extra_bytes": max(extra), "per_rank_extra_bytes": extra,
                       "per_rank_peak_bytes": peak},
            "world": len(last), "sent_bytes_per_step": {k: v[0] for k, v in sent.items()},
            "calls_per_step": {k: v[1] for k, v in sent.items()},
            "wire_bytes_per_step": {k: v[0] for k, v in wire.items()},
            "rank_step_ms": [r["step_s"] * 1e3 for r in last], "details": details}


def _partialfc_contender(case, inputs):
    pool = RankPool(case["world"])
    pool.setup(case)
    first = []

    def step():
        ranks = pool.step()
        first[:] = first or ranks
        inputs["report"][_PARTIALFC] = ranks_record(first, ranks)
        return torch.tensor(ranks[0]["loss"])

    return step


def _head_contender(case, inputs):
    """The single-process fused head on the whole batch (its memory: the engine's
    measurement). The step drops the weight's gradient at its end (the peak has counted it),
    so that the C x D gradient does not sit in this process while the ranks run."""
    head, x, t = inputs["head"], inputs["x"], inputs["target"]

    def step():
        loss = head(x, t)
        loss.backward()
        head.weight.grad = None
        return loss.detach()

    return step


def partialfc_inputs(case: dict, device: str) -> dict:
    """The single-process side: the global batch and a MarginSoftmaxHead holding the whole
    global classifier (the ranks build their own parts in their processes)."""
    head = fusedloss.nn.MarginSoftmaxHead(case["D"], case["C"], case["loss"],
                                          dtype=DTYPES[case["dtype"]], device=device)
    with torch.no_grad():
        fill_weight_rows(head.weight, case, 0)
    x, t = global_batch(case, device)
    x.requires_grad_(True)
    return {"head": head, "x": x, "target": t, "leaves": [x, head.weight], "report": {}}


# --------------------------------------------------------------------------------------
# The family
# --------------------------------------------------------------------------------------

def shard_inputs(case: dict, device: str) -> dict:
    if case["variant"] == PARTIALFC:
        return partialfc_inputs(case, device)
    return linear_inputs(case, device) if _is_linear(case) else cos_inputs(case, device)


def _bytes_logit(case: dict) -> Optional[int]:
    """Logit form: the least traffic of forward + backward, 3·N·C_local·itemsize (forward
    reads the cosines, backward reads them again and writes their gradient)."""
    if _is_linear(case):
        return None
    return 3 * case["N"] * case["C"] * DTYPES[case["dtype"]].itemsize


def _flops_linear(case: dict) -> Optional[int]:
    """Linear form: 6·N·C_local·D, the logits and the two gradient matmuls (multi-rank
    cases: 6·N·C·D over all the ranks)."""
    return 6 * case["N"] * case["C"] * case["D"] if _is_linear(case) else None


def _group_view(fam: Family, case: dict) -> Family:
    """The 1-rank group cases: the sharded function over the group against the unsharded op
    (their "x vs eager" column) only; the chain is timed in the cases without a group.
    The multi-rank cases: PartialFC over W ranks against the single-process head."""
    if case["variant"] == PARTIALFC:
        return dataclasses.replace(fam, contenders={_HEAD: _head_contender,
                                                    _PARTIALFC: _partialfc_contender},
                                   baselines=(_HEAD, ""), fused=(_HEAD, _PARTIALFC))
    if not case["variant"].endswith("-group"):
        return fam
    label = f"fusedloss-sharded (1-rank {case['group_backend']} group)"
    return dataclasses.replace(fam, contenders={label: _sharded_contender(with_group=True),
                                                _UNSHARDED: _unsharded_contender},
                               baselines=(_UNSHARDED, ""), fused=(label, _UNSHARDED))


def cases_of(variant: str, N: int, Cs, dtypes, D: int) -> List[dict]:
    """Every dtype x C_local of a variant: "logit" or "linear", "-group" for the 1-rank
    process group cases."""
    linear = variant.startswith("linear")
    form = "linear arcface" if linear else "arcface"
    group = variant.endswith("-group")
    cases = []
    for dt in dtypes:
        for c in Cs:
            case = dict(N=N, C=c, dtype=dt, variant=variant, world=WORLD, scale=64.0, m2=0.5)
            if linear:
                case["D"] = D
            where = " (1-rank group)" if group else ""
            dims = f"N={N} D={D}" if linear else f"N={N}"
            case["label"] = f"sharded {form}{where} {SHORT[dt]} {dims} C_local={c:,}"
            cases.append(case)
    return cases


@family("sharded", default=False)
def sharded_family(device: str, large: bool, dtypes: Optional[List[str]]) -> Family:
    D = 512
    if device == "cuda":
        dtypes = dtypes or ["bfloat16"]
        N, Cs = WORLD * 1024, [125_000] + ([1_250_000] if large else [])
    else:
        dtypes = dtypes or ["float32"]
        N, Cs = WORLD * 128, [12_500, 125_000] + ([375_000] if large else [])
    cases = cases_of("logit", N, Cs, dtypes, D) + cases_of("linear", N, Cs, dtypes, D)
    group_backend = "nccl" if device == "cuda" else "gloo"
    for variant in ("logit-group", "linear-group"):
        for c in cases_of(variant, N, Cs[-1:], dtypes, D):
            c["group_backend"] = group_backend
            cases.append(c)
    if device == "cpu":  # W gloo processes on this machine; the GPU machine has one GPU
        cases += [partialfc_case(w, MULTI_RANK_N, D, MULTI_RANK_C, dt)
                  for dt in dtypes for w in MULTI_RANK_WORLDS]
    contenders = {
        "fusedloss-sharded": _sharded_contender(with_group=False),
        _UNSHARDED: _unsharded_contender,
        "baseline-eager": _chain_contender(compile_it=False),
        "baseline-compile": _chain_contender(compile_it=True),
    }
    notes = [
        f"sharded: the local work of one rank of a {WORLD}-rank class-sharded ArcFace (scale "
        f"64, m2 0.5): N = {WORLD} x {N // WORLD} gathered rows, C_local = C / {WORLD} classes "
        "(C_local 12,500 / 125,000 / 375,000 = C 100k / 1M / 3M on CPU; 125,000 / 1,250,000 "
        "= 1M / 10M on CUDA), in one process. `fusedloss-sharded` = "
        "`sharded_margin_cross_entropy(local_cos, t, class_start=0, num_classes=C_local)` "
        "(logit form, cos [N, C_local]) or `linear_sharded_margin_cross_entropy(x, w_shard, t, "
        "...)` (linear form, x [N, D], w_shard [C_local, D], D = 512), with no process group: "
        "world size 1, no collective. `fusedloss (unsharded op)` = `margin_cross_entropy` / "
        "`linear_margin_cross_entropy` on the same shard. Baseline = "
        "`sharded_arcface_baseline` (the PartialFC-style local chain: margin on the local "
        "targets, row max, sum of exponentials, target logit, each of which a real run "
        "all_reduces) after `F.linear(F.normalize(x), F.normalize(w)).clamp(-1, 1)` for the "
        "linear form; eager and under torch.compile(dynamic=False). GB/s (logit form) = "
        "3·N·C_local·itemsize / time; TFLOP/s (linear form) = 6·N·C_local·D / time. Inputs "
        "as in the margin and margin_linear families.",
        f"sharded, 1-rank group cases: the same call with `group=` a {group_backend} process "
        "group of one rank (made in the benchmark process over an in-process store), so the "
        "agreement collective and the O(N) combining collectives of a real run take place; "
        "\"x vs eager\" there = time of the unsharded op / the contender's.",
        f"sharded, multi-rank cases (CPU): `fusedloss.nn.PartialFC({D}, {MULTI_RANK_C:,}, "
        "sample_rate=1.0, loss=\"arcface\")` over W = " + ", ".join(map(str, MULTI_RANK_WORLDS))
        + f" spawned gloo processes on 127.0.0.1 (each rank: torch threads = this process's / "
        f"W, at least 1; its shard of the classifier and N / W of the N = {MULTI_RANK_N} rows), "
        "against `fusedloss.nn.MarginSoftmaxHead` (the fused linear op on all C classes, the "
        "same rows and weights) in the benchmark process; \"x vs eager\" there = the head's "
        "time / PartialFC's. Time: from the parent's command to the last rank's answer, "
        "forward + backward. Memory: each rank measures its first step, in its fresh process "
        "(VmHWM after it, the high-water mark reset to the RSS before it: beyond the module "
        "and the inputs, the weight gradient included; the column: the largest rank), the "
        "head the engine's way (a fresh process, its first step). Bytes: the payload each "
        "rank hands to each collective (all_reduce: its tensor; all_gather: its input; "
        "reduce-scatter and all_to_all: the whole input), counted by wrapping "
        "torch.distributed and filed under the tag fusedloss.distributed issued it with "
        "(`fusedloss.distributed.traffic`), and the bytes "
        "a ring algorithm puts on each rank's wire (all_reduce 2 (W - 1) / W of the payload, "
        "all-gather W - 1 times, reduce-scatter and all_to_all (W - 1) / W); the notes below "
        "list them per case. On this 2-core machine the W ranks "
        "share the 2 cores: the time shows the cost of the split and the collectives, not "
        "the speed-up of W machines.",
    ]
    return Family(name="sharded", cases=cases, make_inputs=shard_inputs, contenders=contenders,
                  fused=("fusedloss-sharded", _UNSHARDED), bytes_moved=_bytes_logit,
                  flops=_flops_linear, notes=notes, mem_factor=8.0, case_view=_group_view,
                  x_label="classes per rank C_local (multi-rank cases: all classes C)")


# --------------------------------------------------------------------------------------
# One rank of a multi-machine run, under torchrun (see the module docstring)
# --------------------------------------------------------------------------------------

def torchrun_main(argv=None) -> int:
    """``python -m fusedloss.benchmarks.sharded``: one rank of a torchrun launch (the
    environment names the rank, the world size and the rendezvous). NCCL with one GPU per
    rank (LOCAL_RANK) where CUDA is available, else gloo on CPU."""
    import argparse

    import torch.distributed as dist

    p = argparse.ArgumentParser(prog="torchrun ... -m fusedloss.benchmarks.sharded",
                                description="PartialFC forward + backward on every rank of a "
                                            "torchrun launch: step time, peak memory beyond "
                                            "the inputs and bytes sent per rank.")
    p.add_argument("--classes", type=int, default=1_000_000, help="C (default 1,000,000)")
    p.add_argument("--batch", type=int, default=128, help="rows per rank (default 128)")
    p.add_argument("--dim", type=int, default=512, help="embedding dimension D (default 512)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps (default 2)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if "RANK" not in os.environ:
        p.error("run me under torchrun (it sets RANK, WORLD_SIZE and the rendezvous)")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))
    world, rank = dist.get_world_size(), dist.get_rank()
    case = partialfc_case(world, args.batch * world, args.dim, args.classes, args.dtype)
    counter = CollectiveCounter().install()
    try:
        bench = RankBench(case, device, counter)
        reports = [bench.step() for _ in range(args.warmup + args.steps)]
    finally:
        counter.uninstall()
    # memory: the largest step, warm-up included (on CPU the first step of the process is the
    # one that takes fresh pages; the allocator reuses them later); time: the timed steps
    mine = {"ms": statistics.median(r["step_s"] for r in reports[args.warmup:]) * 1e3,
            "extra": max(r["memory"]["extra_bytes"] for r in reports),
            "loss": reports[-1]["loss"], "sent": reports[-1]["sent"], "wire": reports[-1]["wire"]}
    every = [None] * world
    dist.all_gather_object(every, mine)
    if rank == 0:
        print(f"{case['label']} ({backend}, {device.type}); per rank: median step of "
              f"{args.steps} after {args.warmup} warm-up, peak memory beyond the inputs")
        for r, rec in enumerate(every):
            print(f"  rank {r:>3}: {rec['ms']:10.1f} ms  {rec['extra'] / MiB:9.1f} MiB  "
                  f"loss {rec['loss']:.6g}")
        print("bytes sent per rank per step (the most of any rank): "
              + sent_text(sent_summary(every)))
        print("bytes on the wire per rank per step (ring model): "
              + sent_text(sent_summary(every, "wire")))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    # Hand over to the module proper (this file runs as __main__ under -m), so that the
    # spawned and the counted code are those of fusedloss.benchmarks.sharded.
    from fusedloss.benchmarks.sharded import torchrun_main as _main

    sys.exit(_main())
