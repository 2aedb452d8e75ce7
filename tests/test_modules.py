"""The modules of fusedloss.nn check their constructor arguments at construction, with the
messages of the functions they call, and the public signatures follow one convention
(explicit keywords, no private parameter, block_size=None for "the backend chooses")."""
import inspect
import math
import re

import pytest
import torch

import fusedloss
from fusedloss import nn

NAN, INF = float("nan"), math.inf

# (case, module factory, exception type, a fragment of the message)
BAD_CONSTRUCTION = [
    # margin
    ("MarginCrossEntropy: unknown preset", lambda: nn.MarginCrossEntropy("arcfase"), ValueError,
     "unknown loss preset 'arcfase'; expected one of ('arcface', 'cosface', 'combined'"),
    ("MarginCrossEntropy: scale<=0", lambda: nn.MarginCrossEntropy(scale=0.0), ValueError,
     "MarginCrossEntropy: scale must be > 0, got 0.0"),
    ("MarginCrossEntropy: m1<1", lambda: nn.MarginCrossEntropy(m1=0.5), ValueError,
     "MarginCrossEntropy: m1 must be >= 1.0, got 0.5"),
    ("MarginCrossEntropy: nan m2", lambda: nn.MarginCrossEntropy(m2=NAN), ValueError,
     "MarginCrossEntropy: m2 must be a finite number, got nan"),
    ("MarginCrossEntropy: negative std", lambda: nn.MarginCrossEntropy(m3_std=-0.1), ValueError,
     "MarginCrossEntropy: m3_std must be >= 0.0, got -0.1"),
    ("MarginCrossEntropy: elastic_plus without std",
     lambda: nn.MarginCrossEntropy(elastic_plus=True), ValueError,
     "MarginCrossEntropy: elastic_plus=True needs m2_std > 0 or m3_std > 0"),
    ("MarginCrossEntropy: smoothing>1", lambda: nn.MarginCrossEntropy(label_smoothing=1.5),
     ValueError, "MarginCrossEntropy: label_smoothing must lie in [0.0, 1.0], got 1.5"),
    ("MarginCrossEntropy: margin_grad", lambda: nn.MarginCrossEntropy(margin_grad="stop"),
     ValueError, "MarginCrossEntropy: unknown margin_grad 'stop'; expected one of ('exact', "),
    ("MarginCrossEntropy: reduction", lambda: nn.MarginCrossEntropy(reduction="avg"), ValueError,
     "MarginCrossEntropy: unknown reduction 'avg'; expected one of ('mean', 'sum', 'none')"),
    ("MarginCrossEntropy: float ignore_index", lambda: nn.MarginCrossEntropy(ignore_index=1.5),
     TypeError, "MarginCrossEntropy: ignore_index must be an int, got float"),
    ("MarginCrossEntropy: backend", lambda: nn.MarginCrossEntropy(backend="gpu"), ValueError,
     "MarginCrossEntropy: unknown backend 'gpu'; expected one of ('auto', 'reference', 'cpu'"),
    ("MarginCrossEntropy: unknown keyword", lambda: nn.MarginCrossEntropy(margin=0.5), TypeError,
     "MarginCrossEntropy: unexpected keyword argument(s) ['margin']"),
    ("MarginCrossEntropy: linear keyword", lambda: nn.MarginCrossEntropy(block_size=4),
     TypeError, "MarginCrossEntropy: unexpected keyword argument(s) ['block_size']"),
    ("MarginSoftmaxHead: dim 0", lambda: nn.MarginSoftmaxHead(0, 10), ValueError,
     "MarginSoftmaxHead: embedding_dim and num_classes must be >= 1, got 0 and 10"),
    ("MarginSoftmaxHead: unknown preset", lambda: nn.MarginSoftmaxHead(4, 10, "sphereface2"),
     ValueError, "unknown loss preset 'sphereface2'"),
    ("MarginSoftmaxHead: m1<1", lambda: nn.MarginSoftmaxHead(4, 10, m1=0.5), ValueError,
     "MarginSoftmaxHead: m1 must be >= 1.0, got 0.5"),
    ("MarginSoftmaxHead: lse_square_scale<0",
     lambda: nn.MarginSoftmaxHead(4, 10, lse_square_scale=-1.0), ValueError,
     "MarginSoftmaxHead: lse_square_scale must be >= 0.0, got -1.0"),
    ("MarginSoftmaxHead: block 0", lambda: nn.MarginSoftmaxHead(4, 10, block_size=0), ValueError,
     "MarginSoftmaxHead: block_size must be a positive int or None, got 0"),
    ("MarginSoftmaxHead: float block", lambda: nn.MarginSoftmaxHead(4, 10, block_size=8.0),
     TypeError, "MarginSoftmaxHead: block_size must be an int, got float"),
    ("MarginSoftmaxHead: backend", lambda: nn.MarginSoftmaxHead(4, 10, backend="tpu"),
     ValueError, "MarginSoftmaxHead: unknown backend 'tpu'"),
    ("MarginSoftmaxHead: unknown keyword", lambda: nn.MarginSoftmaxHead(4, 10, margin=0.5),
     TypeError, "MarginSoftmaxHead: unexpected keyword argument(s) ['margin']"),
    # sharded
    ("PartialFC: rate 0", lambda: nn.PartialFC(4, 10, sample_rate=0.0), ValueError,
     "PartialFC: sample_rate must lie in (0, 1], got 0.0"),
    ("PartialFC: rate>1", lambda: nn.PartialFC(4, 10, sample_rate=1.5), ValueError,
     "PartialFC: sample_rate must lie in (0, 1], got 1.5"),
    ("PartialFC: rate nan", lambda: nn.PartialFC(4, 10, sample_rate=NAN), ValueError,
     "PartialFC: sample_rate must lie in (0, 1], got nan"),
    ("PartialFC: dim 0", lambda: nn.PartialFC(0, 10), ValueError,
     "PartialFC: embedding_dim and num_classes must be >= 1, got 0 and 10"),
    ("PartialFC: unknown preset", lambda: nn.PartialFC(4, 10, loss="sphereface"), ValueError,
     "unknown loss preset 'sphereface'"),
    ("PartialFC: elastic plus", lambda: nn.PartialFC(4, 10, loss="elastic_cosface_plus"),
     ValueError, "PartialFC: elastic_plus=True is not supported when sharded"),
    ("PartialFC: scale<=0", lambda: nn.PartialFC(4, 10, scale=-1.0), ValueError,
     "PartialFC: scale must be > 0, got -1.0"),
    ("PartialFC: block<0", lambda: nn.PartialFC(4, 10, block_size=-2), ValueError,
     "PartialFC: block_size must be a positive int or None, got -2"),
    ("PartialFC: backend", lambda: nn.PartialFC(4, 10, backend="cuda_graph"), ValueError,
     "PartialFC: unknown backend 'cuda_graph'"),
    ("PartialFC: unknown keyword", lambda: nn.PartialFC(4, 10, deterministic=True), TypeError,
     "PartialFC: unexpected keyword argument(s) ['deterministic']"),
    # ldr_kl
    ("LDRKLLoss: lam<=0", lambda: nn.LDRKLLoss(lam=0.0), ValueError,
     "LDRKLLoss: lam must be > 0, got 0.0"),
    ("LDRKLLoss: nan margin", lambda: nn.LDRKLLoss(margin=NAN), ValueError,
     "LDRKLLoss: margin must be a finite number, got nan"),
    ("LDRKLLoss: tensor lam", lambda: nn.LDRKLLoss(lam=torch.ones(3)), TypeError,
     "LDRKLLoss: lam must be a float here"),
    ("LDRKLLoss: backend", lambda: nn.LDRKLLoss(backend="gpu"), ValueError,
     "LDRKLLoss: unknown backend 'gpu'"),
    ("LDRKLLinear: dim 0", lambda: nn.LDRKLLinear(0, 10), ValueError,
     "LDRKLLinear: in_features and num_classes must be >= 1, got 0 and 10"),
    ("LDRKLLinear: reduction", lambda: nn.LDRKLLinear(4, 10, reduction="avg"), ValueError,
     "LDRKLLinear: unknown reduction 'avg'"),
    ("LDRKLLinear: block 0", lambda: nn.LDRKLLinear(4, 10, block_size=0), ValueError,
     "LDRKLLinear: block_size must be a positive int or None, got 0"),
    # multilabel heads
    ("MarginSoftmaxHead: multilabel with smoothing",
     lambda: nn.MarginSoftmaxHead(4, 10, multilabel=True, label_smoothing=0.1), ValueError,
     "MarginSoftmaxHead: ['label_smoothing'] do not apply with multilabel=True"),
    ("PartialFC: multilabel with unpg", lambda: nn.PartialFC(4, 10, multilabel=True, unpg=True),
     ValueError, "PartialFC: unpg=True does not apply with multilabel=True"),
    ("PartialFC: multilabel not bool", lambda: nn.PartialFC(4, 10, multilabel=1), TypeError,
     "PartialFC: multilabel must be a bool, got int"),
    # pairs
    ("CrossBatchMemory: unknown loss", lambda: nn.CrossBatchMemory(4, 8, "arcface"), ValueError,
     "CrossBatchMemory: unknown loss 'arcface'; expected one of ('multi_similarity', 'supcon'"),
    ("CrossBatchMemory: memory 0", lambda: nn.CrossBatchMemory(4, 0), ValueError,
     "CrossBatchMemory: embedding_dim and memory_size must be >= 1, got 4 and 0"),
    ("CrossBatchMemory: alpha<=0", lambda: nn.CrossBatchMemory(4, 8, alpha=-1.0), ValueError,
     "CrossBatchMemory: alpha must be > 0, got -1.0"),
    ("CrossBatchMemory: nan epsilon", lambda: nn.CrossBatchMemory(4, 8, epsilon=NAN), ValueError,
     "CrossBatchMemory: epsilon must be a finite number, got nan"),
    ("CrossBatchMemory: mining not bool", lambda: nn.CrossBatchMemory(4, 8, mining=1), TypeError,
     "CrossBatchMemory: mining must be a bool, got int"),
    ("CrossBatchMemory: temperature<=0",
     lambda: nn.CrossBatchMemory(4, 8, "supcon", temperature=0.0), ValueError,
     "CrossBatchMemory: temperature must be > 0, got 0.0"),
    ("CrossBatchMemory: distance", lambda: nn.CrossBatchMemory(4, 8, "contrastive", distance="l1"),
     ValueError, "CrossBatchMemory: unknown distance 'l1'; expected one of ('euclidean', 'cos"),
    ("CrossBatchMemory: inf margin",
     lambda: nn.CrossBatchMemory(4, 8, "contrastive", pos_margin=INF), ValueError,
     "CrossBatchMemory: pos_margin must be a finite number, got inf"),
    ("CrossBatchMemory: nan triplet margin",
     lambda: nn.CrossBatchMemory(4, 8, "batch_hard_triplet", margin=NAN), ValueError,
     "CrossBatchMemory: margin must be a finite number, got nan"),
    ("CrossBatchMemory: normalize not bool",
     lambda: nn.CrossBatchMemory(4, 8, "supcon", normalize="yes"), TypeError,
     "CrossBatchMemory: normalize must be a bool, got str"),
    ("CrossBatchMemory: backend", lambda: nn.CrossBatchMemory(4, 8, backend="gpu"), ValueError,
     "CrossBatchMemory: unknown backend 'gpu'"),
    ("CrossBatchMemory: keyword of another loss",
     lambda: nn.CrossBatchMemory(4, 8, "supcon", alpha=2.0), TypeError,
     "CrossBatchMemory: supcon takes no keyword(s) ['alpha']"),
    ("CrossBatchMemory: private keyword",
     lambda: nn.CrossBatchMemory(4, 8, "supcon", _self_offset=0), TypeError,
     "CrossBatchMemory: supcon takes no keyword(s) ['_self_offset']"),
    # spherical
    ("SphericalZLoss: a<=0", lambda: nn.SphericalZLoss(a=0.0), ValueError,
     "SphericalZLoss: a must be > 0, got 0.0"),
    ("SphericalZLoss: inf b", lambda: nn.SphericalZLoss(b=INF), ValueError,
     "SphericalZLoss: b must be a finite number, got inf"),
    ("SphericalZLoss: reduction", lambda: nn.SphericalZLoss(reduction="avg"), ValueError,
     "SphericalZLoss: unknown reduction 'avg'"),
    ("SphericalZLoss: ignore_index None", lambda: nn.SphericalZLoss(ignore_index=None), TypeError,
     "SphericalZLoss: ignore_index must be an int, got NoneType"),
    ("SphericalZLoss: backend", lambda: nn.SphericalZLoss(backend="gpu"), ValueError,
     "SphericalZLoss: unknown backend 'gpu'"),
    ("SphericalZLoss: unknown keyword", lambda: nn.SphericalZLoss(label_smoothing=0.1), TypeError,
     "got an unexpected keyword argument 'label_smoothing'"),
    ("SphericalLinear: one class", lambda: nn.SphericalLinear(4, 1), ValueError,
     "SphericalLinear: needs in_features >= 1 and num_classes >= 2, got 4 and 1"),
    ("SphericalLinear: a<=0", lambda: nn.SphericalLinear(4, 10, a=-1.0), ValueError,
     "SphericalLinear: a must be > 0, got -1.0"),
    ("SphericalLinear: reduction", lambda: nn.SphericalLinear(4, 10, reduction="avg"),
     ValueError, "SphericalLinear: unknown reduction 'avg'"),
    ("SphericalLinear: triton", lambda: nn.SphericalLinear(4, 10, backend="triton"), ValueError,
     "SphericalLinear: no Triton kernel for linear_spherical_z_loss"),
    ("SphericalLinear: backend", lambda: nn.SphericalLinear(4, 10, backend="gpu"), ValueError,
     "SphericalLinear: unknown backend 'gpu'"),
    ("FactoredSphericalLinear: one class", lambda: nn.FactoredSphericalLinear(4, 1, lr=0.1),
     ValueError, "FactoredSphericalLinear: needs in_features >= 1 and num_classes >= 2"),
    ("FactoredSphericalLinear: lr<0", lambda: nn.FactoredSphericalLinear(4, 10, lr=-0.1),
     ValueError, "FactoredSphericalLinear: lr must be >= 0.0, got -0.1"),
    ("FactoredSphericalLinear: a<=0", lambda: nn.FactoredSphericalLinear(4, 10, lr=0.1, a=0.0),
     ValueError, "FactoredSphericalLinear: a must be > 0, got 0.0"),
    ("FactoredSphericalLinear: reduction none",
     lambda: nn.FactoredSphericalLinear(4, 10, lr=0.1, reduction="none"), ValueError,
     "FactoredSphericalLinear: reduction must be 'mean' or 'sum', got 'none'"),
    ("FactoredSphericalLinear: ignore_index",
     lambda: nn.FactoredSphericalLinear(4, 10, lr=0.1, ignore_index="x"), TypeError,
     "FactoredSphericalLinear: ignore_index must be an int, got str"),
    ("FactoredSphericalLinear: stabilize_every 0",
     lambda: nn.FactoredSphericalLinear(4, 10, lr=0.1, stabilize_every=0), ValueError,
     "FactoredSphericalLinear: stabilize_every must be >= 1, got 0"),
]


@pytest.mark.parametrize("make,exc,message", [case[1:] for case in BAD_CONSTRUCTION],
                         ids=[case[0] for case in BAD_CONSTRUCTION])
def test_bad_construction_raises_at_construction(make, exc, message):
    with pytest.raises(exc) as info:
        make()
    assert message in str(info.value)


def _public_modules():
    return sorted(name for name in nn.__all__ if isinstance(getattr(nn, name), type))


def test_every_module_has_construction_cases():
    covered = {case[0].split(":")[0] for case in BAD_CONSTRUCTION}
    assert covered == set(_public_modules())


cos, target = torch.rand(4, 7) * 2 - 1, torch.tensor([0, 1, 2, 3])
x, w = torch.randn(4, 5), torch.randn(7, 5)
emb, lab = torch.randn(6, 5), torch.tensor([0, 0, 1, 1, 2, 2])

# (case, module factory, the same mistake made in a call of the function the module calls)
SAME_AS_FUNCTION = [
    ("scale", lambda: nn.MarginCrossEntropy(scale=-1.0),
     lambda: fusedloss.margin_cross_entropy(cos, target, scale=-1.0)),
    ("elastic_plus", lambda: nn.MarginCrossEntropy("cosface", elastic_plus=True),
     lambda: fusedloss.margin_cross_entropy(cos, target, m3=0.4, elastic_plus=True)),
    ("block_size", lambda: nn.MarginSoftmaxHead(5, 7, block_size=-1),
     lambda: fusedloss.linear_margin_cross_entropy(x, w, target, block_size=-1)),
    ("sharded elastic_plus", lambda: nn.PartialFC(5, 7, loss="elastic_arcface_plus"),
     lambda: fusedloss.linear_sharded_margin_cross_entropy(
         x, w, target, class_start=0, num_classes=7, m2=0.5, m2_std=0.1, elastic_plus=True)),
    ("sharded block_size", lambda: nn.PartialFC(5, 7, block_size=0),
     lambda: fusedloss.linear_sharded_margin_cross_entropy(x, w, target, class_start=0,
                                                           num_classes=7, block_size=0)),
    ("ms alpha", lambda: nn.CrossBatchMemory(5, 8, alpha=0.0),
     lambda: fusedloss.multi_similarity_loss(emb, lab, alpha=0.0)),
    ("contrastive distance", lambda: nn.CrossBatchMemory(5, 8, "contrastive", distance="l2"),
     lambda: fusedloss.contrastive_loss(emb, lab, distance="l2")),
    ("spherical a", lambda: nn.SphericalZLoss(a=-2.0),
     lambda: fusedloss.spherical_z_loss(cos, target, a=-2.0)),
    ("linear spherical triton", lambda: nn.SphericalLinear(5, 7, backend="triton"),
     lambda: fusedloss.linear_spherical_z_loss(x, w, target, backend="triton")),
]


def _without_owner(message: str) -> str:
    return re.sub(r"^\w+: ", "", message)


@pytest.mark.parametrize("make,call", [case[1:] for case in SAME_AS_FUNCTION],
                         ids=[case[0] for case in SAME_AS_FUNCTION])
def test_module_raises_the_message_of_its_function(make, call):
    with pytest.raises(Exception) as module_error:
        make()
    with pytest.raises(Exception) as function_error:
        call()
    assert module_error.type is function_error.type
    assert _without_owner(str(module_error.value)) == _without_owner(str(function_error.value))


def test_good_construction_and_defaults():
    head = nn.MarginSoftmaxHead(5, 7, "cosface", block_size=None, backend="reference",
                                deterministic=True)
    assert head(x, target).isfinite()
    fc = nn.PartialFC(5, 7, block_size=None, backend="reference")
    assert fc.call_kwargs["block_size"] is None
    memory = nn.CrossBatchMemory(5, 8, "contrastive", distance="cosine", backend="reference")
    assert memory.loss_args == dict(distance="cosine", backend="reference")
    assert memory(emb[:4], lab[:4]).isfinite()


PUBLIC_FUNCTIONS = [name for name in fusedloss.__all__
                    if inspect.isfunction(getattr(fusedloss, name)) and name != "backends"]


@pytest.mark.parametrize("name", PUBLIC_FUNCTIONS)
def test_public_signature_is_explicit(name):
    """No private parameter and no **kwargs in a public signature, and block_size, where a
    function takes one, defaults to None (the backend chooses)."""
    params = inspect.signature(getattr(fusedloss, name)).parameters
    assert not [p for p in params if p.startswith("_")]
    assert all(p.kind is not p.VAR_KEYWORD for p in params.values())
    if "block_size" in params:
        assert params["block_size"].default is None


@pytest.mark.parametrize("name", ["linear_margin_cross_entropy", "sharded_margin_cross_entropy",
                                  "linear_sharded_margin_cross_entropy"])
def test_forwarded_margin_keywords_match_margin_cross_entropy(name):
    """The margin keywords of the linear and sharded functions are those of
    margin_cross_entropy, with the same defaults; inplace_backward, which overwrites the
    cosines, belongs to the functions that take them (not the fused linear ones)."""
    base = inspect.signature(fusedloss.margin_cross_entropy).parameters
    params = inspect.signature(getattr(fusedloss, name)).parameters
    cosine_only = {"inplace_backward"} if name.startswith("linear_") else set()
    for key, param in base.items():
        if param.kind is param.KEYWORD_ONLY and key not in cosine_only:
            assert key in params, key
            assert params[key].default == param.default, key
