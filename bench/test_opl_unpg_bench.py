"""The orthogonal projection loss and the UNPG head against the authors' formulations (the
families "opl" and "unpg" of `python -m fusedloss.bench`), forward + backward at small CPU
shapes: every contender's loss and gradients are first checked against the eager baseline's.
The compiled baselines run once each (one compilation)."""
import pytest

pytest.importorskip("fusedloss")
# the inputs and the contenders of `python -m fusedloss.bench --family opl / unpg`
from fusedloss.benchmarks.pairs import opl_family, unpg_family  # noqa: E402

OPL = opl_family("cpu", False, ["float32"])
OPL_CASES = {case["absolute"]: dict(case, N=512, C=512, label=case["label"].replace(
    "4,096", "512")) for case in OPL.cases}
UNPG = unpg_family("cpu", False, ["float32"])
UNPG_CASE = dict(UNPG.cases[0], N=128, C=2000, D=64, label="UNPG CosFace head N=128 D=64 C=2,000")


@pytest.mark.parametrize("contender", list(OPL.contenders))
@pytest.mark.parametrize("absolute", [False, True])
def test_opl(bench_contender, absolute, contender):
    case = OPL_CASES[absolute]
    bench_contender(OPL, case, contender, f"opl {case['label']} fwd+bwd",
                    {k: v for k, v in case.items() if k != "label"})


@pytest.mark.parametrize("contender", list(UNPG.contenders))
def test_unpg_head(bench_contender, contender):
    bench_contender(UNPG, UNPG_CASE, contender, f"unpg {UNPG_CASE['label']} fwd+bwd",
                    {k: v for k, v in UNPG_CASE.items() if k != "label"})
