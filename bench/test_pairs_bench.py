"""The pair losses of fusedloss (Multi-Similarity with its miner, SupCon, symmetric InfoNCE,
contrastive, batch-hard triplet, Multi-Similarity against a memory bank) against their
dense reference (backend="reference") and against pytorch-metric-learning as its users
write it (miner + loss): forward + backward at small CPU shapes. The reference also runs
under torch.compile for Multi-Similarity (one compilation; `python -m fusedloss.bench
--family pairs` compiles every loss, at the full sizes). Every contender's loss and
gradients are first checked against the eager reference's."""
import pytest

pytest.importorskip("fusedloss")
# the inputs and the contenders of `python -m fusedloss.bench --family pairs`
from fusedloss.benchmarks.pairs import cases_of, pairs_family  # noqa: E402

N, D = 256, 64  # a batch that is its own reference
BANK_N, BANK_M = 64, 2048  # queries against a memory bank
CASES = {c["variant"]: c for v in ("ms", "supcon", "info_nce", "contrastive", "triplet")
         for c in cases_of(v, [N], D, ["float32"])}
CASES["ms-bank"] = cases_of("ms-bank", [BANK_N], D, ["float32"], Ms=[BANK_M])[0]
FAMILY = pairs_family("cpu", False, ["float32"])
COMPILED = ("ms",)
PARAMS = [(v, c) for v in CASES for c in FAMILY.contenders
          if c != "baseline-compile" or v in COMPILED]


@pytest.mark.parametrize("variant, contender", PARAMS)
def test_pairs(bench_contender, variant, contender):
    case = CASES[variant]
    bench_contender(FAMILY, case, contender, f"pairs {case['label']} fwd+bwd",
                    {k: v for k, v in case.items() if k != "label"})
