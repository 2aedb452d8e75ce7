"""fusedloss.linear_margin_cross_entropy (ArcFace on embeddings and class centres) against the
chain users run today, `F.linear(F.normalize(x), F.normalize(w)).clamp(-1, 1)` then the
ArcFace chain, in eager mode and under torch.compile: forward + backward with respect to
both x [N, D] and w [C, D] at a small CPU shape."""
import pytest
import torch

fusedloss = pytest.importorskip("fusedloss")
# the exact baseline of `python -m fusedloss.bench --family margin_linear`
from fusedloss.bench import arcface_linear_baseline  # noqa: E402

N, D, C = 256, 128, 20_000
SCALE, M2 = 64.0, 0.5
GROUP = f"margin_linear arcface fp32 N={N} D={D} C={C:,} fwd+bwd"


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g).requires_grad_(True)
    w = torch.randn(C, D, generator=g).requires_grad_(True)
    target = torch.randint(0, C, (N,), generator=g)
    return x, w, target


@pytest.fixture(scope="module")
def baseline_loss(inputs):
    x, w, target = inputs
    with torch.no_grad():
        return arcface_linear_baseline(x, w, target, SCALE, M2).item()


def _fused(x, w, target, scale, m2):
    return fusedloss.linear_margin_cross_entropy(x, w, target, scale=scale, m2=m2, backend="auto")


CONTENDERS = {
    "fusedloss": lambda: _fused,
    "baseline-eager": lambda: arcface_linear_baseline,
    "baseline-compile": lambda: torch.compile(arcface_linear_baseline, dynamic=False),
}


@pytest.mark.parametrize("contender", list(CONTENDERS))
def test_margin_linear_arcface(benchmark, fwd_bwd_benchmark, inputs, baseline_loss, contender):
    benchmark.group = GROUP
    benchmark.extra_info.update(N=N, D=D, C=C, scale=SCALE, m2=M2, dtype="float32")
    x, w, target = inputs
    fn = CONTENDERS[contender]()

    def clear():
        x.grad = None
        w.grad = None

    def step():
        loss = fn(x, w, target, SCALE, M2)
        loss.backward()
        return loss

    clear()
    loss = step()  # compiles, for the compiled baseline; and checks the work is the same
    torch.testing.assert_close(loss.item(), baseline_loss, rtol=1e-4, atol=0.0)
    for leaf in (x, w):
        assert leaf.grad is not None and leaf.grad.shape == leaf.shape
        assert torch.isfinite(leaf.grad).all()
    fwd_bwd_benchmark(step, clear)
