"""fusedloss.margin_cross_entropy (ArcFace) against the baseline users run today, in eager
mode and under torch.compile: forward + backward at a small CPU shape."""
import pytest

pytest.importorskip("fusedloss")
# the inputs and the contenders of `python -m fusedloss.bench --family margin`
from fusedloss.benchmarks.margin import margin_family  # noqa: E402

N, C = 256, 20_000
SCALE, M2 = 64.0, 0.5
GROUP = f"margin arcface fp32 N={N} C={C:,} fwd+bwd"
# cos uniform in (-0.8, 0.8): theta + m2 < pi for every target, where cos(theta + m2) and
# fusedloss's continued cosine coincide, so that both compute the same loss.
CASE = dict(N=N, C=C, dtype="float32", variant="arcface", scale=SCALE, m2=M2)
FAMILY = margin_family("cpu", False, [CASE["dtype"]])


@pytest.mark.parametrize("contender", list(FAMILY.contenders))
def test_margin_arcface(bench_contender, contender):
    bench_contender(FAMILY, CASE, contender, GROUP,
                    dict(N=N, C=C, scale=SCALE, m2=M2, dtype="float32"))
