"""fusedloss.linear_spherical_z_loss (the spherical Z-loss of the output layer, without the
N x C outputs) against the code users write today, `o = h @ w.T + bias`, its row mean and
spread, then softplus(a (b - z_c)) / a, in eager mode and under torch.compile: forward +
backward with respect to hidden [N, d], weight [C, d] and bias [C] at a small CPU shape.
The full-size case (N=2048, d=256, C=100,000) is `python -m fusedloss.bench --suite
spherical`."""
import pytest

pytest.importorskip("fusedloss")
# the inputs and the contenders of `python -m fusedloss.bench --family spherical`
from fusedloss.benchmarks.spherical import spherical_family  # noqa: E402

N, D, C = 256, 64, 20_000
A, B = 1.0, 0.0
GROUP = f"linear spherical Z fp32 N={N} d={D} C={C:,} fwd+bwd"
CASE = dict(N=N, C=C, D=D, dtype="float32", variant="linear-spherical", a=A, b=B)
FAMILY = spherical_family("cpu", False, [CASE["dtype"]])


@pytest.mark.parametrize("contender", list(FAMILY.contenders))
def test_linear_spherical_z_loss(bench_contender, contender):
    bench_contender(FAMILY, CASE, contender, GROUP,
                    dict(N=N, D=D, C=C, a=A, b=B, dtype="float32"))
