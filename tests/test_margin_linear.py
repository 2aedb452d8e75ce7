"""linear_margin_cross_entropy and the nn heads: every backend against the fp64 reference,
loss, embedding gradient and weight gradient."""
import subprocess
import sys

import pytest
import torch

import fusedloss
from fusedloss.nn import PRESETS, MarginCrossEntropy, MarginSoftmaxHead

from conftest import assert_close, device_backends

VARIANTS = {
    "arcface": dict(m2=0.5),
    "cosface": dict(m3=0.35),
    "sphereface": dict(m1=1.35),
    "combined": dict(m1=1.0, m2=0.3, m3=0.2),
    "arcface_detached": dict(m2=0.5, margin_grad="detached"),
    "elastic_arc_plus": dict(m2=0.5, m2_std=0.0175, elastic_plus=True),
    "elastic_cos": dict(m3=0.35, m3_std=0.05),
    "smoothing": dict(m2=0.5, label_smoothing=0.1),
    "z_loss_term": dict(m2=0.5, lse_square_scale=1e-4),
    "z_loss_term_smoothing": dict(m3=0.35, label_smoothing=0.1, lse_square_scale=1e-2),
    "plain_linear_ce": dict(scale=1.0, normalize=False),
}


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


def run(x, w, target, backend, **kw):
    xg, wg = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    gen = torch.Generator(device=x.device).manual_seed(99)
    loss = fusedloss.linear_margin_cross_entropy(xg, wg, target, backend=backend, generator=gen, **kw)
    loss.backward(torch.arange(1.0, loss.numel() + 1, device=x.device).reshape(loss.shape))
    return loss.detach(), xg.grad, wg.grad


def check(x, w, target, backend, **kw):
    loss, gx, gw = run(x, w, target, backend, **kw)
    want = run(x.double().cpu(), w.double().cpu(), target.cpu(), "reference", **kw)
    dtype = x.dtype
    assert loss.dtype == dtype and gx.dtype == dtype and gw.dtype == dtype
    for got, expected, what in zip((loss, gx, gw), want, ("loss", "grad embeddings", "grad weight")):
        assert_close(got.cpu(), expected, dtype, what)


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
    gen = torch.Generator().manual_seed(0)
    classes, dim, n = 12, 10, 48
    centres = torch.randn(classes, dim, generator=gen) * 2
    labels = torch.randint(0, classes, (n,), generator=gen)
    data = centres[labels] + 0.5 * torch.randn(n, dim, generator=gen)

    def train(backend_name):
        torch.manual_seed(3)
        net = torch.nn.Sequential(torch.nn.Linear(dim, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
        head = MarginSoftmaxHead(16, classes, "arcface", scale=16.0, m2=0.2, backend=backend_name)
        net, head = net.double().to(device), head.double().to(device)
        opt = torch.optim.SGD(list(net.parameters()) + list(head.parameters()), lr=0.1)
        x, y = data.double().to(device), labels.to(device)
        curve = []
        for _ in range(100):
            loss = head(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            curve.append(loss.item())
        return torch.tensor(curve)

    fused, reference = train(backend), train("reference")
    assert fused[-1] < 0.5 * fused[0]
    torch.testing.assert_close(fused, reference, rtol=1e-6, atol=1e-6)


def test_presets_and_overrides():
    assert PRESETS["arcface"] == dict(scale=64.0, m2=0.5)
    assert PRESETS["cosface"] == dict(scale=64.0, m3=0.4)
    assert PRESETS["elastic_cosface_plus"] == dict(scale=64.0, m3=0.35, m3_std=0.02, elastic_plus=True)
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


BAD = [
    ("1-D embeddings", lambda: (torch.randn(4), torch.randn(3, 4), torch.zeros(4, dtype=torch.long)),
     {}, ValueError, "embeddings must be 2-D"),
    ("dtype mismatch", lambda: (torch.randn(2, 4), torch.randn(3, 4, dtype=torch.float64),
                                torch.zeros(2, dtype=torch.long)), {}, TypeError, "must share a dtype"),
    ("D mismatch", lambda: (torch.randn(2, 4), torch.randn(3, 5), torch.zeros(2, dtype=torch.long)),
     {}, ValueError, "must share D"),
    ("target out of range", lambda: (torch.randn(2, 4), torch.randn(3, 4), torch.tensor([0, 3])),
     {}, ValueError, r"target\[1\] = 3 is outside \[0, 3\)"),
    ("zero block", lambda: (torch.randn(2, 4), torch.randn(3, 4), torch.zeros(2, dtype=torch.long)),
     dict(block_size=0), ValueError, "block_size must be a positive int"),
    ("negative scale", lambda: (torch.randn(2, 4), torch.randn(3, 4), torch.zeros(2, dtype=torch.long)),
     dict(scale=-1.0), ValueError, "scale must be > 0"),
    ("negative lse_square_scale", lambda: (torch.randn(2, 4), torch.randn(3, 4),
                                           torch.zeros(2, dtype=torch.long)),
     dict(lse_square_scale=-1.0), ValueError, "lse_square_scale must be >= 0"),
    ("no classes", lambda: (torch.randn(2, 4), torch.randn(0, 4), torch.zeros(2, dtype=torch.long)),
     {}, ValueError, r"C >= 1"),
]


@pytest.mark.parametrize("args,kwargs,exc,message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_raises_clear_error(args, kwargs, exc, message):
    with pytest.raises(exc, match=message):
        fusedloss.linear_margin_cross_entropy(*args(), **kwargs)
