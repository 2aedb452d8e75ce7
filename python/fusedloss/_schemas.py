"""Every op schema of fusedloss, in one place: the `fusedloss` library and its contracts.

The schemas are defined here, in Python, before fusedloss._C is loaded, so that the ops
exist (and take fake kernels, autograd and Triton twins) whether or not the C++ kernels
were built. The C++ side only implements: one TORCH_LIBRARY_IMPL block per dispatch key
in csrc/cpu/<family>.cpp and csrc/cuda/bindings.cpp, whose signatures the dispatcher checks
against these schemas when _C registers them. Fake kernels and autograd are registered by
fusedloss._ops.Op, made in each family module.

Every implementation checks its arguments against these contracts and raises as the public
functions' checks (fusedloss._checks) do: a bad shape or value ValueError, a bad dtype
TypeError, a bad device RuntimeError (tests/test_kernel_checks.py).

Adding an op: one `_define` call below, with its contract beside it.
"""
import torch

LIBRARY = torch.library.Library("fusedloss", "DEF")  # kept alive: dropping it deletes the ops
SCHEMAS = {}  # op name -> schema string, in definition order


def _define(schema: str) -> None:
    name = schema[:schema.index("(")]
    LIBRARY.define(schema)
    SCHEMAS[name] = schema


# ---- margin (family "margin", "margin_linear") -------------------------------------------------

# Margin softmax cross-entropy on normalised logits, per row. Returns the per-row loss
# (fp32, fp64 for fp64 `cos`) and, when compute_grad, d loss_i / d cos_ij in the dtype
# of `cos` (otherwise an empty tensor). row_m2 / row_m3: optional per-row margins
# (ElasticFace) that replace m2 / m3. lse_square_scale: lambda of the auxiliary term
# lambda * logsumexp(z)^2 added to each non-ignored row (0: none; see margin.h).
_define(
    "margin_cross_entropy(Tensor cos, Tensor target, Tensor? row_m2, Tensor? row_m3, "
    "float scale, float m1, float m2, float m3, bool detach_margin, float label_smoothing, "
    "float lse_square_scale, int ignore_index, bool compute_grad) -> (Tensor, Tensor)")

# The same loss on cos = normalize(embeddings) @ normalize(weight)^T (normalize=False:
# embeddings @ weight^T), without storing the N x C matrix. Returns the per-row loss
# and, when compute_grad, the gradients of sum_i row_grad_i * loss_i with respect to
# embeddings [N, D] and weight [C, D] (row_grad absent: all ones), else empty tensors.
# block_size: the tiling block, as each backend documents it (0: the backend chooses).
_define(
    "margin_linear_cross_entropy(Tensor embeddings, Tensor weight, Tensor target, "
    "Tensor? row_m2, Tensor? row_m3, Tensor? row_grad, float scale, float m1, float m2, "
    "float m3, bool detach_margin, float label_smoothing, float lse_square_scale, "
    "int ignore_index, bool normalize, int block_size, bool deterministic, bool compute_grad) "
    "-> (Tensor, Tensor, Tensor)")

# ---- sharded (family "sharded") ------------------------------------------------------------

# Sharded margin cross-entropy: this rank holds the classes
# [class_start, class_start + C_local) of every row; target holds global class ids.
# stats: the per-row partials [N, 3] (fp32, fp64 for fp64 input) of this shard:
#   (lse_other = log sum_{local j != y} exp(z_j)  (-inf when there is no such j),
#    z_y when y is in this shard else 0,  sum_z = sum_{local j} z_j),
# ignored rows (-inf, 0, 0). grad: with coef [N, 4] = (lse, a, b, d) per row,
#   grad_ij = s (a_i exp(s c_ij - lse_i) - b_i)  for local j != y,
#   grad_iy = (d z_y / d c_y) d_i                 when y is local,
# zeros for ignored rows, in the dtype of cos. softcap h and filter_threshold t (0: off; h
# only without margins, t in [0, 1]) transform the logits as margin.h's "Logit transforms"
# say: z_j = h tanh(s c'_j / h), c'_j = 0 where j != y and c_j > t; the stats are those of
# these z and the grad becomes dz_j/dc_j (a exp(z_j - lse) - b). The linear forms take embeddings [N, D] and
# this rank's weight shard [C_local, D] as margin_linear_cross_entropy does, never store
# the N x C_local block, and return (grad_embeddings: this shard's contribution,
# grad_weight_shard).
_define(
    "sharded_margin_stats(Tensor cos, Tensor target, Tensor? row_m2, Tensor? row_m3, "
    "float scale, float m1, float m2, float m3, int class_start, int ignore_index, "
    "float softcap=0., float filter_threshold=0.) -> Tensor")
_define(
    "sharded_margin_grad(Tensor cos, Tensor target, Tensor? row_m2, Tensor? row_m3, "
    "Tensor coef, float scale, float m1, float m2, float m3, bool detach_margin, "
    "int class_start, int ignore_index, float softcap=0., float filter_threshold=0.) -> Tensor")
# The grad op writing into cos's own storage (inplace_backward): cos is overwritten with
# sharded_margin_grad's result; cos must be contiguous (every kernel reads an element before
# it writes it, so the aliasing is safe).
_define(
    "sharded_margin_grad_inplace(Tensor(a!) cos, Tensor target, Tensor? row_m2, Tensor? row_m3, "
    "Tensor coef, float scale, float m1, float m2, float m3, bool detach_margin, "
    "int class_start, int ignore_index, float softcap=0., float filter_threshold=0.) -> ()")
_define(
    "sharded_margin_linear_stats(Tensor embeddings, Tensor weight, Tensor target, "
    "Tensor? row_m2, Tensor? row_m3, float scale, float m1, float m2, float m3, "
    "bool normalize, int class_start, int ignore_index, int block_size, float softcap=0., "
    "float filter_threshold=0.) -> Tensor")
_define(
    "sharded_margin_linear_grad(Tensor embeddings, Tensor weight, Tensor target, "
    "Tensor? row_m2, Tensor? row_m3, Tensor coef, float scale, float m1, float m2, float m3, "
    "bool detach_margin, bool normalize, int class_start, int ignore_index, int block_size, "
    "float softcap=0., float filter_threshold=0.) -> (Tensor, Tensor)")

# ---- multilabel (family "multilabel") ----------------------------------------------------------

# Multi-label margin loss (MLCD) on normalised logits (math: fusedloss/multilabel.h). cos
# [N, C_local] holds the columns [class_start, class_start + C_local) of classes [0,
# num_classes) (a whole row: class_start 0, num_classes C). targets [N, K] int64,
# 1 <= K <= 64, lists each row's positive classes (global ids); entries equal to
# ignore_index are padding, a class listed twice counts once, other shards' classes are
# skipped. stats: per row (lse_neg, lse_pos) [N, 2] (fp32, fp64 for fp64 cos) over the local
# columns: lse_neg = log sum_{j not positive} exp(scale c_j), lse_pos = log sum_{positives}
# exp(-z_p) with z_p the margin logit of margin_cross_entropy, -inf for an empty sum. grad:
# with coef [N, 4] = (a_neg, lse_neg, a_pos, lse_pos) per row (the accumulation dtype),
#   grad_ij = a_neg scale exp(scale c_ij - lse_neg)      (j not positive)
#   grad_ip = -a_pos (dz_p / dc_p) exp(-z_p - lse_pos)   (p positive),
# a zero row where a_neg = a_pos = 0, in the dtype of cos, [N, C_local] contiguous.
_define(
    "multilabel_margin_stats(Tensor cos, Tensor targets, float scale, float m1, float m2, "
    "float m3, bool detach_margin, int class_start, int num_classes, int ignore_index) "
    "-> Tensor")
_define(
    "multilabel_margin_grad(Tensor cos, Tensor targets, Tensor coef, float scale, float m1, "
    "float m2, float m3, bool detach_margin, int class_start, int num_classes, "
    "int ignore_index) -> Tensor")

# ---- pairs (family "pairs") ------------------------------------------------------------------

# Pairwise similarity losses over S_ij = x_i . r_j, x [N, D] queries, r [M, D] references
# (the caller normalises), int64 labels [N] and ref_labels [M]. Pair (i, j) is positive
# when the labels are equal, negative otherwise; when self_offset >= 0, column
# (self_offset + i) mod M is no pair of row i at all. distance 0: scores are S;
# distance 1: the euclidean distance d_ij = |x_i - r_j| (accurate for near-duplicates too:
# pairs.h).
# extrema: the hardest positive and negative of each row: values [N, 2] (fp32, fp64 for
# fp64) and indices [N, 2] int64 (-1: none, first index on ties). distance 0: (min_pos S,
# max_neg S), empty = (+inf, -inf); distance 1: (max_pos d, min_neg d), empty = (-inf, +inf).
_define(
    "pair_extrema(Tensor x, Tensor labels, Tensor ref, Tensor ref_labels, int distance, "
    "int self_offset, int block_size) -> (Tensor, Tensor)")

# row_stats: per-row statistics [N, K] of loss `kind` (fp32, fp64 for fp64):
#  kind 0, multi-similarity, hyper = (alpha, beta, base, epsilon), K = 2:
#    (log(1 + sum_{kept pos} exp(-alpha (S - base))), log(1 + sum_{kept neg} exp(beta (S - base))));
#    with thresholds [N, 2] = (max_neg, min_pos) a positive is kept iff S - epsilon < max_neg_i
#    and a negative iff S + epsilon > min_pos_i (strict); without thresholds every pair is kept.
#  kind 1, supcon / info-nce, hyper = (temperature), K = 3:
#    (log sum_{pairs} exp(S / t), sum_{pos} S / t, number of positives); -inf for no pairs.
#  kind 2, contrastive, hyper = (pos_margin, neg_margin), K = 4, with the pair losses
#    l = relu(d - pos_margin) / relu(neg_margin - d) (distance 1) or relu(pos_margin - S) /
#    relu(S - neg_margin) (distance 0) of positives / negatives:
#    (sum of positive losses, number of them > 0, sum of negative losses, number > 0).
#  kind 3, orthogonal projection, hyper = (absolute: 0 or 1), K = 4, with f(S) = S, or |S|
#    when absolute: (sum_{pos} S, number of positives, sum_{neg} f(S), number of negatives).
# row_stats_backward: given grad_stats [N, K] (the counts' entries are ignored) and the
# stats of forward, the gradients with respect to x and ref (empty when not asked for).
# When ref is x (the same data) and both gradients are asked for, a backend may return the
# whole gradient in grad_x and zeros in grad_ref: only their sum, which autograd forms for
# the one tensor, is specified.
_define(
    "pair_row_stats(Tensor x, Tensor labels, Tensor ref, Tensor ref_labels, Tensor? thresholds, "
    "int kind, int distance, float[] hyper, int self_offset, int block_size) -> Tensor")
_define(
    "pair_row_stats_backward(Tensor grad_stats, Tensor stats, Tensor x, Tensor labels, "
    "Tensor ref, Tensor ref_labels, Tensor? thresholds, int kind, int distance, float[] hyper, "
    "int self_offset, int block_size, bool x_grad, bool ref_grad) -> (Tensor, Tensor)")

# ---- spherical (family "spherical") ----------------------------------------------------------

# Spherical Z-loss per row: loss (fp32, fp64 for fp64 logits) and, when compute_grad,
# d loss_i / d logits_ij in the dtype of `logits` (else an empty tensor). C >= 2.
_define(
    "spherical_z_loss(Tensor logits, Tensor target, float a, float b, int ignore_index, "
    "bool compute_grad) -> (Tensor, Tensor)")
