"""The local work of one rank of a class-sharded ArcFace: fusedloss.sharded_margin_cross_entropy
(logits) and linear_sharded_margin_cross_entropy (embeddings and a weight shard) on a whole
shard (class_start 0, num_classes C_local), without a process group and over a 1-rank gloo
group, against the single-process ops on the same shard and the PartialFC-style chain
users write, in eager mode and under torch.compile: forward + backward at a small CPU
shape. Every contender's loss and gradients are first checked against the eager chain's.
The 8-GPU per-rank shapes are `python -m fusedloss.bench --family sharded`.

And the multi-rank case in small: fusedloss.nn.PartialFC over 2 spawned gloo processes, one
step at C = 10,000 and one at C = 20,000, each checked against the single-process
MarginSoftmaxHead (loss and gradients), and the bytes each rank sent, counted per kind: the
same at both C (the combining all_reduces are 16 N bytes, the embedding all-gather N / W x D
floats, the embedding-gradient reduction N x D), none bypassing fusedloss.distributed. The
full-size case (C = 1,000,000, D = 512, W = 1, 2, 4) is `python -m fusedloss.bench --suite
sharded --case "gloo rank"`."""
import dataclasses

import pytest
import torch

pytest.importorskip("fusedloss")
# the inputs and the contenders of `python -m fusedloss.bench --family sharded`
from fusedloss.benchmarks.sharded import (RankPool, cases_of, one_rank_group,  # noqa: E402
                                          partialfc_case, partialfc_inputs, sent_summary,
                                          sharded_family)

N, D, C_LOCAL = 256, 128, 20_000
CASES = {form: cases_of(form, N, [C_LOCAL], ["float32"], D)[0] for form in ("logit", "linear")}
IN_GROUP = "fusedloss-sharded (1-rank gloo group)"
CONTENDERS = ("fusedloss-sharded", IN_GROUP, "fusedloss (unsharded op)", "baseline-eager",
              "baseline-compile")


def _with_group_contender(fam, case):
    """The family with one more contender, the one its 1-rank group cases time: IN_GROUP,
    the sharded function over the default process group (`gloo_group`'s, in this test)."""
    group_case = dict(case, variant=f"{case['variant']}-group", group_backend="gloo")
    in_group = fam.seen_by(group_case).contenders[IN_GROUP]
    return dataclasses.replace(fam, contenders={**fam.contenders, IN_GROUP: in_group})


FAMILY = sharded_family("cpu", False, ["float32"])
FAMILIES = {form: _with_group_contender(FAMILY, case) for form, case in CASES.items()}


@pytest.fixture
def gloo_group():
    """A 1-rank gloo process group for the test, destroyed after it."""
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    if dist.is_initialized():
        pytest.fail("a default process group exists already: the test would not own it")
    group, _ = one_rank_group(torch.device("cpu"))
    yield group
    dist.destroy_process_group()


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("form", list(CASES))
def test_sharded(bench_contender, request, form, contender):
    if contender == IN_GROUP:
        request.getfixturevalue("gloo_group")  # the group that the contender's step joins
    case = CASES[form]
    bench_contender(FAMILIES[form], case, contender, f"{case['label']} fwd+bwd",
                    {k: v for k, v in case.items() if k != "label"})


# --- PartialFC over W gloo processes -----------------------------------------------------------

WORLD, N_MULTI, D_MULTI = 2, 16, 64
C_MULTI = (10_000, 20_000)


@pytest.fixture(scope="module")
def rank_pool():
    """2 spawned gloo ranks on 127.0.0.1 (group timeout 60 s), closed after the module."""
    pool = RankPool(WORLD, timeout_s=60)
    yield pool
    pool.close()


def _single_process(case):
    """(loss, [grad of the embeddings, grad of the weight]) of MarginSoftmaxHead on the
    global batch and classifier of the case."""
    inputs = partialfc_inputs(case, "cpu")
    loss = inputs["head"](inputs["x"], inputs["target"])
    loss.backward()
    return loss.item(), [inputs["x"].grad, inputs["head"].weight.grad]


def _gathered(ranks, key, shape, scale=1.0):
    """A leaf of `shape` whose .grad is the ranks' `key` arrays, concatenated in rank order."""
    leaf = torch.zeros(shape, requires_grad=True)
    leaf.grad = torch.cat([torch.from_numpy(r[key]) for r in ranks]) * scale
    return leaf


@pytest.mark.dist
def test_partialfc_ranks(benchmark, fwd_bwd_benchmark, assert_agrees, rank_pool):
    sent = {}
    for c in C_MULTI:
        case = partialfc_case(WORLD, N_MULTI, D_MULTI, c)
        rank_pool.setup(case)
        ranks = rank_pool.step(with_grads=True)
        ref_loss, ref_grads = _single_process(case)
        # each rank's embedding gradient is W x the exact one (ddp_grad_scale=True)
        leaves = [_gathered(ranks, "grad_x", (N_MULTI, D_MULTI), 1.0 / WORLD),
                  _gathered(ranks, "grad_w", (c, D_MULTI))]
        for rank in ranks:
            assert_agrees(torch.tensor(rank["loss"]), leaves, ref_loss, ref_grads)
        sent[c] = sent_summary(ranks)
    small, large = (sent[c] for c in C_MULTI)
    assert small == large, "the bytes sent per step depend on the number of classes"
    fp32 = 4
    assert small["combining"] == [4 * N_MULTI * fp32, 2]  # all_reduce max of N, sum of 3N
    assert small["embedding all-gather"] == [N_MULTI // WORLD * D_MULTI * fp32, 1]
    assert small["embedding-grad reduction"] == [N_MULTI * D_MULTI * fp32, 1]
    assert small["error agreement"][0] > 0
    assert set(small) == {"error agreement", "combining", "embedding all-gather",
                          "label all-gather", "embedding-grad reduction"}  # none bypassing
    # fusedloss.distributed

    benchmark.group = f"{case['label']} fwd+bwd"
    benchmark.extra_info.update(world=WORLD, N=N_MULTI, D=D_MULTI, C=C_MULTI[-1])
    fwd_bwd_benchmark(rank_pool.step, lambda: None)
