"""nn.Module of the sharded family: PartialFC, a margin softmax head whose classes are split
across the ranks of a process group, with PartialFC's sampling of negative classes, through
fusedloss.linear_sharded_margin_cross_entropy's entry point."""
import torch

from .. import distributed as fdist
from ..multilabel import MAX_POSITIVES
from ..multilabel_sharded import linear_sharded as linear_sharded_multilabel
from ..sharded import check_options, linear_sharded
from .margin import multilabel_keywords, preset, split_keywords, unpg_options, unpg_repr


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
    must be seeded alike on every rank). Bad keywords raise here, as the function would
    raise them.

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

    ``unpg=True`` (UNPG, as :class:`fusedloss.nn.MarginSoftmaxHead`): every rank computes
    :func:`fusedloss.unpg_negatives` of the gathered batch (``unpg_whisker``; rows whose label
    is ``ignore_index`` left out), the same set on every rank from the same rows, and passes it
    as ``extra_negatives``, counted once in the combined partition function. Each rank's
    backward through it is the whole gradient of the pairs, so it enters the gathered
    embeddings' gradient scaled by 1 / W, and the reduce-scatter's sum over the ranks brings
    each rank's own rows exactly their gradient.

    ``multilabel=True`` (MLCD): ``local_labels [n, K]`` list each row's positive classes
    (``ignore_index`` pads; K the same on every rank, at most 64), and the loss is
    :func:`fusedloss.linear_sharded_multilabel_margin_cross_entropy` of the gathered batch,
    with the margin keywords that it takes (others, the elastic presets and ``unpg`` raise
    here). Sampling keeps every positive class of the gathered batch on its shard and draws
    negatives as above; at ``sample_rate=1`` the loss is that of
    ``MarginSoftmaxHead(multilabel=True)`` on the gathered batch.
    """

    CALL_KEYWORDS = ("normalize", "block_size", "backend", "generator")

    def __init__(self, embedding_dim: int, num_classes: int, sample_rate: float = 1.0,
                 loss: str = "arcface", group=None, ddp_grad_scale: bool = True, *,
                 sample_generator=None, unpg: bool = False, unpg_whisker: float = 1.5,
                 multilabel: bool = False, device=None, dtype=None, **kwargs):
        super().__init__()
        if embedding_dim < 1 or num_classes < 1:
            raise ValueError(f"PartialFC: embedding_dim and num_classes must be >= 1, got "
                             f"{embedding_dim} and {num_classes}")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"PartialFC: sample_rate must lie in (0, 1], got {sample_rate}")
        self.loss, self.group, self.sample_rate = loss, group, float(sample_rate)
        self.ddp_grad_scale, self.sample_generator = bool(ddp_grad_scale), sample_generator
        keywords = preset(loss, **kwargs)
        self.multilabel = multilabel_keywords("PartialFC", multilabel, keywords,
                                              ("normalize", "block_size", "backend"), unpg)
        self.opts, call = split_keywords("PartialFC", keywords, self.CALL_KEYWORDS)
        check_options("PartialFC", self.opts)
        self.kwargs = {k: v for k, v in keywords.items() if k not in call}  # the margin options
        self.call_kwargs = {"normalize": True, "block_size": None, "backend": "auto",
                            "generator": None, **call}
        self.unpg = unpg_options("PartialFC", unpg, unpg_whisker, self.opts.ignore_index,
                                 self.call_kwargs["normalize"])
        self.world_size, self.rank = fdist.world_and_rank(group)
        start, count = fdist.shard_range(num_classes, self.world_size, self.rank)
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

    reshard_state_dicts = staticmethod(fdist.reshard_state_dicts)

    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        sizes = self._gather_sizes(local_embeddings, local_labels)
        scale = self.world_size if self.ddp_grad_scale else 1.0
        embeddings = fdist.all_gather_rows(local_embeddings, sizes, self.group, grad_scale=scale)
        labels = fdist.all_gather_rows(local_labels.long(), sizes, self.group)
        self._check_labels(labels, sizes)
        extra = {}
        if self.unpg is not None:
            negatives = self.unpg.negatives(embeddings, labels)
            # the same pairs on every rank: each backpropagates 1 / W of their gradient
            extra["extra_negatives"] = (negatives.detach()
                                        + (negatives - negatives.detach()) / self.world_size)
        if self.sample_rate < 1.0:
            weight, labels, class_start, num_classes = self._sample(labels)
        else:
            weight, class_start, num_classes = self.weight, self.class_start, self.num_classes
            self.sampled_classes = None
        if self.multilabel:
            return linear_sharded_multilabel(
                "PartialFC", embeddings, weight, labels, class_start=class_start,
                num_classes=num_classes, group=self.group, reduce_embedding_grad=False,
                **{k: getattr(self.opts, k) for k in ("scale", "m1", "m2", "m3", "margin_grad",
                                                      "ignore_index", "reduction")},
                **{k: v for k, v in self.call_kwargs.items() if k != "generator"})
        return linear_sharded("PartialFC", embeddings, weight, labels, self.opts,
                              class_start=class_start, num_classes=num_classes, group=self.group,
                              reduce_embedding_grad=False, **self.call_kwargs, **extra)

    def _gather_sizes(self, x, labels):
        """Every rank's batch size, after every rank has checked every rank's inputs (one
        all_gather of three ints), so that a bad input raises everywhere, never hangs."""
        dim = self.weight.shape[1]
        ok_x = (torch.is_tensor(x) and x.dim() == 2 and x.dtype == self.weight.dtype
                and x.shape[1] == dim)
        rank = 2 if self.multilabel else 1
        ok_y = (ok_x and torch.is_tensor(labels) and labels.dim() == rank
                and not labels.dtype.is_floating_point and labels.dtype != torch.bool
                and labels.shape[0] == x.shape[0]
                and (rank == 1 or 1 <= labels.shape[1] <= MAX_POSITIVES))
        n = x.shape[0] if ok_x else 0
        k = labels.shape[1] if ok_y and rank == 2 else 0
        device = x.device if torch.is_tensor(x) else self.weight.device
        table = fdist.gather_counts([n, int(ok_x), int(ok_y), k], self.group, device).tolist()
        bad_x = [r for r, row in enumerate(table) if not row[1]]
        bad_y = [r for r, row in enumerate(table) if row[1] and not row[2]]
        if not bad_x and not bad_y and len({row[3] for row in table}) > 1:
            raise ValueError("PartialFC: local_labels must have the same K on every rank, got "
                             + ", ".join(f"rank {r}: {row[3]}" for r, row in enumerate(table)))
        problems = []
        if bad_x:
            problems.append(f"local_embeddings on rank(s) {bad_x} are not [n, {dim}] tensors of "
                            f"dtype {self.weight.dtype}")
        if bad_y:
            shape = f"[n, K] (1 <= K <= {MAX_POSITIVES})" if self.multilabel else "[n]"
            problems.append(f"local_labels on rank(s) {bad_y} are not integer tensors of shape "
                            f"{shape} matching local_embeddings")
        if problems:
            raise ValueError("PartialFC: " + "; ".join(problems))
        return [row[0] for row in table]

    def _check_labels(self, labels, sizes):
        """A gathered label outside [0, C) that is not ignore_index raises on every rank (they
        all hold the same gathered labels), naming the rank and row it came from."""
        bad = fdist.bad_target(labels.reshape(-1), self.num_classes, self.opts.ignore_index)
        if bad["bad_row"] < 0:
            return
        if labels.dim() == 2:  # a flat index of [N, K] labels: its row
            bad["bad_row"] //= labels.shape[1]
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
        starts = torch.tensor(fdist.shard_starts(num_classes, world), device=labels.device)
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
                f"loss={self.loss!r}" + unpg_repr(self.unpg))
