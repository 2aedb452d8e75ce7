"""The pair losses across ranks in small: the contenders of `python -m fusedloss.bench
--family pairs_ranks` (fusedloss group=, PML's DistributedLossWrapper, open_clip's all-gather
with dense logits) over 2 spawned gloo processes on a global batch of 96 x 16, one step each,
their losses checked against the single-process fused op on the global batch, and the bytes
of the fused contender counted per kind: every collective through fusedloss.distributed's
tags. The full-size cases (4,096 x 128, W = 2 and 4) are the family's."""
import pytest

pytest.importorskip("fusedloss")
pytest.importorskip("pytorch_metric_learning")
from fusedloss import distributed as fdist  # noqa: E402
from fusedloss.benchmarks.pairs_ranks import (LOSSES, PairRankBench, rank_case,  # noqa: E402
                                              rank_inputs)
from fusedloss.benchmarks.sharded import RankPool  # noqa: E402

WORLD, N, D = 2, 96, 16


@pytest.fixture(scope="module")
def rank_pool():
    pool = RankPool(WORLD, timeout_s=60, bench_class=PairRankBench)
    yield pool
    pool.close()


@pytest.mark.parametrize("loss", list(LOSSES))
def test_contenders_agree(rank_pool, loss):
    case = dict(rank_case(loss, WORLD), N=N, D=D)
    inputs = rank_inputs(case, "cpu")
    expected = float(inputs["loss"](inputs["a"], inputs["b"], inputs["labels"]))
    impls = ("fusedloss", "pml", "dense") if loss == "info_nce" else ("fusedloss", "pml")
    for impl in impls:
        rank_pool.setup({**case, "impl": impl})
        reports = rank_pool.step()
        for rank, report in enumerate(reports):
            assert report["loss"] == pytest.approx(expected, rel=1e-4), (impl, rank)
        if impl == "fusedloss":
            kinds = set(reports[0]["sent"])
            assert kinds <= set(fdist.TRAFFIC_KINDS), kinds
            assert {fdist.EMBEDDING_ALL_GATHER, fdist.EMBEDDING_GRAD} <= kinds, kinds
