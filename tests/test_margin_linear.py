"""linear_margin_cross_entropy and the nn heads: every backend against the fp64 reference,
loss, embedding gradient and weight gradient."""
import subprocess
import sys

import pytest
import torch

import fusedloss
from fusedloss.nn import PRESETS, MarginCrossEntropy, MarginSoftmaxHead

from conftest import (MARGIN_VARIANTS, assert_curves_agree, assert_matches_oracle, bad_input_params,
                      clustered_data, device_backends, loss_and_grads, sgd_loss_curve, small_mlp)

VARIANTS = {**MARGIN_VARIANTS, "plain_linear_ce": dict(scale=1.0, normalize=False)}


def make_inputs(n, c, d, dtype, device="cpu", ignore=(), zero_rows=False):
    x = torch.randn(n, d, dtype=torch.float64)
    w = torch.randn(c, d, dtype=torch.float64)
    target = torch.randint(0, c, (n,))
    if zero_rows:
        x[0] = 0
        w[target[min(1, n - 1)]] = 0
    for row in ignore:
        target[row] = -100
    return x.to(dtype).to(device), w.to(dtype).to(device), target.to(device)


def linear_margin(**options):
    """call(backend, x, w, target) of linear_margin_cross_entropy with `options`; elastic
    margins are drawn from a fresh generator with the same seed for every backend."""
    def call(backend, x, w, target):
        gen = torch.Generator(device=x.device).manual_seed(99)
        return fusedloss.linear_margin_cross_entropy(x, w, target, backend=backend,
                                                     generator=gen, **options)
    return call


def rising_weights(loss):
    """Incoming gradient 1, 2, 3, ... over the per-row losses (1 for a reduced loss)."""
    return torch.arange(1.0, loss.numel() + 1, device=loss.device).reshape(loss.shape)


def run(x, w, target, backend, **kw):
    return loss_and_grads(linear_margin(**kw), backend, (x, w, target), rising_weights)


def check(x, w, target, backend, **kw):
    assert_matches_oracle(linear_margin(**kw), backend, (x, w, target),
                          ("loss", "grad embeddings", "grad weight"), rising_weights)


@pytest.mark.parametrize("backend,device", device_backends())
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_variants_match_oracle(backend, device, variant, reduction):
    x, w, target = make_inputs(6, 41, 19, torch.float32, device, ignore=(4,))
    check(x, w, target, backend, reduction=reduction, **VARIANTS[variant])


@pytest.mark.parametrize("backend,device", device_backends())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("normalize", [True, False])
def test_dtypes(backend, device, dtype, normalize):
    x, w, target = make_inputs(5, 33, 16, dtype, device, ignore=(2,))
    scale = 64.0 if normalize else 1.0
    check(x, w, target, backend, normalize=normalize, scale=scale, m2=0.5 if normalize else 0.0)


@pytest.mark.parametrize("backend,device", device_backends())
@pytest.mark.parametrize("n,c,d", [(1, 1, 1), (1, 7, 3), (3, 1, 5), (7, 130, 33), (9, 67, 70)])
def test_odd_shapes(backend, device, n, c, d):
    x, w, target = make_inputs(n, c, d, torch.float32, device)
    check(x, w, target, backend, m2=0.5, label_smoothing=0.1, reduction="sum")


@pytest.mark.parametrize("backend,device", device_backends())
def test_zero_rows_and_ignored_rows(backend, device):
    x, w, target = make_inputs(6, 20, 8, torch.float32, device, ignore=(3, 5), zero_rows=True)
    check(x, w, target, backend, m3=0.35, reduction="none")


@pytest.mark.parametrize("backend,device", device_backends())
def test_all_rows_ignored(backend, device):
    x, w, target = make_inputs(3, 20, 8, torch.float32, device, ignore=(0, 1, 2))
    loss, gx, gw = run(x, w, target, backend, m2=0.5, reduction="mean")
    assert torch.isnan(loss) and torch.all(gx == 0) and torch.all(gw == 0)


@pytest.mark.parametrize("backend,device", device_backends())
def test_block_size_and_determinism(backend, device):
    x, w, target = make_inputs(13, 70, 24, torch.float32, device)
    first = run(x, w, target, backend, m2=0.5, block_size=4, deterministic=True)
    again = run(x, w, target, backend, m2=0.5, block_size=4, deterministic=True)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    check(x, w, target, backend, m2=0.5, block_size=4)


def test_cpu_peak_memory_does_not_grow_with_n_times_c():
    """Peak extra RSS of a forward + backward, in a fresh process, beyond the gradients of
    the inputs: flat in N x C (the N x C logits are never stored)."""
    code = """
import sys, torch, fusedloss
n, c, d = int(sys.argv[1]), int(sys.argv[2]), 64
x = torch.randn(n, d, requires_grad=True); w = torch.randn(c, d, requires_grad=True)
t = torch.randint(0, c, (n,))
hwm = lambda: int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) * 1024
open('/proc/self/clear_refs', 'w').write('5'); base = hwm()
fusedloss.linear_margin_cross_entropy(x, w, t, m2=0.5, backend='cpu').backward()
print(hwm() - base - (x.numel() + w.numel()) * 4)
"""
    def extra(n, c):
        out = subprocess.run([sys.executable, "-c", code, str(n), str(c)], capture_output=True,
                             text=True, check=True)
        return int(out.stdout.strip())

    small, large = extra(512, 8_000), extra(2048, 64_000)
    logits_large = 2048 * 64_000 * 4  # 500 MiB: what one materialised N x C matrix would cost
    assert large < 0.15 * logits_large, (small, large)


@pytest.mark.parametrize("backend,device", device_backends())
def test_convergence_of_head_matches_reference(backend, device):
    """A small embedding network with MarginSoftmaxHead, 100 steps, same seed: the losses
    of the fused head and of the reference head agree."""
    classes, dim = 12, 10
    x, y = clustered_data(classes, dim, 48, centre_scale=2, noise=0.5, device=device)

    def train(backend_name):
        torch.manual_seed(3)
        net = small_mlp(dim, 16, device)
        head = MarginSoftmaxHead(16, classes, "arcface", scale=16.0, m2=0.2,
                                 backend=backend_name).double().to(device)
        return sgd_loss_curve(lambda: head(net(x), y),
                              list(net.parameters()) + list(head.parameters()), lr=0.1, steps=100)

    assert_curves_agree(train(backend), train("reference"), tol=1e-6)


def test_presets_and_overrides():
    assert PRESETS["arcface"] == dict(scale=64.0, m2=0.5)
    assert PRESETS["cosface"] == dict(scale=64.0, m3=0.4)
    assert PRESETS["elastic_cosface_plus"] == dict(scale=64.0, m3=0.35, m3_std=0.02,
                                                   elastic_plus=True)
    module = MarginCrossEntropy("cosface", m3=0.35, label_smoothing=0.1)
    assert module.kwargs == dict(scale=64.0, m3=0.35, label_smoothing=0.1)
    cos = torch.rand(4, 9) * 2 - 1
    target = torch.randint(0, 9, (4,))
    want = fusedloss.margin_cross_entropy(cos, target, scale=64.0, m3=0.35, label_smoothing=0.1)
    assert torch.equal(module(cos, target), want)
    with pytest.raises(ValueError, match="unknown loss preset 'sphereface2'"):
        MarginCrossEntropy("sphereface2")


def test_head_holds_one_weight_initialised_like_insightface():
    torch.manual_seed(0)
    head = MarginSoftmaxHead(64, 5000, "combined")
    params = dict(head.named_parameters())
    assert list(params) == ["weight"] and params["weight"].shape == (5000, 64)
    assert abs(float(head.weight.std()) - 0.01) < 5e-4 and abs(float(head.weight.mean())) < 5e-4
    emb = torch.randn(8, 64)
    target = torch.randint(0, 5000, (8,))
    want = fusedloss.linear_margin_cross_entropy(emb, head.weight, target, scale=64.0, m1=1.0,
                                                 m2=0.3, m3=0.2)
    assert torch.equal(head(emb, target), want)


def _inputs(x=(2, 4), w=(3, 4), target=None, w_dtype=torch.float32):
    """Embeddings and weight of the given shapes, and `target` (class 0 for every row if None)."""
    return lambda: (torch.randn(*x), torch.randn(*w, dtype=w_dtype),
                    torch.zeros(x[0], dtype=torch.long) if target is None else target)


BAD = [
    ("1-D embeddings", _inputs(x=(4,)), {}, ValueError, "embeddings must be 2-D"),
    ("dtype mismatch", _inputs(w_dtype=torch.float64), {}, TypeError, "must share a dtype"),
    ("D mismatch", _inputs(w=(3, 5)), {}, ValueError, "must share D"),
    ("target out of range", _inputs(target=torch.tensor([0, 3])), {}, ValueError,
     r"target\[1\] = 3 is outside \[0, 3\)"),
    ("zero block", _inputs(), dict(block_size=0), ValueError, "block_size must be a positive int"),
    ("negative scale", _inputs(), dict(scale=-1.0), ValueError, "scale must be > 0"),
    ("negative lse_square_scale", _inputs(), dict(lse_square_scale=-1.0), ValueError,
     "lse_square_scale must be >= 0"),
    ("no classes", _inputs(w=(0, 4)), {}, ValueError, r"C >= 1"),
]


@pytest.mark.parametrize("args,kwargs,exc,message", bad_input_params(BAD))
def test_bad_input_raises_clear_error(args, kwargs, exc, message):
    with pytest.raises(exc, match=message):
        fusedloss.linear_margin_cross_entropy(*args(), **kwargs)
