"""fusedloss.linear_spherical_z_loss (the spherical Z-loss of the output layer, without the
N x C outputs) against the code users write today, `o = h @ w.T + bias`, its row mean and
spread, then softplus(a (b - z_c)) / a, in eager mode and under torch.compile: forward +
backward with respect to hidden [N, d], weight [C, d] and bias [C] at a small CPU shape.
The full-size case (N=2048, d=256, C=100,000) is `python -m fusedloss.bench --suite
spherical`."""
import pytest
import torch

fusedloss = pytest.importorskip("fusedloss")
# the exact baseline of `python -m fusedloss.bench --family spherical`
from fusedloss.bench import spherical_linear_baseline  # noqa: E402

N, D, C = 256, 64, 20_000
A, B = 1.0, 0.0
GROUP = f"linear spherical Z fp32 N={N} d={D} C={C:,} fwd+bwd"


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(N, D, generator=g) * D ** -0.5).requires_grad_(True)
    w = (torch.randn(C, D, generator=g) * D ** -0.5).requires_grad_(True)
    bias = (torch.randn(C, generator=g) * 0.1).requires_grad_(True)
    target = torch.randint(0, C, (N,), generator=g)
    return h, w, bias, target


@pytest.fixture(scope="module")
def baseline_loss(inputs):
    h, w, bias, target = inputs
    with torch.no_grad():
        return spherical_linear_baseline(h, w, target, bias, A, B).item()


def _fused(h, w, target, bias, a, b):
    return fusedloss.linear_spherical_z_loss(h, w, target, bias, a=a, b=b, backend="auto")


CONTENDERS = {
    "fusedloss": lambda: _fused,
    "baseline-eager": lambda: spherical_linear_baseline,
    "baseline-compile": lambda: torch.compile(spherical_linear_baseline, dynamic=False),
}


@pytest.mark.parametrize("contender", list(CONTENDERS))
def test_linear_spherical_z_loss(benchmark, fwd_bwd_benchmark, inputs, baseline_loss, contender):
    benchmark.group = GROUP
    benchmark.extra_info.update(N=N, D=D, C=C, a=A, b=B, dtype="float32")
    h, w, bias, target = inputs
    fn = CONTENDERS[contender]()

    def clear():
        h.grad = None
        w.grad = None
        bias.grad = None

    def step():
        loss = fn(h, w, target, bias, A, B)
        loss.backward()
        return loss

    clear()
    loss = step()  # compiles, for the compiled baseline; and checks the work is the same
    torch.testing.assert_close(loss.item(), baseline_loss, rtol=1e-4, atol=0.0)
    for leaf in (h, w, bias):
        assert leaf.grad is not None and leaf.grad.shape == leaf.shape
        assert torch.isfinite(leaf.grad).all()
    fwd_bwd_benchmark(step, clear)
