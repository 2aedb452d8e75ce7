"""Process-group helpers of the sharded ops: who holds which classes, the agreement on bad
input before any real collective, and an autograd-aware all-gather of rows, whose backward
reduce-scatters the rows' gradient.

Every helper also works without torch.distributed initialised: the "group" is then this
process alone (world size 1, rank 0) and no collective runs.

No rank may raise alone: the others would wait in the next collective until the group's
timeout. So the sharded functions first gather every rank's small summary of its inputs in
one all_reduce (`gather_table`), and every rank derives the same errors from the same table
and raises the same message.

Every collective of this module runs inside `traffic(kind)`, kind one of TRAFFIC_KINDS: what
the collective is for. `current_traffic()` is that kind while the collective is being issued
and None outside any, so that a counter wrapping the torch.distributed collectives (the
benchmark's) files each call's bytes by purpose, and a call made without a tag bypassed this
module.
"""
import contextlib
import contextvars
import zlib
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist

_MISSING = torch.iinfo(torch.int64).min  # a table slot that another rank fills


# --- traffic tags ------------------------------------------------------------------------------

ERROR_AGREEMENT = "error agreement"  # gather_table, gather_counts: small int64 summaries
COMBINING = "combining"  # all_reduce of the per-row partials of the sharded ops: O(N)
EMBEDDING_ALL_GATHER = "embedding all-gather"  # all_gather_rows of floating-point rows
LABEL_ALL_GATHER = "label all-gather"  # all_gather_rows of integer rows
EMBEDDING_GRAD = "embedding-grad reduction"  # the sum over ranks of the rows' gradient
TRAFFIC_KINDS = (ERROR_AGREEMENT, COMBINING, EMBEDDING_ALL_GATHER, LABEL_ALL_GATHER,
                 EMBEDDING_GRAD)

_TRAFFIC: contextvars.ContextVar = contextvars.ContextVar("fusedloss_traffic", default=None)


@contextlib.contextmanager
def traffic(kind: str) -> Iterator[None]:
    """Tags the collectives issued inside with `kind` (innermost tag wins); per thread."""
    if kind not in TRAFFIC_KINDS:
        raise ValueError(f"traffic: unknown kind {kind!r}, expected one of {TRAFFIC_KINDS}")
    token = _TRAFFIC.set(kind)
    try:
        yield
    finally:
        _TRAFFIC.reset(token)


def current_traffic() -> Optional[str]:
    """The kind of the collective being issued (see traffic); None outside any tag."""
    return _TRAFFIC.get()


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_and_rank(group=None):
    """(world size, this process's rank) in `group` (None: the default group, or this process
    alone when torch.distributed is not initialised)."""
    if not initialized():
        if group is not None:
            raise RuntimeError("a process group was given, but torch.distributed is not "
                               "initialised (call torch.distributed.init_process_group first)")
        return 1, 0
    rank = dist.get_rank(group)
    if rank < 0:
        raise RuntimeError("this process is not a member of the given process group")
    return dist.get_world_size(group), rank


def shard_range(num_classes: int, world_size: int, rank: int):
    """(class_start, num_local) of `rank`: classes [class_start, class_start + num_local), with
    class_start = rank * (C // W) + min(rank, C % W) and num_local = C // W + (rank < C % W).
    The first C % W ranks hold one class more; ranks past C (when C < W) hold none."""
    if num_classes < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"shard_range: need num_classes >= 1, world_size >= 1 and 0 <= rank < "
                         f"world_size, got {num_classes}, {world_size}, {rank}")
    base, extra = divmod(num_classes, world_size)
    return rank * base + min(rank, extra), base + (1 if rank < extra else 0)


def shard_starts(num_classes: int, world_size: int) -> List[int]:
    """class_start of every rank, in rank order, followed by num_classes."""
    return [shard_range(num_classes, world_size, r)[0] for r in range(world_size)] + [num_classes]


def all_reduce(x: torch.Tensor, op: str, group=None, kind: str = COMBINING) -> torch.Tensor:
    """A reduced copy of x ("sum" or "max") over the group; x itself when there is no group.
    `kind` tags the traffic (see traffic); the default is that of the sharded ops' reductions
    of their per-row partials."""
    if not initialized():
        return x
    out = x.contiguous().clone()
    with traffic(kind):
        dist.all_reduce(out, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX,
                        group=group)
    return out


# --- agreement on errors -------------------------------------------------------------------

def gather_table(local: Dict[str, int], group=None, device=None) -> List[Dict[str, int]]:
    """Every rank's `local` (the same keys everywhere, int64 values), in rank order, with one
    all_reduce(MAX) of W * K int64: each rank writes its row and leaves the others at the
    smallest int64, so the maximum is each rank's own row."""
    world, rank = world_and_rank(group)
    keys = sorted(local)
    table = torch.full((world, len(keys)), _MISSING, dtype=torch.int64, device=device)
    table[rank] = torch.tensor([int(local[k]) for k in keys], dtype=torch.int64)
    table = all_reduce(table, "max", group, kind=ERROR_AGREEMENT).tolist()
    return [dict(zip(keys, row)) for row in table]


def prepared_everywhere(fn: str, group, device, prepare: Callable, row_of: Callable):
    """(prepare(), the table of every rank's row_of(prepared)): this rank's checks and set-up,
    then one gather_table before any real collective, so that bad input on any rank raises
    on every rank and never hangs the group. A rank whose own checks failed (prepare raised
    TypeError, ValueError or RuntimeError) raises its own error, the others a ValueError
    that names the failed ranks; the caller then raises, identically everywhere, what the
    table shows (values that must agree across ranks). row_of(prepared) is a dict of ints
    with the same keys on every rank and in every call; a failed rank sends 0 for each."""
    try:
        prepared, error = prepare(), None
    except (TypeError, ValueError, RuntimeError) as exc:
        if not initialized():
            raise
        prepared, error = None, exc
    row = row_of(prepared) if error is None else dict.fromkeys(row_of(None), 0)
    row["local_error"] = int(error is not None)
    table = gather_table(row, group, device)
    if error is not None:
        raise error
    failed = [rank for rank, r in enumerate(table) if r["local_error"]]
    if failed:
        raise ValueError(f"{fn}: the inputs of rank(s) {failed} are invalid (the reason is raised "
                         "there); every rank stops here")
    return prepared, table


class _SumOverRanks(torch.autograd.Function):
    """The sum over ranks of each rank's partial t. Backward: each rank differentiates its own
    partial, whose gradient is that of the sum (the loss is the same function of the sums on
    every rank), times grad_scale; no collective."""

    @staticmethod
    def forward(ctx, t, group, grad_scale):
        ctx.grad_scale = grad_scale
        return all_reduce(t, "sum", group)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.grad_scale, None, None


def sum_over_ranks(t: torch.Tensor, group=None, grad_scale: float = 1.0) -> torch.Tensor:
    """sum_r t_r over the group (all_reduce, tagged COMBINING), autograd-aware: t's gradient
    is the sum's gradient times grad_scale. A loss built from such sums has, on rank r, the
    gradient of rank r's partials only; the gradients of inputs that several ranks share
    (an all_gather_rows) are then summed onto their owners by that gather's backward."""
    return _SumOverRanks.apply(t, group, float(grad_scale))


def fingerprint(*values) -> int:
    """A 32-bit digest of plain values (their repr), to compare options across ranks."""
    return zlib.crc32(repr(values).encode())


def tensor_summary(name: str, t: Optional[torch.Tensor]) -> Dict[str, int]:
    """Integers that differ, in practice always, when two ranks hold different tensors `t`:
    size (-1 for None), a weighted checksum of the exact bits (int64, wrapping) and min / max.
    The keys are the same whatever t is, so that every rank's table row has the same shape."""
    keys = [f"{name}.{part}" for part in ("size", "sum", "min", "max")]
    if t is None or t.numel() == 0:
        return dict(zip(keys, (-1 if t is None else 0, 0, 0, 0)))
    flat = t.detach().reshape(-1)
    if flat.dtype.is_floating_point:
        flat = flat.double().view(torch.int64)
    flat = flat.long()
    weights = torch.arange(1, flat.numel() + 1, dtype=torch.int64, device=flat.device)
    return dict(zip(keys, (flat.numel(), int((flat * weights).sum()), int(flat.min()),
                           int(flat.max()))))


def bad_target(target: torch.Tensor, num_classes: int, ignore_index: int) -> Dict[str, int]:
    """{bad_row, bad_value}: the first row whose target is outside [0, num_classes) and is not
    ignore_index (bad_row = -1 when there is none)."""
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if target.numel() == 0 or not bool(bad.any()):
        return {"bad_row": -1, "bad_value": 0}
    row = int(bad.nonzero()[0, 0])
    return {"bad_row": row, "bad_value": int(target[row])}


def _ranks_text(ranks: Sequence[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def disagreements(table: List[Dict[str, int]], keys: Sequence[str]) -> List[str]:
    """The keys whose values are not the same on every rank: a plain key as
    'name (rank 0: v; ranks 1, 2: w)', a digest 'name.part' as 'name (differs: rank 0 vs
    ranks 1, 2)'."""
    found = {}
    for key in keys:
        values = [row[key] for row in table]
        if len(set(values)) > 1:
            name = key.split(".")[0]
            groups = {}
            for rank, v in enumerate(values):
                groups.setdefault(v, []).append(rank)
            detail = "; ".join(f"{_ranks_text(rs)}: {v}" for v, rs in groups.items())
            found.setdefault(name, detail if "." not in key else
                             "differs: " + " vs ".join(_ranks_text(rs) for rs in groups.values()))
    return [f"{name} ({detail})" for name, detail in found.items()]


def tiling_errors(table: List[Dict[str, int]], num_classes: int) -> List[str]:
    """Why the shards (class_start, num_local) of the table do not tile [0, num_classes)."""
    pairs = [(row["class_start"], row["num_local"]) for row in table]
    listing = ", ".join(f"rank {r}: [{s}, {s + n})" for r, (s, n) in enumerate(pairs))
    bad = [r for r, (s, n) in enumerate(pairs) if s < 0 or n < 0 or s + n > num_classes]
    if bad:
        return [f"the shard of {_ranks_text(bad)} leaves [0, {num_classes}); shards must tile "
                f"[0, {num_classes}) ({listing})"]
    covered = 0
    for rank, (start, count) in sorted(((r, p) for r, p in enumerate(pairs) if p[1] > 0),
                                       key=lambda item: item[1][0]):
        if start != covered:
            what = "overlaps the classes before it" if start < covered else \
                f"leaves classes [{covered}, {start}) to no rank"
            return [f"the shard of rank {rank} {what}; shards must tile [0, {num_classes}) "
                    f"({listing})"]
        covered = start + count
    if covered != num_classes:
        return [f"classes [{covered}, {num_classes}) belong to no rank; shards must tile "
                f"[0, {num_classes}) ({listing})"]
    return []


def raise_shard_errors(fn: str, table: List[Dict[str, int]], agreed: Sequence[str]) -> None:
    """Raise, identically on every rank, the errors the table shows: a target outside
    [0, num_classes), num_classes or any key of `agreed` differing across ranks, shards that
    do not tile [0, num_classes)."""
    problems = []
    for rank, row in enumerate(table):
        if row["bad_row"] >= 0:
            problems.append(f"on rank {rank}, target[{row['bad_row']}] = {row['bad_value']} is "
                            f"outside [0, {row['num_classes']}) and is not ignore_index")
    differing = disagreements(table, ["num_classes", *agreed])
    if differing:
        problems.append("these must be the same on every rank but are not: " + ", ".join(differing))
    elif table[0]["num_classes"] < 1:
        problems.append(f"num_classes must be >= 1, got {table[0]['num_classes']}")
    else:
        problems += tiling_errors(table, table[0]["num_classes"])
    if problems:
        raise ValueError(f"{fn}: " + "; ".join(problems))


# --- all-gather of rows ---------------------------------------------------------------------

def gather_counts(local: Sequence[int], group=None, device=None) -> torch.Tensor:
    """[W, K] int64: every rank's `local` integers (e.g. its batch size), in rank order."""
    world, _ = world_and_rank(group)
    mine = torch.tensor(list(local), dtype=torch.int64, device=device)
    if not initialized():
        return mine[None]
    out = [torch.empty_like(mine) for _ in range(world)]
    with traffic(ERROR_AGREEMENT):
        dist.all_gather(out, mine, group=group)
    return torch.stack(out)


class _AllGatherRows(torch.autograd.Function):
    """Rows of every rank concatenated in rank order. Backward: the gathered tensor's gradient
    differs per rank (each rank used it for its own shard), so rank r's rows get the sum over
    ranks of their gradient (reduce_scatter_rows: rank r receives the sum of its rows only),
    times grad_scale. Forward's traffic is tagged `kind`, backward's EMBEDDING_GRAD."""

    @staticmethod
    def forward(ctx, x, sizes, group, grad_scale, kind):
        ctx.sizes, ctx.group, ctx.grad_scale = sizes, group, grad_scale
        if not initialized():
            return x.clone()
        longest = max(sizes)
        padded = x.new_zeros((longest, *x.shape[1:]))
        padded[: x.shape[0]] = x
        pieces = [torch.empty_like(padded) for _ in sizes]
        with traffic(kind):
            dist.all_gather(pieces, padded.contiguous(), group=group)
        return torch.cat([p[:n] for p, n in zip(pieces, sizes)])

    @staticmethod
    def backward(ctx, grad):
        mine = reduce_scatter_rows(grad, ctx.sizes, ctx.group)
        if ctx.grad_scale != 1.0:
            mine = mine * ctx.grad_scale
        return mine, None, None, None, None


def all_gather_rows(x: torch.Tensor, sizes: Sequence[int], group=None,
                    grad_scale: float = 1.0, kind: Optional[str] = None) -> torch.Tensor:
    """Every rank's x [n_r, ...] concatenated in rank order ([sum n_r, ...]); `sizes` are the
    n_r of every rank (from gather_counts). gloo's all_gather needs equal shapes, so each rank
    pads to max n_r and the padding is dropped. Autograd-aware: x's gradient is the sum over
    ranks of the gradient of its rows, times grad_scale (reduce_scatter_rows). Traffic: W *
    max(n_r) rows in forward, and as many in backward. `kind` tags the forward's traffic
    (None: EMBEDDING_ALL_GATHER for floating-point rows, LABEL_ALL_GATHER for integer ones)."""
    if kind is None:
        kind = EMBEDDING_ALL_GATHER if x.is_floating_point() else LABEL_ALL_GATHER
    return _AllGatherRows.apply(x, [int(n) for n in sizes], group, float(grad_scale), kind)


def reduce_scatter_rows(rows: torch.Tensor, sizes: Sequence[int], group=None,
                        kind: str = EMBEDDING_GRAD) -> torch.Tensor:
    """This rank's block of the sum over ranks of `rows` [sum n_r, ...], which holds the n_r
    rows of every rank in rank order (`sizes`): rank r gets [n_r, ...] and receives no other
    rank's sum. The collective needs equal blocks, so each block is padded to max n_r rows.
    Traffic per rank: (W - 1) / W of the W * max(n_r) padded rows, half of what an all_reduce
    of the rows sends (2 (W - 1) / W of them) when the blocks are even; tagged `kind`."""
    world, rank = world_and_rank(group)
    if not initialized():
        return rows
    return _sum_of_block(_padded_blocks(rows, sizes), world, group, kind)[: sizes[rank]]


def _padded_blocks(rows: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """rows [sum n_r, ...] as [W * max n_r, ...]: block r holds rank r's rows, then zeros."""
    longest = max(sizes)
    if all(n == longest for n in sizes):
        return rows.contiguous()
    padded = rows.new_zeros((len(sizes) * longest, *rows.shape[1:]))
    for r, block in enumerate(rows.split(list(sizes))):
        padded[r * longest: r * longest + block.shape[0]] = block
    return padded


def _sum_of_block(padded: torch.Tensor, world: int, group, kind: str) -> torch.Tensor:
    """Block `rank` of the sum over ranks of padded [W * n, ...]: a reduce-scatter. gloo's
    reduce_scatter runs a whole all_reduce underneath (the same bytes on the wire, measured
    on torch 2.13), so on gloo the ranks swap blocks (all_to_all) and each sums the W blocks
    it received, which sends the traffic of a ring reduce-scatter."""
    if dist.get_backend(group) == "gloo":
        return exchange_and_sum(padded, world, group, kind)
    return reduce_scatter(padded, world, group, kind)


def reduce_scatter(padded: torch.Tensor, world: int, group=None,
                   kind: str = EMBEDDING_GRAD) -> torch.Tensor:
    """Block `rank` ([n, ...]) of the sum over ranks of padded [W * n, ...], by the backend's
    reduce-scatter (reduce_scatter_single where torch has it, reduce_scatter_tensor before);
    tagged `kind`."""
    out = padded.new_empty((padded.shape[0] // world, *padded.shape[1:]))
    collective = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    with traffic(kind):
        collective(out, padded, group=group)
    return out


def exchange_and_sum(padded: torch.Tensor, world: int, group=None,
                     kind: str = EMBEDDING_GRAD) -> torch.Tensor:
    """reduce_scatter's result from an all_to_all of the W blocks and a sum of those received
    (in rank order, so the same on every run); tagged `kind`."""
    received = torch.empty_like(padded)
    with traffic(kind):
        dist.all_to_all_single(received, padded, group=group)
    return received.view(world, padded.shape[0] // world, *padded.shape[1:]).sum(0)


# --- resharding -----------------------------------------------------------------------------

def reshard_state_dicts(state_dicts: Sequence[dict], new_world_size: int) -> List[dict]:
    """The state dicts of a fusedloss.nn.PartialFC saved at one world size, one per rank in any
    order, turned into `new_world_size` state dicts (index = new rank) for the same head at
    the new world size. Each holds `weight` (the rank's rows) and `class_range`
    (class_start, num_local, num_classes), as PartialFC.state_dict() does; pass the head's own
    state dicts (strip a parent module's prefix first). Optimizer state is not resharded."""
    if new_world_size < 1:
        raise ValueError(f"reshard_state_dicts: new_world_size must be >= 1, got {new_world_size}")
    ranges = [tuple(int(v) for v in sd["class_range"]) for sd in state_dicts]
    num_classes = {c for _, _, c in ranges}
    if len(num_classes) != 1:
        raise ValueError(f"reshard_state_dicts: the state dicts disagree on num_classes: {ranges}")
    num_classes = num_classes.pop()
    table = [dict(class_start=s, num_local=n) for s, n, _ in ranges]
    problems = tiling_errors(table, num_classes)
    if problems:
        raise ValueError("reshard_state_dicts: " + problems[0])
    order = sorted(range(len(ranges)), key=lambda i: ranges[i][0])
    weight = torch.cat([state_dicts[i]["weight"] for i in order])
    out = []
    for rank in range(new_world_size):
        start, count = shard_range(num_classes, new_world_size, rank)
        out.append({"weight": weight[start: start + count].clone(),
                    "class_range": torch.tensor([start, count, num_classes], dtype=torch.int64)})
    return out
