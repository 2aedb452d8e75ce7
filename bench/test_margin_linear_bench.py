"""fusedloss.linear_margin_cross_entropy (ArcFace on embeddings and class centres) against the
chain users run today, `F.linear(F.normalize(x), F.normalize(w)).clamp(-1, 1)` then the
ArcFace chain, in eager mode and under torch.compile: forward + backward with respect to
both x [N, D] and w [C, D] at a small CPU shape."""
import pytest

pytest.importorskip("fusedloss")
# the inputs and the contenders of `python -m fusedloss.bench --family margin_linear`
from fusedloss.benchmarks.margin import margin_linear_family  # noqa: E402

N, D, C = 256, 128, 20_000
SCALE, M2 = 64.0, 0.5
GROUP = f"margin_linear arcface fp32 N={N} D={D} C={C:,} fwd+bwd"
CASE = dict(N=N, C=C, D=D, dtype="float32", variant="arcface", normalize=True, scale=SCALE,
            m2=M2)
FAMILY = margin_linear_family("cpu", False, [CASE["dtype"]])


@pytest.mark.parametrize("contender", list(FAMILY.contenders))
def test_margin_linear_arcface(bench_contender, contender):
    bench_contender(FAMILY, CASE, contender, GROUP,
                    dict(N=N, D=D, C=C, scale=SCALE, m2=M2, dtype="float32"))


# The plain LM-head variant (normalize=False, scale=1, no margin) at a small shape, with torch's
# own chunked F.linear_cross_entropy among the contenders (the full case is in the family).
LM_CASE = dict(N=N, C=C, D=D, dtype="float32", variant="lm-head", normalize=False, scale=1.0,
               m2=0.0)
LM_GROUP = f"margin_linear LM head fp32 N={N} D={D} C={C:,} fwd+bwd"


@pytest.mark.parametrize("contender", list(FAMILY.seen_by(LM_CASE).contenders))
def test_margin_linear_lm_head(bench_contender, contender):
    bench_contender(FAMILY, LM_CASE, contender, LM_GROUP, dict(N=N, D=D, C=C, dtype="float32"))
