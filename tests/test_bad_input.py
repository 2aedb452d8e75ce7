"""Every public function and module, fed every wrong input that applies, raises a clear
exception (type and message checked) before any kernel runs. Empty batches are not errors:
they behave as F.cross_entropy does (sum 0, mean NaN)."""
from functools import partial

import pytest
import torch

import fusedloss
import fusedloss as F
from fusedloss import nn as fnn

from conftest import assert_empty_batch_like_cross_entropy


def t(*shape, dtype=torch.float32):
    return torch.rand(*shape, dtype=dtype)


def L(*values):
    return torch.tensor(values)


cos, tgt = t(4, 7), L(0, 1, 2, 3)
x, w = t(4, 5), t(7, 5)
emb, lab = t(6, 5), L(0, 0, 1, 1, 2, 2)
# The sharded ops on one rank holding all 7 classes, unless a case says otherwise.
sharded = partial(F.sharded_margin_cross_entropy, class_start=0, num_classes=7)
linear_sharded = partial(F.linear_sharded_margin_cross_entropy, class_start=0, num_classes=7)

# (case, call, exception type, a fragment of the message)
BAD_INPUTS = [
    # margin_cross_entropy
    ("margin: 1-D cos", lambda: F.margin_cross_entropy(t(7), L(0)), ValueError,
     "cos must be 2-D, got shape (7,)"),
    ("margin: int cos", lambda: F.margin_cross_entropy(torch.ones(4, 7, dtype=torch.long), tgt),
     TypeError, "cos must be float16, bfloat16, float32 or float64, got torch.int64"),
    ("margin: float target", lambda: F.margin_cross_entropy(cos, tgt.float()), TypeError,
     "target must hold integer class indices, got torch.float32"),
    ("margin: target length", lambda: F.margin_cross_entropy(cos, L(0, 1)), ValueError,
     "target must have shape [4] (one class per row), got (2,)"),
    ("margin: target out of range", lambda: F.margin_cross_entropy(cos, L(0, 1, 2, 7)), ValueError,
     "target[3] = 7 is outside [0, 7) and is not ignore_index (-100)"),
    ("margin: device mix", lambda: F.margin_cross_entropy(cos, tgt.to("meta")), RuntimeError,
     "all tensors must be on one device, got cos on cpu, target on meta"),
    ("margin: scale<=0", lambda: F.margin_cross_entropy(cos, tgt, scale=0.0), ValueError,
     "scale must be > 0, got 0.0"),
    ("margin: negative std", lambda: F.margin_cross_entropy(cos, tgt, m2_std=-0.1), ValueError,
     "m2_std must be >= 0.0, got -0.1"),
    ("margin: m1<1", lambda: F.margin_cross_entropy(cos, tgt, m1=0.5), ValueError,
     "m1 must be >= 1.0, got 0.5"),
    ("margin: smoothing>1", lambda: F.margin_cross_entropy(cos, tgt, label_smoothing=1.5),
     ValueError, "label_smoothing must lie in [0.0, 1.0], got 1.5"),
    ("margin: unknown kw", lambda: F.margin_cross_entropy(cos, tgt, margin=0.5), TypeError,
     "margin_cross_entropy() got an unexpected keyword argument 'margin'"),
    # linear
    ("linear: D mismatch", lambda: F.linear_margin_cross_entropy(x, t(7, 6), tgt), ValueError,
     "embeddings [N, D] and weight [C, D] must share D, got (4, 5) and (7, 6)"),
    ("linear: dtype mismatch", lambda: F.linear_margin_cross_entropy(x, w.double(), tgt), TypeError,
     "embeddings and weight must share a dtype, got torch.float32 and torch.fl"),
    ("linear: 3-D weight", lambda: F.linear_margin_cross_entropy(x, t(7, 5, 1), tgt), ValueError,
     "weight must be 2-D, got shape (7, 5, 1)"),
    ("linear: target out of range", lambda: F.linear_margin_cross_entropy(x, w, L(0, 1, 2, 9)),
     ValueError, "target[3] = 9 is outside [0, 7) and is not ignore_index (-100)"),
    ("linear: scale<=0", lambda: F.linear_margin_cross_entropy(x, w, tgt, scale=-1.0), ValueError,
     "scale must be > 0, got -1.0"),
    ("linear: negative block", lambda: F.linear_margin_cross_entropy(x, w, tgt, block_size=-1),
     ValueError, "block_size must be a positive int or None, got -1"),
    # sharded
    ("sharded: class_start<0", lambda: sharded(cos, tgt, class_start=-1), ValueError,
     "the shard of rank 0 leaves [0, 7); shards must tile [0, 7) (rank 0: [-1,"),
    ("sharded: shard exceeds", lambda: sharded(cos, tgt, class_start=3), ValueError,
     "the shard of rank 0 leaves [0, 7); shards must tile [0, 7) (rank 0: [3,"),
    ("sharded: target>=C", lambda: sharded(cos, L(0, 1, 2, 7)), ValueError,
     "on rank 0, target[3] = 7 is outside [0, 7) and is not ignore_index"),
    ("sharded: elastic_plus", lambda: sharded(cos, tgt, m2=0.5, m2_std=0.1, elastic_plus=True),
     ValueError, "elastic_plus=True is not supported when sharded (it ranks every row's ta"),
    ("sharded: scale<=0", lambda: sharded(cos, tgt, scale=0.0), ValueError,
     "scale must be > 0, got 0.0"),
    ("lsharded: D mismatch", lambda: linear_sharded(x, t(7, 6), tgt), ValueError,
     "embeddings [N, D] and weight_shard [C_local, D] must share D, got (4, 5)"),
    ("lsharded: num_classes small", lambda: linear_sharded(x, w, tgt, num_classes=5), ValueError,
     "the shard of rank 0 leaves [0, 5); shards must tile [0, 5) (rank 0: [0,"),
    # spherical
    ("spherical: C=1", lambda: F.spherical_z_loss(t(4, 1), L(0, 0, 0, 0)), ValueError,
     "needs C >= 2 classes (the spread of one output is zero by definition), g"),
    ("spherical: a<=0", lambda: F.spherical_z_loss(cos, tgt, a=0.0), ValueError,
     "a must be > 0, got 0.0"),
    ("lspherical: bias shape", lambda: F.linear_spherical_z_loss(x, w, tgt, t(3)), ValueError,
     "bias must have shape [C] = [7] (one entry per row of weight), got (3,)"),
    ("lspherical: D mismatch", lambda: F.linear_spherical_z_loss(x, t(7, 6), tgt), ValueError,
     "hidden [N, d] and weight [C, d] must share d, got (4, 5) and (7, 6)"),
    # pairs
    ("ms: alpha<=0", lambda: F.multi_similarity_loss(emb, lab, alpha=0.0), ValueError,
     "alpha must be > 0, got 0.0"),
    ("ms: beta<=0", lambda: F.multi_similarity_loss(emb, lab, beta=-1.0), ValueError,
     "beta must be > 0, got -1.0"),
    ("ms: label length", lambda: F.multi_similarity_loss(emb, lab[:3]), ValueError,
     "labels has 3 entries but embeddings has 6 rows; they must match"),
    ("ms: float labels", lambda: F.multi_similarity_loss(emb, lab.float()), TypeError,
     "labels must hold integer class labels, got torch.float32"),
    ("ms: ref without labels", lambda: F.multi_similarity_loss(emb, lab, ref_embeddings=emb),
     ValueError, "ref_embeddings and ref_labels go together: a reference set needs its lab"),
    ("ms: ref D mismatch",
     lambda: F.multi_similarity_loss(emb, lab, ref_embeddings=t(3, 4), ref_labels=L(0, 1, 2)),
     ValueError, "embeddings [N, D] and ref_embeddings [M, D] must share D, got (6, 5) and"),
    ("ms: 1-D emb", lambda: F.multi_similarity_loss(t(6), lab), ValueError,
     "embeddings must be 2-D, got shape (6,)"),
    ("ms: device mix", lambda: F.multi_similarity_loss(emb, lab.to("meta")), RuntimeError,
     "all tensors must be on one device, got embeddings on cpu, labels on meta"),
    ("miner: float labels", lambda: F.multi_similarity_miner(emb, lab.float()), TypeError,
     "labels must hold integer class labels, got torch.float32"),
    ("supcon: temperature<=0", lambda: F.supcon_loss(emb, lab, temperature=0.0), ValueError,
     "temperature must be > 0, got 0.0"),
    ("infonce: shapes", lambda: F.info_nce_loss(t(4, 5), t(3, 5)), ValueError,
     "query and key must have the same shape [N, D], got (4, 5) and (3, 5)"),
    ("infonce: temperature<0", lambda: F.info_nce_loss(t(4, 5), t(4, 5), temperature=-0.1),
     ValueError, "temperature must be > 0, got -0.1"),
    ("contrastive: distance", lambda: F.contrastive_loss(emb, lab, distance="manhattan"),
     ValueError, "unknown distance 'manhattan'; expected one of ('euclidean', 'cosine')"),
    ("triplet: distance", lambda: F.batch_hard_triplet_loss(emb, lab, distance="l1"), ValueError,
     "unknown distance 'l1'; expected one of ('euclidean', 'cosine')"),
    ("triplet: nan margin", lambda: F.batch_hard_triplet_loss(emb, lab, margin=float("nan")),
     ValueError, "margin must be a finite number, got nan"),
    # modules
    ("MarginCrossEntropy: unknown preset", lambda: fnn.MarginCrossEntropy("arcfase"), ValueError,
     "unknown loss preset 'arcfase'; expected one of ('arcface', 'cosface', 'c"),
    ("MarginSoftmaxHead: dim 0", lambda: fnn.MarginSoftmaxHead(0, 10), ValueError,
     "embedding_dim and num_classes must be >= 1, got 0 and 10"),
    ("MarginSoftmaxHead: wrong D", lambda: fnn.MarginSoftmaxHead(5, 10)(t(4, 6), tgt), ValueError,
     "embeddings [N, D] and weight [C, D] must share D, got (4, 6) and (10, 5)"),
    ("PartialFC: rate 0", lambda: fnn.PartialFC(5, 10, sample_rate=0.0), ValueError,
     "sample_rate must lie in (0, 1], got 0.0"),
    ("PartialFC: label out of range", lambda: fnn.PartialFC(5, 10)(t(4, 5), L(0, 1, 2, 10)),
     ValueError, "on rank 0, local_labels[3] = 10 is outside [0, 10) and is not ignore_ind"),
    ("SphericalZLoss: a<0", lambda: fnn.SphericalZLoss(a=-1.0)(cos, tgt), ValueError,
     "a must be > 0, got -1.0"),
    ("SphericalLinear: wrong D", lambda: fnn.SphericalLinear(5, 10)(t(4, 6), tgt), ValueError,
     "hidden [N, d] and weight [C, d] must share d, got (4, 6) and (10, 5)"),
    ("CrossBatchMemory: batch > memory", lambda: fnn.CrossBatchMemory(5, 4)(emb, lab), ValueError,
     "a batch of 6 does not fit in a memory of 4"),
    ("CrossBatchMemory: unknown loss", lambda: fnn.CrossBatchMemory(5, 8, loss="arcface"),
     ValueError, "unknown loss 'arcface'; expected one of ('multi_similarity', 'supcon', '"),
    ("CrossBatchMemory: wrong D", lambda: fnn.CrossBatchMemory(5, 8)(t(6, 4), lab), ValueError,
     "embeddings must have shape [B, 5], got (6, 4)"),
    ("FactoredSphericalLinear: lr<0", lambda: fnn.FactoredSphericalLinear(5, 10, lr=-0.1),
     ValueError, "lr must be >= 0.0, got -0.1"),
]


@pytest.mark.parametrize(
    "call,exc,message", [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS]
)
def test_bad_input_raises_a_clear_error(call, exc, message):
    with pytest.raises(exc) as info:
        call()
    assert message in str(info.value)


EMPTY_BATCH = {
    "margin_cross_entropy": lambda red: F.margin_cross_entropy(t(0, 7), L().long(), reduction=red),
    "linear_margin_cross_entropy": lambda red: F.linear_margin_cross_entropy(
        t(0, 5), w, L().long(), reduction=red
    ),
    "sharded_margin_cross_entropy": lambda red: F.sharded_margin_cross_entropy(
        t(0, 7), L().long(), class_start=0, num_classes=7, reduction=red
    ),
    "linear_sharded_margin_cross_entropy": lambda red: F.linear_sharded_margin_cross_entropy(
        t(0, 5), w, L().long(), class_start=0, num_classes=7, reduction=red
    ),
    "spherical_z_loss": lambda red: F.spherical_z_loss(t(0, 7), L().long(), reduction=red),
    "linear_spherical_z_loss": lambda red: F.linear_spherical_z_loss(
        t(0, 5), w, L().long(), reduction=red
    ),
}


@pytest.mark.parametrize("op", list(EMPTY_BATCH))
def test_empty_batch_behaves_like_cross_entropy(op):
    assert_empty_batch_like_cross_entropy(EMPTY_BATCH[op])


def test_every_public_function_is_in_the_table():
    tested = {case[0].split(":")[0] for case in BAD_INPUTS}
    short = {
        "margin_cross_entropy": "margin",
        "linear_margin_cross_entropy": "linear",
        "sharded_margin_cross_entropy": "sharded",
        "linear_sharded_margin_cross_entropy": "lsharded",
        "spherical_z_loss": "spherical",
        "linear_spherical_z_loss": "lspherical",
        "multi_similarity_loss": "ms",
        "multi_similarity_miner": "miner",
        "supcon_loss": "supcon",
        "info_nce_loss": "infonce",
        "contrastive_loss": "contrastive",
        "batch_hard_triplet_loss": "triplet",
    }
    functions = {
        name
        for name in fusedloss.__all__
        if callable(getattr(fusedloss, name)) and name not in ("backends", "BackendStatus")
    }
    assert functions == set(short), functions ^ set(short)
    modules = {
        name
        for name in dir(fnn)
        if isinstance(getattr(fnn, name), type) and issubclass(getattr(fnn, name), torch.nn.Module)
    }
    assert {short[f] for f in functions} | modules <= tested | {"Module"}, (
        {short[f] for f in functions} | modules
    ) - tested
