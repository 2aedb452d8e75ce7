"""nn.Module wrappers of the fusedloss ops, with named margin presets."""
import math

import torch

from .margin import margin_cross_entropy
from .margin_linear import linear_margin_cross_entropy
from .spherical import spherical_z_loss
from .spherical_factored import FactoredSphericalLinear  # noqa: F401  (a module of this namespace)
from .spherical_linear import linear_spherical_z_loss

# Margin presets: the defaults of the papers and of insightface's training configs. Any
# keyword given to a module overrides its preset; margin_grad is "exact" unless given.
PRESETS = {
    # ArcFace, Deng et al., CVPR 2019; insightface's arcface configs: s = 64, m = 0.5.
    "arcface": dict(scale=64.0, m2=0.5),
    # CosFace, Wang et al., CVPR 2018 (s = 64); insightface's cosface configs use m = 0.4.
    "cosface": dict(scale=64.0, m3=0.4),
    # insightface's combined margin loss (m1, m2, m3) = (1.0, 0.3, 0.2).
    "combined": dict(scale=64.0, m1=1.0, m2=0.3, m3=0.2),
    # ElasticFace, Boutros et al., CVPRW 2022: margins drawn from N(m, sigma) per sample;
    # the "+" variants deal them by target cosine. Values from the paper's released configs.
    "elastic_arcface": dict(scale=64.0, m2=0.5, m2_std=0.05),
    "elastic_arcface_plus": dict(scale=64.0, m2=0.5, m2_std=0.0175, elastic_plus=True),
    "elastic_cosface": dict(scale=64.0, m3=0.35, m3_std=0.05),
    "elastic_cosface_plus": dict(scale=64.0, m3=0.35, m3_std=0.02, elastic_plus=True),
}


def preset(loss: str, **overrides) -> dict:
    """The keyword arguments of preset `loss`, with `overrides` taking precedence."""
    if loss not in PRESETS:
        raise ValueError(f"unknown loss preset {loss!r}; expected one of {tuple(PRESETS)}")
    return {**PRESETS[loss], **overrides}


class MarginCrossEntropy(torch.nn.Module):
    """Margin softmax cross-entropy on cosine logits: ``forward(cos, target)``.

    A drop-in for insightface's ``CombinedMarginLoss`` followed by cross-entropy. ``loss``
    names a preset (see ``PRESETS``: arcface, cosface, combined, elastic_arcface,
    elastic_arcface_plus, elastic_cosface, elastic_cosface_plus); every keyword of
    :func:`fusedloss.margin_cross_entropy` given here overrides the preset.
    """

    def __init__(self, loss: str = "arcface", **kwargs):
        super().__init__()
        self.loss = loss
        self.kwargs = preset(loss, **kwargs)

    def forward(self, cos: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return margin_cross_entropy(cos, target, **self.kwargs)

    def extra_repr(self) -> str:
        return f"loss={self.loss!r}, " + ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())


class MarginSoftmaxHead(torch.nn.Module):
    """A classifier head that never forms the logits: ``forward(embeddings, target)`` returns
    the margin softmax loss of ``normalize(embeddings) @ normalize(weight).T`` through
    :func:`fusedloss.linear_margin_cross_entropy`.

    Holds one parameter, ``weight`` [num_classes, embedding_dim], initialised from
    ``normal(0, 0.01)`` as insightface's partial_fc does. ``loss`` names a preset (see
    ``PRESETS``); keywords of :func:`fusedloss.linear_margin_cross_entropy` given here
    (``scale``, margins, ``normalize``, ``block_size``, ``backend``, ...) override it.
    """

    def __init__(self, embedding_dim: int, num_classes: int, loss: str = "arcface", *,
                 device=None, dtype=None, **kwargs):
        super().__init__()
        if embedding_dim < 1 or num_classes < 1:
            raise ValueError(f"MarginSoftmaxHead: embedding_dim and num_classes must be >= 1, "
                             f"got {embedding_dim} and {num_classes}")
        self.loss = loss
        self.kwargs = preset(loss, **kwargs)
        self.weight = torch.nn.Parameter(
            torch.empty(num_classes, embedding_dim, device=device, dtype=dtype).normal_(0, 0.01))

    def forward(self, embeddings: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return linear_margin_cross_entropy(embeddings, self.weight, target, **self.kwargs)

    def extra_repr(self) -> str:
        c, d = self.weight.shape
        return f"embedding_dim={d}, num_classes={c}, loss={self.loss!r}"


from . import distributed as _fdist  # noqa: E402  (PartialFC's process-group helpers)
from .sharded import _linear_sharded, _options as _sharded_options  # noqa: E402


class PartialFC(torch.nn.Module):
    """A margin softmax head whose classes are split across the ranks of a process group,
    with PartialFC's sampling of negative classes (An et al., ICCVW 2021 / CVPR 2022):
    ``forward(local_embeddings, local_labels)`` returns, on every rank, the loss of the
    whole batch (all ranks' rows) over all classes, through
    :func:`fusedloss.linear_sharded_margin_cross_entropy`.

    Rank r of W (of ``group``; None: the default group, or this process alone when
    torch.distributed is not initialised) holds exactly one parameter, ``weight``
    ``[C_r, embedding_dim]`` (``normal(0, 0.01)``, as MarginSoftmaxHead), the rows of classes
    ``[class_start, class_start + C_r)`` with ``class_start = r * (C // W) + min(r, C % W)`` and
    ``C_r = C // W + (r < C % W)``; the ``class_range`` buffer (class_start, C_r, C) records
    them in the state dict, and :meth:`reshard_state_dicts` turns the state dicts saved at
    one world size into those of another. ``loss`` names a preset of ``fusedloss.nn.PRESETS``
    (not the elastic "+" ones); keywords of linear_sharded_margin_cross_entropy override it
    (``margin_grad`` is "exact" unless given; ``generator`` draws ElasticFace margins and
    must be seeded alike on every rank).

    forward all-gathers the embeddings and labels (ranks may hold different batch sizes; the
    gather is padded to the largest), then each rank does its shard's fused work and two
    all_reduces of O(N) floats combine the rows. The all-gather is autograd-aware: each rank
    gets the gradient of its own embeddings, summed over the shards by one reduce-scatter of
    the gathered N x D gradient (padded to W equal blocks), in which a rank receives only the
    sum of its own rows: (W - 1) / W of the N x D on each rank's wire, half of an all_reduce's
    2 (W - 1) / W (on gloo, whose reduce_scatter is an all_reduce underneath, an all_to_all of
    the blocks and a local sum does it). With
    ``ddp_grad_scale=True`` (the default, insightface's convention) that gradient is the exact
    derivative of the loss times W, so that DistributedDataParallel's averaging of the
    backbone's gradients over the W ranks gives the exact gradient of the global loss;
    ``ddp_grad_scale=False`` returns the exact derivative. The head's own weight gets the
    exact gradient of its rows and must stay out of DDP (it is not replicated)::

        torch.distributed.init_process_group("nccl")  # or "gloo"; launched by torchrun
        backbone = DistributedDataParallel(backbone.cuda())  # replicated, averaged
        head = fusedloss.nn.PartialFC(512, 10_000_000, sample_rate=0.1).cuda()  # sharded
        opt = torch.optim.SGD([*backbone.parameters(), *head.parameters()], lr=0.1)
        loss = head(backbone(images), labels)  # this rank's images and labels
        loss.backward(); opt.step(); opt.zero_grad()

    With ``sample_rate < 1`` every rank keeps the classes of its shard present in the
    gathered batch (the positives) and fills up to ``int(sample_rate * C_r)`` classes with
    negatives drawn uniformly without replacement (all positives when they alone are more);
    the loss is the margin softmax over the union of the sampled classes, and only the
    sampled rows of ``weight`` get gradient (the others exact zeros). ``sampled_classes``
    holds the global ids of this rank's sampled classes of the last forward (positives
    first). ``sample_generator`` draws the negatives; it need not be seeded alike on every
    rank: each rank samples among its own classes only, and every rank derives the layout
    of the sampled class space (each rank's count, and where each label lands) from the
    gathered labels alone, which are the same everywhere, whatever negatives were drawn.
    """

    def __init__(self, embedding_dim: int, num_classes: int, sample_rate: float = 1.0,
                 loss: str = "arcface", group=None, ddp_grad_scale: bool = True, *,
                 sample_generator=None, device=None, dtype=None, **kwargs):
        super().__init__()
        if embedding_dim < 1 or num_classes < 1:
            raise ValueError(f"PartialFC: embedding_dim and num_classes must be >= 1, got "
                             f"{embedding_dim} and {num_classes}")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"PartialFC: sample_rate must lie in (0, 1], got {sample_rate}")
        self.loss, self.group, self.sample_rate = loss, group, float(sample_rate)
        self.ddp_grad_scale, self.sample_generator = bool(ddp_grad_scale), sample_generator
        self.kwargs = preset(loss, **kwargs)
        call = {k: self.kwargs.pop(k) for k in ("normalize", "block_size", "backend", "generator")
                if k in self.kwargs}
        self.call_kwargs = {"normalize": True, "block_size": 0, "backend": "auto",
                            "generator": None, **call}
        self.opts = _sharded_options("PartialFC", self.kwargs)
        self.world_size, self.rank = _fdist.world_and_rank(group)
        start, count = _fdist.shard_range(num_classes, self.world_size, self.rank)
        self.weight = torch.nn.Parameter(
            torch.empty(count, embedding_dim, device=device, dtype=dtype).normal_(0, 0.01))
        self.register_buffer("class_range", torch.tensor([start, count, num_classes],
                                                         dtype=torch.int64, device=device))
        self.sampled_classes = None

    @property
    def class_start(self) -> int:
        return int(self.class_range[0])

    @property
    def num_classes(self) -> int:
        return int(self.class_range[2])

    reshard_state_dicts = staticmethod(_fdist.reshard_state_dicts)

    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        sizes = self._gather_sizes(local_embeddings, local_labels)
        scale = self.world_size if self.ddp_grad_scale else 1.0
        embeddings = _fdist.all_gather_rows(local_embeddings, sizes, self.group, grad_scale=scale)
        labels = _fdist.all_gather_rows(local_labels.long(), sizes, self.group)
        self._check_labels(labels, sizes)
        if self.sample_rate < 1.0:
            weight, labels, class_start, num_classes = self._sample(labels)
        else:
            weight, class_start, num_classes = self.weight, self.class_start, self.num_classes
            self.sampled_classes = None
        return _linear_sharded("PartialFC", embeddings, weight, labels, self.kwargs,
                               class_start=class_start, num_classes=num_classes, group=self.group,
                               reduce_embedding_grad=False, **self.call_kwargs)

    def _gather_sizes(self, x, labels):
        """Every rank's batch size, after every rank has checked every rank's inputs (one
        all_gather of three ints), so that a bad input raises everywhere, never hangs."""
        dim = self.weight.shape[1]
        ok_x = (torch.is_tensor(x) and x.dim() == 2 and x.dtype == self.weight.dtype
                and x.shape[1] == dim)
        ok_y = (ok_x and torch.is_tensor(labels) and labels.dim() == 1
                and not labels.dtype.is_floating_point and labels.shape[0] == x.shape[0])
        n = x.shape[0] if ok_x else 0
        device = x.device if torch.is_tensor(x) else self.weight.device
        table = _fdist.gather_counts([n, int(ok_x), int(ok_y)], self.group, device).tolist()
        bad_x = [r for r, row in enumerate(table) if not row[1]]
        bad_y = [r for r, row in enumerate(table) if row[1] and not row[2]]
        problems = []
        if bad_x:
            problems.append(f"local_embeddings on rank(s) {bad_x} are not [n, {dim}] tensors of "
                            f"dtype {self.weight.dtype}")
        if bad_y:
            problems.append(f"local_labels on rank(s) {bad_y} are not integer tensors of shape [n] "
                            "matching local_embeddings")
        if problems:
            raise ValueError("PartialFC: " + "; ".join(problems))
        return [row[0] for row in table]

    def _check_labels(self, labels, sizes):
        """A gathered label outside [0, C) that is not ignore_index raises on every rank (they
        all hold the same gathered labels), naming the rank and row it came from."""
        bad = _fdist.bad_target(labels, self.num_classes, self.opts.ignore_index)
        if bad["bad_row"] < 0:
            return
        row, rank = bad["bad_row"], 0
        while row >= sizes[rank]:
            row, rank = row - sizes[rank], rank + 1
        raise ValueError(f"PartialFC: on rank {rank}, local_labels[{row}] = {bad['bad_value']} is "
                         f"outside [0, {self.num_classes}) and is not ignore_index")

    def _sample(self, labels):
        """(the sampled rows of weight, labels remapped to the sampled class space, this
        rank's class_start and the total number of classes in that space).

        Rank q keeps count_q = max(P_q, int(sample_rate * C_q)) classes, P_q its positives,
        positives first in ascending order, so every rank can tell from the gathered labels
        alone where label y of rank q lands: sub_start_q + (rank of y among q's positives)."""
        num_classes, world = self.num_classes, self.world_size
        starts = torch.tensor(_fdist.shard_starts(num_classes, world), device=labels.device)
        valid = labels != self.opts.ignore_index
        positives = torch.unique(labels[valid])  # sorted
        first = torch.searchsorted(positives, starts).tolist()  # first positive of each shard
        shard_sizes = (starts[1:] - starts[:-1]).tolist()
        counts = [max(first[q + 1] - first[q], int(self.sample_rate * shard_sizes[q]))
                  for q in range(world)]
        if sum(counts) == 0:  # no positive and nothing sampled: keep one class, so C >= 1
            counts[0] = 1
        sub_starts = [sum(counts[:q]) for q in range(world + 1)]
        index = self._sampled_rows(positives[first[self.rank]: first[self.rank + 1]],
                                   counts[self.rank])
        self.sampled_classes = index + self.class_start
        owner = torch.searchsorted(starts, labels, right=True) - 1
        owner = owner.clamp(0, world - 1)
        first_of_owner = torch.tensor(first, device=labels.device)[owner]
        place = torch.searchsorted(positives, labels) - first_of_owner
        remapped = torch.tensor(sub_starts, device=labels.device)[owner] + place
        remapped = torch.where(valid, remapped, labels)
        return self.weight[index], remapped, sub_starts[self.rank], sub_starts[world]

    def _sampled_rows(self, positives, count):
        """Local row indices: this shard's positives (ascending), then count - P negatives
        drawn uniformly without replacement from the other rows."""
        local = positives - self.class_start
        extra = count - local.numel()
        if extra <= 0:
            return local
        scores = torch.rand(self.weight.shape[0], generator=self.sample_generator,
                            device=self.weight.device)
        scores[local] = 2.0  # above every draw: never picked as a negative
        negatives = scores.topk(extra, largest=False).indices
        return torch.cat([local, negatives])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        saved = state_dict.get(prefix + "class_range")
        if saved is not None and saved.tolist() != self.class_range.tolist():
            error_msgs.append(
                f"PartialFC: the saved shard (class_start, C_r, C) = {tuple(saved.tolist())} is "
                f"not this rank's {tuple(self.class_range.tolist())}; reshard the saved state "
                "dicts with PartialFC.reshard_state_dicts(state_dicts, world_size)")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        start, count, total = self.class_range.tolist()
        return (f"embedding_dim={self.weight.shape[1]}, num_classes={total}, "
                f"classes=[{start}, {start + count}), sample_rate={self.sample_rate}, "
                f"loss={self.loss!r}")


class SphericalZLoss(torch.nn.Module):
    """The spherical Z-loss on logits, ``forward(logits, target)``: see
    :func:`fusedloss.spherical_z_loss` (a, b, ignore_index, reduction, backend)."""

    def __init__(self, a: float = 1.0, b: float = 0.0, **kwargs):
        super().__init__()
        self.kwargs = dict(a=a, b=b, **kwargs)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return spherical_z_loss(logits, target, **self.kwargs)


class SphericalLinear(torch.nn.Module):
    """An output layer ``o = hidden @ weight.T + bias`` trained with the spherical Z-loss
    without forming ``o``: ``forward(hidden, target)`` returns the loss through
    :func:`fusedloss.linear_spherical_z_loss`, at a cost independent of N x C.

    ``weight [num_classes, in_features]`` and ``bias [num_classes]`` are initialised as
    ``torch.nn.Linear`` initialises them. ``logits(hidden)`` forms the outputs (for
    evaluation); ``topk(hidden, k)`` finds the k best classes per row a block of classes at a
    time, never holding all N x C outputs.
    """

    def __init__(self, in_features: int, num_classes: int, bias: bool = True, a: float = 1.0,
                 b: float = 0.0, *, device=None, dtype=None, **kwargs):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(num_classes, in_features, device=device, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.empty(num_classes, device=device, dtype=dtype)) if bias else None
        self.kwargs = dict(a=a, b=b, **kwargs)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        torch.nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.weight.shape[1])
            torch.nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return linear_spherical_z_loss(hidden, self.weight, target, self.bias, **self.kwargs)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(hidden, self.weight, self.bias)

    @torch.no_grad()
    def topk(self, hidden: torch.Tensor, k: int, block: int = 65536):
        """(values, indices) of the k largest outputs per row, computed `block` classes at a
        time: memory O(N (k + block)), not O(N C)."""
        num_classes = self.weight.shape[0]
        if not 1 <= k <= num_classes:
            raise ValueError(f"SphericalLinear.topk: k must lie in [1, {num_classes}], got {k}")
        best_values = best_indices = None
        for start in range(0, num_classes, block):
            stop = min(start + block, num_classes)
            bias = None if self.bias is None else self.bias[start:stop]
            out = torch.nn.functional.linear(hidden, self.weight[start:stop], bias)
            values, indices = out.topk(min(k, stop - start), dim=1)
            indices += start
            if best_values is not None:
                values = torch.cat([best_values, values], dim=1)
                indices = torch.cat([best_indices, indices], dim=1)
                values, pick = values.topk(min(k, values.shape[1]), dim=1)
                indices = indices.gather(1, pick)
            best_values, best_indices = values, indices
        return best_values, best_indices

    def extra_repr(self) -> str:
        c, d = self.weight.shape
        return f"in_features={d}, num_classes={c}, bias={self.bias is not None}, " + \
            ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())


import inspect as _inspect  # noqa: E402

from . import pairs as _pairs  # noqa: E402  (CrossBatchMemory's losses)


class CrossBatchMemory(torch.nn.Module):
    """A memory bank of past embeddings for the pair losses (Wang et al., "Cross-Batch Memory
    for Embedding Learning", CVPR 2020), as PML's ``CrossBatchMemory`` wrapping the loss and,
    for "multi_similarity" and "batch_hard_triplet", its miner.

    Holds a ring buffer of ``memory_size`` detached embeddings and their labels (registered
    buffers ``embedding_memory [memory_size, embedding_dim]`` and ``label_memory``; the write
    position and whether the ring has wrapped travel in the state dict). ``forward(embeddings,
    labels)`` first enqueues the batch (``len(embeddings) <= memory_size``), then returns the
    loss of the batch against the memory: its filled part until it has wrapped once, all of it
    after. A query is never paired with its own slot; as in PML, mining still sees that slot
    and only the loss drops it (for batch-hard, an anchor whose hardest positive is its own
    slot drops out). The gradient reaches the batch as queries only; the bank is detached.

    ``loss``: "multi_similarity" (:func:`fusedloss.multi_similarity_loss`, mining on by
    default), "supcon", "contrastive" or "batch_hard_triplet"; ``loss_args`` are that
    function's keywords (``alpha``, ``epsilon``, ``mining``, ``temperature``, ``distance``,
    ``normalize``, ``backend``, ...).
    """

    LOSSES = {
        "multi_similarity": _pairs.multi_similarity_loss,
        "supcon": _pairs.supcon_loss,
        "contrastive": _pairs.contrastive_loss,
        "batch_hard_triplet": _pairs.batch_hard_triplet_loss,
    }

    def __init__(self, embedding_dim: int, memory_size: int, loss: str = "multi_similarity", *,
                 device=None, dtype=None, **loss_args):
        super().__init__()
        if loss not in self.LOSSES:
            raise ValueError(f"CrossBatchMemory: unknown loss {loss!r}; expected one of "
                             f"{tuple(self.LOSSES)}")
        if embedding_dim < 1 or memory_size < 1:
            raise ValueError(f"CrossBatchMemory: embedding_dim and memory_size must be >= 1, got "
                             f"{embedding_dim} and {memory_size}")
        accepted = set(_inspect.signature(self.LOSSES[loss]).parameters)
        unknown = sorted(k for k in loss_args if k not in accepted or k.startswith("_")
                         or k in ("embeddings", "labels", "ref_embeddings", "ref_labels"))
        if unknown:
            raise TypeError(f"CrossBatchMemory: {loss} takes no keyword(s) {unknown}")
        self.loss = loss
        self.loss_args = loss_args
        self.memory_size = memory_size
        self.register_buffer("embedding_memory",
                             torch.zeros(memory_size, embedding_dim, device=device, dtype=dtype))
        self.register_buffer("label_memory",
                             torch.zeros(memory_size, dtype=torch.long, device=device))
        self.queue_idx = 0
        self.has_been_filled = False

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_memory.shape[1]:
            raise ValueError(f"CrossBatchMemory: embeddings must have shape [B, "
                             f"{self.embedding_memory.shape[1]}], got {tuple(embeddings.shape)}")
        if embeddings.shape[0] > self.memory_size:
            raise ValueError(f"CrossBatchMemory: a batch of {embeddings.shape[0]} does not fit in "
                             f"a memory of {self.memory_size}")
        start = self.enqueue(embeddings, labels)
        filled = self.memory_size if self.has_been_filled else self.queue_idx
        return self.LOSSES[self.loss](embeddings, labels, self.embedding_memory[:filled],
                                      self.label_memory[:filled], _self_offset=start,
                                      **self.loss_args)

    @torch.no_grad()
    def enqueue(self, embeddings: torch.Tensor, labels: torch.Tensor) -> int:
        """Write the batch at the ring's position; returns the slot of its first row."""
        if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
            raise ValueError(f"CrossBatchMemory: labels must have shape [{embeddings.shape[0]}], "
                             f"got {tuple(labels.shape)}")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError(f"CrossBatchMemory: labels must hold integer class labels, got "
                            f"{labels.dtype}")
        if self.embedding_memory.dtype != embeddings.dtype or \
                self.embedding_memory.device != embeddings.device:
            self.embedding_memory = self.embedding_memory.to(embeddings.device, embeddings.dtype)
            self.label_memory = self.label_memory.to(embeddings.device)
        start, size = self.queue_idx, embeddings.shape[0]
        slots = torch.arange(start, start + size, device=embeddings.device) % self.memory_size
        self.embedding_memory[slots] = embeddings.detach()
        self.label_memory[slots] = labels.to(torch.long)
        self.queue_idx = (start + size) % self.memory_size
        self.has_been_filled = self.has_been_filled or self.queue_idx <= start
        return start

    def reset_queue(self) -> None:
        self.embedding_memory.zero_()
        self.label_memory.zero_()
        self.queue_idx = 0
        self.has_been_filled = False

    def get_extra_state(self):
        return {"queue_idx": self.queue_idx, "has_been_filled": self.has_been_filled}

    def set_extra_state(self, state) -> None:
        self.queue_idx = int(state["queue_idx"])
        self.has_been_filled = bool(state["has_been_filled"])

    def extra_repr(self) -> str:
        d = self.embedding_memory.shape[1]
        args = "".join(f", {k}={v!r}" for k, v in self.loss_args.items())
        return f"embedding_dim={d}, memory_size={self.memory_size}, loss={self.loss!r}{args}"
