"""fusedloss.margin_cross_entropy (ArcFace) against the baseline users run today, in eager
mode and under torch.compile: forward + backward at a small CPU shape."""
import pytest
import torch

fusedloss = pytest.importorskip("fusedloss")
from fusedloss.bench import arcface_baseline  # noqa: E402 - the exact baseline of `python -m fusedloss.bench`

N, C = 256, 20_000
SCALE, M2 = 64.0, 0.5
GROUP = f"margin arcface fp32 N={N} C={C:,} fwd+bwd"


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    # cos in (-0.8, 0.8): theta + m2 < pi for every target, where cos(theta + m2) and
    # fusedloss's continued cosine coincide, so both compute the same loss.
    cos = torch.empty(N, C).uniform_(-0.8, 0.8, generator=g).requires_grad_(True)
    target = torch.randint(0, C, (N,), generator=g)
    return cos, target


@pytest.fixture(scope="module")
def baseline_loss(inputs):
    cos, target = inputs
    with torch.no_grad():
        return arcface_baseline(cos, target, SCALE, M2).item()


def _fused(cos, target, scale, m2):
    return fusedloss.margin_cross_entropy(cos, target, scale=scale, m2=m2, backend="auto")


CONTENDERS = {
    "fusedloss": lambda: _fused,
    "baseline-eager": lambda: arcface_baseline,
    "baseline-compile": lambda: torch.compile(arcface_baseline, dynamic=False),
}


@pytest.mark.parametrize("contender", list(CONTENDERS))
def test_margin_arcface(benchmark, fwd_bwd_benchmark, inputs, baseline_loss, contender):
    benchmark.group = GROUP
    benchmark.extra_info.update(N=N, C=C, scale=SCALE, m2=M2, dtype="float32")
    cos, target = inputs
    fn = CONTENDERS[contender]()

    def clear():
        cos.grad = None

    def step():
        loss = fn(cos, target, SCALE, M2)
        loss.backward()
        return loss

    clear()
    loss = step()  # compiles, for the compiled baseline; and checks the work is the same
    torch.testing.assert_close(loss.item(), baseline_loss, rtol=1e-4, atol=0.0)
    assert cos.grad is not None and torch.isfinite(cos.grad).all()
    fwd_bwd_benchmark(step, clear)
