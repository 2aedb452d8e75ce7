"""Drop-ins for insightface's arcface_torch: change two imports, keep the training script and
its checkpoints.

    from fusedloss.insightface import CombinedMarginLoss   # was: from losses import ...
    from fusedloss.insightface import PartialFC_V2         # was: from partial_fc_v2 import ...

    margin_loss = CombinedMarginLoss(64, *cfg.margin_list, cfg.interclass_filtering_threshold)
    module_partial_fc = PartialFC_V2(margin_loss, cfg.embedding_size, cfg.num_classes,
                                     cfg.sample_rate, cfg.fp16)
    loss = module_partial_fc(local_embeddings, local_labels)

What arcface_torch computes, and so what these compute by default. Per row, with
``cos = clamp(normalize(x) . normalize(w_j), -1, 1)`` and target y:

* ``m1 == 1, m3 == 0`` (ArcFace, ``margin_list`` (1.0, 0.5, 0.0)): target logit
  ``s cos(theta_y + m2)``, applied under ``no_grad``, so the gradient with respect to
  ``cos_y`` is that of ``s cos_y`` (our ``margin_grad="detached"``);
* ``m3 > 0`` (CosFace, ``margin_list`` (1.0, 0.0, 0.4)): target logit ``s (cos_y - m3)``.
  arcface_torch takes this branch whenever m3 > 0 and then ignores m1 and m2: a "combined"
  (1.0, 0.3, 0.2) trains CosFace with m3 = 0.2. So does this drop-in (with a warning); the
  true combination ``s (cos(theta + m2) - m3)`` is ``fusedloss.nn.PartialFC(loss="combined")``;
* any other (m1 != 1 with m3 == 0) raises there at the first step, here at construction;
* other logits ``s cos_j``; the loss is the cross-entropy averaged over the global batch.

Where they differ: past theta_y + m2 = pi, arcface_torch's plain ``cos(theta + m2)`` turns
back up (the target logit grows again as the sample moves away from its class); ours
continues it as ``-2 - cos(theta + m2)`` (``psi`` in fusedloss.margin_cross_entropy), which
keeps decreasing. The two agree wherever ``cos_y >= cos(pi - m2)`` (-0.878 for m2 = 0.5).
"""
import warnings

import torch

from .nn.sharded import PartialFC

__all__ = ["CombinedMarginLoss", "PartialFC_V2"]


class CombinedMarginLoss(torch.nn.Module):
    """insightface's margin configuration ``CombinedMarginLoss(s, m1, m2, m3,
    interclass_filtering_threshold=0)``, with its attributes (``s``, ``m1``, ``m2``, ``m3``,
    ``interclass_filtering_threshold``). The loss itself runs fused inside
    :class:`PartialFC_V2`, which never forms the logits this module would return; on
    logits, use ``fusedloss.margin_cross_entropy(cos, labels, **margin_loss.options())``.

    ``interclass_filtering_threshold`` (insightface's: in every row, a non-target cosine above
    it is set to 0 and gets no gradient; 0 disables it) is passed to the fused op.
    """

    def __init__(self, s, m1, m2, m3, interclass_filtering_threshold=0):
        super().__init__()
        self.s, self.m1, self.m2, self.m3 = float(s), float(m1), float(m2), float(m3)
        self.interclass_filtering_threshold = float(interclass_filtering_threshold)
        if not (self.m1 == 1.0 and self.m3 == 0.0) and not self.m3 > 0.0:
            raise ValueError(f"CombinedMarginLoss: arcface_torch supports ArcFace (m1 = 1, "
                             f"m3 = 0) and CosFace (m3 > 0), got (m1, m2, m3) = "
                             f"({self.m1}, {self.m2}, {self.m3}); for SphereFace (m1 != 1) use "
                             "fusedloss.nn.PartialFC with m1")
        if self.m3 > 0.0 and (self.m1 != 1.0 or self.m2 != 0.0):
            warnings.warn(f"CombinedMarginLoss: with m3 = {self.m3} > 0 arcface_torch trains "
                          f"CosFace and ignores m1 = {self.m1} and m2 = {self.m2}; so does this "
                          "drop-in. For the true combined margin use fusedloss.nn.PartialFC("
                          "loss='combined')", UserWarning, stacklevel=2)

    def options(self) -> dict:
        """The keywords of the fusedloss margin functions that compute arcface_torch's loss
        (margin_grad aside: see PartialFC_V2)."""
        margins = dict(m1=1.0, m2=self.m2, m3=0.0) if self.m3 == 0.0 else \
            dict(m1=1.0, m2=0.0, m3=self.m3)
        return dict(scale=self.s, **margins,
                    interclass_filtering_threshold=self.interclass_filtering_threshold)

    def forward(self, logits, labels):
        raise TypeError("fusedloss.insightface.CombinedMarginLoss is a configuration for "
                        "PartialFC_V2, which computes the loss fused without forming logits; "
                        "on logits use fusedloss.margin_cross_entropy(cos, labels, "
                        "**margin_loss.options(), margin_grad='detached')")

    def extra_repr(self) -> str:
        return (f"s={self.s}, m1={self.m1}, m2={self.m2}, m3={self.m3}, "
                f"interclass_filtering_threshold={self.interclass_filtering_threshold}")


class PartialFC_V2(PartialFC):
    """insightface's ``PartialFC_V2(margin_loss, embedding_size, num_classes, sample_rate=1.0,
    fp16=False)``, on :class:`fusedloss.nn.PartialFC`: ``forward(local_embeddings,
    local_labels)`` (labels ``[n]`` or ``[n, 1]``) returns the loss of the whole batch of all
    ranks, as insightface's does.

    The same class split (rank r holds classes from ``r * (C // W) + min(r, C % W)``, C // W
    of them plus one for the first C % W ranks), the same single parameter ``weight [C_r, D]``
    drawn from ``normal(0, 0.01)``, and a state dict holding ``weight`` only, so that
    arcface_torch's per-rank checkpoints (``softmax_fc_gpu_{rank}.pt``) load both ways at the
    same world size. As insightface's, the embedding gradient is the exact one times the
    world size (DDP then averages the backbone's gradients), and ``sample_rate < 1`` keeps
    every positive class of the global batch plus random negatives up to
    ``int(sample_rate * C_r)`` classes per rank (the draws differ from insightface's).

    ``margin_grad``: "detached" (default, arcface_torch's ``no_grad`` margin) or "exact".
    ``fp16`` is kept as an attribute: the fused kernels compute the cosines from the
    parameters' own dtype with fp32 accumulation, never in fp16 (arcface_torch rounds them
    to fp16 under autocast). Also ``group``, ``sample_generator``, ``backend`` and
    ``block_size`` of fusedloss.nn.PartialFC. Unlike insightface's, it runs without an
    initialised process group (as world size 1) and with batch sizes that vary by rank and
    step.
    """

    def __init__(self, margin_loss, embedding_size: int, num_classes: int,
                 sample_rate: float = 1.0, fp16: bool = False, *, margin_grad: str = "detached",
                 group=None, sample_generator=None, backend: str = "auto", block_size=None,
                 device=None, dtype=None):
        if not isinstance(margin_loss, CombinedMarginLoss):
            raise TypeError(f"PartialFC_V2: margin_loss must be a fusedloss.insightface."
                            f"CombinedMarginLoss, got {type(margin_loss).__name__}")
        super().__init__(embedding_size, num_classes, sample_rate, loss="arcface", group=group,
                         ddp_grad_scale=True, sample_generator=sample_generator, device=device,
                         dtype=dtype, margin_grad=margin_grad, backend=backend,
                         block_size=block_size, **margin_loss.options())
        self.margin_softmax = margin_loss
        self.embedding_size, self.fp16 = embedding_size, bool(fp16)
        # insightface's checkpoints hold `weight` only: the shard stays out of the state dict.
        self.register_buffer("class_range", self.class_range, persistent=False)

    @property
    def num_local(self) -> int:
        """insightface's name: the classes of this rank's shard."""
        return int(self.class_range[1])

    @property
    def num_sample(self) -> int:
        """insightface's name: the classes sampled per step on this rank, positives beyond
        it aside."""
        return int(self.sample_rate * self.num_local)

    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        if torch.is_tensor(local_labels) and local_labels.dim() == 2 and local_labels.shape[1] == 1:
            local_labels = local_labels.squeeze(1)
        return super().forward(local_embeddings, local_labels)

    def extra_repr(self) -> str:
        start, count, total = self.class_range.tolist()
        return (f"embedding_size={self.embedding_size}, num_classes={total}, "
                f"classes=[{start}, {start + count}), sample_rate={self.sample_rate}, "
                f"fp16={self.fp16}, margin_grad={self.opts.margin_grad!r}")

