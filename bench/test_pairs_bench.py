"""The pair losses of fusedloss (Multi-Similarity with its miner, SupCon, symmetric InfoNCE,
contrastive, batch-hard triplet, Multi-Similarity against a memory bank) against their
dense reference (backend="reference") and against pytorch-metric-learning as its users
write it (miner + loss): forward + backward at small CPU shapes. The reference also runs
under torch.compile for Multi-Similarity (one compilation; `python -m fusedloss.bench
--family pairs` compiles every loss, at the full sizes). Every contender's loss and
gradients are first checked against the eager reference's."""
import pytest
import torch

fusedloss = pytest.importorskip("fusedloss")
# the inputs and the contenders of `python -m fusedloss.bench --family pairs`
from fusedloss.benchmarks.pairs import cases_of, fusedloss_loss, pair_inputs, pml_loss  # noqa: E402

N, D = 256, 64  # a batch that is its own reference
BANK_N, BANK_M = 64, 2048  # queries against a memory bank
CASES = {c["variant"]: c for v in ("ms", "supcon", "info_nce", "contrastive", "triplet")
         for c in cases_of(v, [N], D, ["float32"])}
CASES["ms-bank"] = cases_of("ms-bank", [BANK_N], D, ["float32"], Ms=[BANK_M])[0]
COMPILED = ("ms",)


def _pml(case):
    pytest.importorskip("pytorch_metric_learning")
    return pml_loss(case)


CONTENDERS = {
    "fusedloss": lambda case: fusedloss_loss(case, "auto"),
    "baseline-eager": lambda case: fusedloss_loss(case, "reference"),
    "baseline-compile": lambda case: torch.compile(fusedloss_loss(case, "reference"),
                                                   dynamic=False),
    "pml": _pml,
}
PARAMS = [(v, c) for v in CASES for c in CONTENDERS
          if c != "baseline-compile" or v in COMPILED]


@pytest.fixture(scope="module")
def inputs():
    return {v: pair_inputs(case, "cpu") for v, case in CASES.items()}


@pytest.fixture(scope="module")
def reference(inputs):
    """variant -> (loss, gradients of the leaves) of the eager reference."""
    out = {}
    for v, case in CASES.items():
        leaves = inputs[v]["leaves"]
        for leaf in leaves:
            leaf.grad = None
        loss = fusedloss_loss(case, "reference")(*inputs[v]["args"])
        loss.backward()
        out[v] = (loss.item(), [leaf.grad.clone() for leaf in leaves])
        for leaf in leaves:
            leaf.grad = None
    return out


@pytest.mark.parametrize("variant, contender", PARAMS)
def test_pairs(benchmark, fwd_bwd_benchmark, assert_agrees, inputs, reference, variant,
               contender):
    case = CASES[variant]
    benchmark.group = f"pairs {case['label']} fwd+bwd"
    benchmark.extra_info.update({k: v for k, v in case.items() if k != "label"})
    args, leaves = inputs[variant]["args"], inputs[variant]["leaves"]
    loss_of = CONTENDERS[contender](case)

    def clear():
        for leaf in leaves:
            leaf.grad = None

    def step():
        loss = loss_of(*args)
        loss.backward()
        return loss

    clear()
    loss = step()  # compiles, for the compiled baseline; and checks the work is the same
    assert_agrees(loss, leaves, *reference[variant])
    fwd_bwd_benchmark(step, clear)
