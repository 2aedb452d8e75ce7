"""fusedloss.multilabel_margin_cross_entropy, its fused linear form and ldr_kl_loss against the
code users run today, eager and under torch.compile: forward + backward at small CPU shapes
(the cases of `python -m fusedloss.bench --family multilabel --family multilabel_linear
--family ldr_kl`, shrunk)."""
import pytest

pytest.importorskip("fusedloss")
from fusedloss.benchmarks.ldr_kl import ldr_kl_family  # noqa: E402
from fusedloss.benchmarks.multilabel import (K, multilabel_family,  # noqa: E402
                                             multilabel_linear_family)

N, C, D = 256, 20_000, 128
LOGITS = dict(N=N, C=C, dtype="float32", K=K)
LINEAR = dict(N=N, C=C, dtype="float32", K=K, D=D)
CASES = [("multilabel", multilabel_family, LOGITS), ("multilabel_linear",
                                                     multilabel_linear_family, LINEAR),
         ("ldr_kl", ldr_kl_family, dict(N=N, C=C, dtype="float32"))]


@pytest.mark.parametrize("name,make,case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("contender", ["fusedloss", "baseline-eager", "baseline-compile"])
def test_multilabel_and_ldr_kl(bench_contender, name, make, case, contender):
    family = make("cpu", False, ["float32"])
    bench_contender(family, dict(case, label=name), contender, f"{name} fp32 N={N} C={C:,}",
                    dict(case))
