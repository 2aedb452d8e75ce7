"""The pair losses across ranks in the benchmark (family "pairs_ranks", not in the default
run: ``--family pairs_ranks``; registered from fusedloss.benchmarks.pairs).

A global batch of N = 4,096 rows of D = 128 (fp32) split evenly over W = 2 and 4 spawned
gloo processes on 127.0.0.1 (fusedloss.benchmarks.sharded's RankPool; each rank: torch
threads = this process's / W, at least 1), two losses:

- InfoNCE, symmetric (CLIP's form, temperature 0.07): queries and keys [N, D];
- Multi-Similarity with its miner (alpha 2, beta 50, base 0.5, epsilon 0.1): embeddings
  [N, D] and labels of 4 rows per class, shuffled across the ranks.

Contenders, all forward + backward of one training step on every rank:

- ``fusedloss group= (W gloo ranks)``: ``info_nce_loss(q, k, symmetric=True, group=g)`` /
  ``multi_similarity_loss(x, y, group=g)`` on each rank's rows (the tiled kernels, the rank's
  rows against the gathered batch, the references' gradient reduce-scattered to its owners);
- ``PML DistributedLossWrapper (W gloo ranks)``: pytorch-metric-learning's wrapper around the
  same PML loss (``NTXentLoss`` with ``ref_emb`` both ways, labels = global row ids; or
  ``MultiSimilarityLoss`` on the pairs of ``DistributedMinerWrapper(MultiSimilarityMiner)``):
  every rank gathers the batch and runs the dense loss on the whole N x N matrix;
- ``all-gather + dense logits (W gloo ranks)``, InfoNCE only: what open_clip's ClipLoss does
  (``gather_with_grad=True, local_loss=True``): each rank gathers the normalised rows with
  ``torch.distributed.nn.functional.all_gather`` (autograd-aware) and takes the cross-entropy
  of its ``N_r x N`` logits both ways, the mean over its rows (the loss of the global batch
  is the mean over the ranks, which DDP's averaging makes of the gradients);
- ``fusedloss (1 process, global batch)``: the same fused function without a group on the
  whole batch, in the benchmark process (the "x vs eager" column: its time / the
  contender's), and the same with one torch thread during its step, as each rank has.

Per rank: the peak resident memory of its first step beyond its inputs, its step time and
the bytes it hands to each collective (fusedloss.benchmarks.sharded.CollectiveCounter, by
fusedloss.distributed's traffic tags; PML's and torch.distributed.nn's collectives bypass
them). The table shows the loss of the global batch on every contender: PML's wrapper
returns W times it (DDP's convention; fusedloss scales the gradient instead), the dense form
the mean over the rank's rows (averaged over the ranks for the report, outside the timed
step); rounded to 6 digits, so that ranks that sum in another order agree.
"""
import gc
import time
from typing import List, Optional

import torch

import fusedloss
from fusedloss import distributed as fdist
from fusedloss.bench import DTYPES, SHORT, Family, NotInstalled, Unavailable, family
from fusedloss.benchmarks.sharded import RankPool, _peak_memory_of, ranks_record

N, D, WORLDS = 4096, 128, (2, 4)
TEMPERATURE = 0.07
ROWS_PER_CLASS = 4
_SEED = 1616
LOSSES = {"info_nce": "InfoNCE symmetric", "multi_similarity": "Multi-Similarity + miner"}
FUSED = "fusedloss group= (W gloo ranks)"
PML = "PML DistributedLossWrapper (W gloo ranks)"
DENSE = "all-gather + dense logits (W gloo ranks)"
SINGLE = "fusedloss (1 process, global batch)"
SINGLE_1T = "fusedloss (1 process, 1 thread, global batch)"


def rank_case(loss: str, world: int, dtype: str = "float32") -> dict:
    ranks = f"{world} gloo ranks"
    return dict(N=N, C=N, D=D, dtype=dtype, loss=loss, world=world,
                label=f"{LOSSES[loss]} {SHORT[dtype]} N={N} D={D}, {ranks}",
                plot_x="world", plot_x_label=f"gloo ranks W (global batch {N} x {D})")


def global_batch(case: dict):
    """(a, b, labels), the same in every process: a [N, D] normal (InfoNCE's queries, the
    Multi-Similarity embeddings), b = a + noise (InfoNCE's keys), labels [N] with
    ROWS_PER_CLASS rows per class in shuffled order."""
    g = torch.Generator().manual_seed(_SEED)
    dtype = DTYPES[case["dtype"]]
    a = torch.randn(case["N"], case["D"], generator=g).to(dtype)
    b = (a.float() + 0.5 * torch.randn(case["N"], case["D"], generator=g)).to(dtype)
    labels = torch.randperm(case["N"], generator=g) // ROWS_PER_CLASS
    return a, b, labels


def fused_loss(case: dict, group=None):
    """(a, b, labels) -> the fused loss of these rows (with a group: this rank's rows of the
    global batch)."""
    if case["loss"] == "info_nce":
        return lambda a, b, labels: fusedloss.info_nce_loss(
            a, b, temperature=TEMPERATURE, symmetric=True, group=group)
    return lambda a, b, labels: fusedloss.multi_similarity_loss(a, labels, group=group)


def pml_loss(case: dict):
    """(a, b, labels) -> PML's DistributedLossWrapper around the same loss (labels: the
    global row ids for InfoNCE); W times the loss of the global batch."""
    from pytorch_metric_learning import losses, miners
    from pytorch_metric_learning.utils.distributed import (DistributedLossWrapper,
                                                           DistributedMinerWrapper)

    if case["loss"] == "info_nce":
        wrapped = DistributedLossWrapper(losses.NTXentLoss(temperature=TEMPERATURE))
        return lambda a, b, ids: (wrapped(a, ids, ref_emb=b, ref_labels=ids)
                                  + wrapped(b, ids, ref_emb=a, ref_labels=ids)) / 2
    loss = DistributedLossWrapper(losses.MultiSimilarityLoss(alpha=2.0, beta=50.0, base=0.5))
    miner = DistributedMinerWrapper(miners.MultiSimilarityMiner(epsilon=0.1))
    return lambda a, b, labels: loss(a, labels, miner(a, labels))


def dense_info_nce(a, b, ids):
    """open_clip's ClipLoss with gather_with_grad and local_loss: this rank's N_r x N logits
    against the gathered rows, both ways; the mean over this rank's rows."""
    import torch.distributed.nn.functional as dist_fn
    import torch.nn.functional as F

    q, k = F.normalize(a, dim=1), F.normalize(b, dim=1)
    every_q, every_k = (torch.cat(dist_fn.all_gather(t)) for t in (q, k))
    return (F.cross_entropy(q @ every_k.T / TEMPERATURE, ids)
            + F.cross_entropy(k @ every_q.T / TEMPERATURE, ids)) / 2


class PairRankBench:
    """One rank's part of a case (RankPool's bench_class): its rows of the global batch (an
    even split) and the loss of case["impl"], "fusedloss", "pml" or "dense" (InfoNCE).
    ``step()`` runs forward + backward and reports as fusedloss.benchmarks.sharded.RankBench
    does."""

    def __init__(self, case: dict, device: torch.device, counter):
        import torch.distributed as dist

        self.device, self.counter = device, counter
        world, rank = dist.get_world_size(), dist.get_rank()
        a, b, labels = global_batch(case)
        start, count = fdist.shard_range(case["N"], world, rank)
        rows = slice(start, start + count)
        self.a = a[rows].clone().requires_grad_(True)
        self.b = b[rows].clone().requires_grad_(True)
        impl = case["impl"]
        if impl != "fusedloss" and case["loss"] == "info_nce":
            labels = torch.arange(case["N"])  # the positives: the same global row id
        self.labels = labels[rows].clone()
        self.loss = {"pml": pml_loss, "dense": lambda case: dense_info_nce,
                     "fusedloss": lambda case: fused_loss(case, dist.group.WORLD)}[impl](case)
        # the loss of the global batch from this rank's: PML's wrapper returns W times it,
        # the dense form the mean over this rank's rows (the mean over ranks: an even split)
        self.global_loss = {"pml": lambda loss: loss / world,
                            "dense": lambda loss: fdist.all_reduce(loss, "sum") / world,
                            "fusedloss": lambda loss: loss}[impl]
        del a, b, labels
        gc.collect()

    def step(self, with_grads: bool = False) -> dict:
        self.a.grad = self.b.grad = None
        self.counter.take()

        def forward_backward():
            t0 = time.perf_counter()
            loss = self.loss(self.a, self.b, self.labels)
            loss.backward()
            return loss.detach(), time.perf_counter() - t0

        (loss, seconds), memory = _peak_memory_of(forward_backward, self.device)
        sent, wire = self.counter.take()
        loss = self.global_loss(loss)
        self.counter.take()  # the dense form's all_reduce of its loss: not part of the step
        return {"loss": float(f"{float(loss):.6g}"), "step_s": seconds, "memory": memory,
                "sent": sent, "wire": wire}


def _ranks_contender(impl: str, name: str):
    def contender(case, inputs):
        if impl == "dense" and case["loss"] != "info_nce":
            raise Unavailable("InfoNCE only")
        if impl == "pml":
            try:
                import pytorch_metric_learning  # noqa: F401
            except ImportError:
                raise NotInstalled("pytorch-metric-learning") from None
        pool = RankPool(case["world"], bench_class=PairRankBench)
        pool.setup({**case, "impl": impl})
        first: List[dict] = []

        def step():
            ranks = pool.step()
            first[:] = first or ranks
            inputs["report"][name] = ranks_record(first, ranks)
            return torch.tensor(ranks[0]["loss"])

        return step

    return contender


def _single_contender(threads: Optional[int] = None):
    """The fused function on the global batch in this process, with `threads` torch threads
    during the step (None: this process's)."""

    def contender(case, inputs):
        loss_of, a, b, labels = inputs["loss"], inputs["a"], inputs["b"], inputs["labels"]

        def step():
            saved = torch.get_num_threads()
            torch.set_num_threads(threads or saved)
            try:
                loss = loss_of(a, b, labels)
                loss.backward()
            finally:
                torch.set_num_threads(saved)
            return loss.detach()

        return step

    return contender


def rank_inputs(case: dict, device: str) -> dict:
    """The single-process side: the global batch (the ranks make their rows themselves)."""
    a, b, labels = global_batch(case)
    a, b = a.to(device).requires_grad_(True), b.to(device).requires_grad_(True)
    return {"a": a, "b": b, "labels": labels.to(device), "loss": fused_loss(case),
            "leaves": [a, b], "report": {}}


def _flops(case: dict) -> Optional[int]:
    """6 N^2 D per direction (the similarities, then the two gradient products): one
    direction for Multi-Similarity (its mining pass adds 2 N^2 D), two for symmetric InfoNCE."""
    n, d = case["N"], case["D"]
    return (12 if case["loss"] == "info_nce" else 8) * n * n * d


@family("pairs_ranks", default=False)
def pairs_ranks_family(device: str, large: bool, dtypes: Optional[List[str]]) -> Family:
    dtypes = dtypes or ["float32"]
    cases = ([rank_case(loss, w, dt) for dt in dtypes for loss in LOSSES for w in WORLDS]
             if device == "cpu" else [])  # W processes on this machine; the GPU machine has one
    contenders = {SINGLE: _single_contender(), SINGLE_1T: _single_contender(1),
                  FUSED: _ranks_contender("fusedloss", FUSED), PML: _ranks_contender("pml", PML),
                  DENSE: _ranks_contender("dense", DENSE)}
    notes = [
        f"pairs_ranks: InfoNCE (symmetric, temperature {TEMPERATURE}) and Multi-Similarity "
        f"with its miner on a global batch of N = {N} rows of D = {D}, split evenly over W "
        f"spawned gloo processes on 127.0.0.1 (each rank: torch threads = this process's / W, "
        f"at least 1). `{FUSED}` = the fused function with `group=` on each rank's rows; "
        f"`{PML}` = pytorch-metric-learning's DistributedLossWrapper (and "
        "DistributedMinerWrapper) around NTXentLoss / MultiSimilarityLoss (+ "
        "MultiSimilarityMiner), which gathers the batch and runs the dense loss on all N x N "
        f"pairs on every rank; `{DENSE}` (InfoNCE) = open_clip's ClipLoss pattern "
        "(gather_with_grad, local_loss): each rank's N / W x N logits against the rows "
        "gathered by torch.distributed.nn.functional.all_gather, cross-entropy both ways; "
        f"`{SINGLE}` = the fused function without a group on the whole "
        "batch in the benchmark process (\"x vs eager\" = its time / the contender's), "
        f"`{SINGLE_1T}` the same with one torch thread during its step (as each rank has): "
        "on a loaded machine the fused CPU kernels' parallel regions wait for a busy core, "
        "which a single thread never does. Time: "
        "from the parent's command to the last rank's answer, forward + backward. Memory: "
        "each rank's first step in its fresh process (VmHWM after it, the high-water mark "
        "reset to the RSS before it; the column: the largest rank). Bytes: the payload each "
        "rank hands to each collective and a ring algorithm's bytes on its wire, by "
        "fusedloss.distributed's tags (PML's own collectives: \"bypassing "
        "fusedloss.distributed\"). The W ranks share this machine's cores, so the time against "
        "the single process shows the cost of the split and the collectives, not the "
        "speed-up of W machines.",
    ]
    targets = [{"case": {"loss": loss, "world": 2}, "contender": FUSED, "baseline": PML,
                "time_vs_eager": 1 / 3, "memory_vs_eager": 0.1} for loss in LOSSES]
    return Family(name="pairs_ranks", cases=cases, make_inputs=rank_inputs,
                  contenders=contenders, baselines=(SINGLE, ""), fused=(SINGLE, FUSED),
                  flops=_flops, notes=notes, mem_factor=16.0, targets=targets,
                  x_label="gloo ranks W")
