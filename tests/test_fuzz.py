"""Differential fuzzing: for every public op, hypothesis draws shapes (1, primes, sizes just
around the kernels' block sizes), dtypes, hyperparameters, ignored rows and strides, runs every
backend available here and compares the loss and the gradients with the reference run in fp64
on the same rounded inputs (tolerances of tests/conftest.py).

Two profiles: the default one runs CI_EXAMPLES cases per (op, backend); the `slow` tests run
SLOW_EXAMPLES. A failure hypothesis finds becomes a fixed bug and a plain regression test in
the op's own test file.
"""
from dataclasses import dataclass
from typing import Callable, Dict, List

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fusedloss

from conftest import HAS_CUDA, assert_close, device_backends

CI_EXAMPLES = 12
SLOW_EXAMPLES = 300

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# Sizes around the blocks of the kernels: CPU chunks of 2048, Triton blocks of 128 under the
# interpreter (4096 on GPU), the fused linear tiles of 16..128, plus 1 and primes.
SMALL_SIZES = [1, 2, 3, 5, 7, 13, 15, 16, 17, 31, 32, 33, 63, 64, 65, 97, 127, 128, 129]
CLASS_SIZES = SMALL_SIZES + [255, 256, 257, 2047, 2048, 2049]

# Normalisation only for D > 1: a 1-D row normalises to +-1 whatever its value, so the
# gradient through F.normalize is 0 in exact arithmetic and rounding noise of size
# eps |g| / |x| in fp32, which no comparison with the fp64 oracle can judge.


@dataclass
class Case:
    """One drawn input: the call, and the tensors that take a gradient."""
    call: Callable[[str], torch.Tensor]  # backend -> loss
    leaves: List[torch.Tensor]  # fp64 / low-precision inputs whose gradients are compared
    dtype: torch.dtype


def _generator(data) -> torch.Generator:
    """The source of every tensor value of a case, seeded from hypothesis' data so that a
    failing case replays exactly."""
    return torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))


def _strided(t: torch.Tensor, draw_transpose: bool) -> torch.Tensor:
    """t itself, or the same values in a column-major (non-contiguous) layout."""
    return t.t().contiguous().t() if draw_transpose else t


def _targets(data, n, c, ignore_index=-100):
    target = torch.tensor(data.draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n)))
    ignored = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    target[torch.tensor(ignored, dtype=torch.bool)] = ignore_index
    return target


def _margin_options(data):
    kw = dict(scale=data.draw(st.sampled_from([1.0, 16.0, 64.0])),
              m1=data.draw(st.sampled_from([1.0, 1.35, 2.0])),
              m2=data.draw(st.sampled_from([0.0, 0.3, 0.5])),
              m3=data.draw(st.sampled_from([0.0, 0.2, 0.35])),
              margin_grad=data.draw(st.sampled_from(["exact", "detached"])),
              label_smoothing=data.draw(st.sampled_from([0.0, 0.1])),
              lse_square_scale=data.draw(st.sampled_from([0.0, 1e-4])),
              reduction=data.draw(st.sampled_from(["mean", "sum", "none"])))
    return kw


def _cosines(data, n, c, dtype, device):
    cos = (torch.rand(n, c, dtype=torch.float64, generator=_generator(data)) * 2 - 1).to(dtype)
    return _strided(cos, data.draw(st.booleans())).to(device)


def _margin_inputs(data, device, triton):
    n = data.draw(st.sampled_from(SMALL_SIZES[:12]))
    c = data.draw(st.sampled_from(SMALL_SIZES if triton else CLASS_SIZES))
    dtype = data.draw(st.sampled_from(DTYPES))
    cos = _cosines(data, n, c, dtype, device).requires_grad_()
    return cos, _targets(data, n, c).to(device), _margin_options(data)


def margin_case(data, device, triton):
    cos, target, kw = _margin_inputs(data, device, triton)

    def call(backend):
        return fusedloss.margin_cross_entropy(cos, target, backend=backend, **kw)
    return Case(call, [cos], cos.dtype)


def sharded_case(data, device, triton):
    """The sharded op at world size 1 (no process group): the whole class range here."""
    cos, target, kw = _margin_inputs(data, device, triton)

    def call(backend):
        return fusedloss.sharded_margin_cross_entropy(
            cos, target, class_start=0, num_classes=cos.shape[1], backend=backend, **kw)
    return Case(call, [cos], cos.dtype)


def _linear_inputs(data, device):
    n = data.draw(st.sampled_from(SMALL_SIZES[:12]))
    c = data.draw(st.sampled_from(SMALL_SIZES))
    d = data.draw(st.sampled_from([1, 3, 16, 17, 33]))
    dtype = data.draw(st.sampled_from(DTYPES))
    gen = _generator(data)
    x = torch.randn(n, d, dtype=torch.float64, generator=gen).to(dtype)
    x = _strided(x, data.draw(st.booleans()))
    w = torch.randn(c, d, dtype=torch.float64, generator=gen).to(dtype)
    x, w = x.to(device).requires_grad_(), w.to(device).requires_grad_()
    target = _targets(data, n, c).to(device)
    kw = _margin_options(data)
    kw["normalize"] = d > 1 and data.draw(st.booleans())  # D > 1: see the top
    if not kw["normalize"]:
        kw["scale"] = 1.0
    return x, w, target, kw


def margin_linear_case(data, device, triton):
    x, w, target, kw = _linear_inputs(data, device)

    def call(backend):
        return fusedloss.linear_margin_cross_entropy(x, w, target, backend=backend, **kw)
    return Case(call, [x, w], x.dtype)


def linear_sharded_case(data, device, triton):
    x, w, target, kw = _linear_inputs(data, device)

    def call(backend):
        return fusedloss.linear_sharded_margin_cross_entropy(
            x, w, target, class_start=0, num_classes=w.shape[0], backend=backend, **kw)
    return Case(call, [x, w], x.dtype)


def spherical_case(data, device, triton):
    n = data.draw(st.sampled_from(SMALL_SIZES[:12]))
    # C >= 3: with two classes the standardised outputs are always +-1, the loss is constant
    # and its gradient is rounding noise around 0 of size eps / sigma, which no relative
    # comparison can judge (test_spherical checks that case on its own).
    c = data.draw(st.sampled_from([s for s in (SMALL_SIZES if triton else CLASS_SIZES) if s >= 3]))
    dtype = data.draw(st.sampled_from(DTYPES))
    spread = data.draw(st.sampled_from([1e-2, 1.0, 30.0]))
    offset = data.draw(st.sampled_from([0.0, 5.0]))
    logits = torch.randn(n, c, dtype=torch.float64, generator=_generator(data))
    logits = (logits * spread + offset).to(dtype)
    logits = _strided(logits, data.draw(st.booleans())).to(device).requires_grad_()
    target = _targets(data, n, c).to(device)
    kw = dict(a=data.draw(st.sampled_from([1.0, 0.5])), b=data.draw(st.sampled_from([0.0, 0.1])),
              reduction=data.draw(st.sampled_from(["mean", "sum", "none"])))

    def call(backend):
        return fusedloss.spherical_z_loss(logits, target, backend=backend, **kw)
    return Case(call, [logits], dtype)


def _labels(data, n, num_classes):
    return torch.tensor(data.draw(st.lists(st.integers(0, num_classes - 1), min_size=n,
                                           max_size=n)), dtype=torch.long)


PAIR_LOSSES = {
    "multi_similarity": lambda data: dict(
        alpha=data.draw(st.sampled_from([2.0, 0.5])), beta=data.draw(st.sampled_from([50.0, 5.0])),
        base=data.draw(st.sampled_from([0.5, 0.0])), epsilon=data.draw(st.sampled_from([0.1, 0.5])),
        mining=data.draw(st.booleans())),
    # SupCon (PML's semantics) averages over the rows whose loss is not 0: a row whose one
    # positive outscores every other pair by ~16..35 has a loss of 1e-15..1e-7, 0 in fp32 but
    # not in fp64, so fp32 and the oracle would average over different rows. Normalised rows
    # with t >= 0.2 keep every gap below 10 (a row loss above e^-10).
    "supcon": lambda data: dict(temperature=data.draw(st.sampled_from([0.2, 1.0])),
                                normalize=True),
    "contrastive": lambda data: dict(distance=data.draw(st.sampled_from(["euclidean", "cosine"]))),
    "batch_hard_triplet": lambda data: dict(
        margin=data.draw(st.sampled_from([0.05, 0.5])),
        distance=data.draw(st.sampled_from(["euclidean", "cosine"]))),
}


def pair_case(data, device, triton):
    """One of the pair losses: a batch with few classes (so that rows have positives), with or
    without a reference set, normalised or raw."""
    name = data.draw(st.sampled_from(sorted(PAIR_LOSSES)))
    n = data.draw(st.sampled_from([1, 2, 3, 5, 16, 17, 33] + ([] if triton else [64, 65, 129])))
    dtype = data.draw(st.sampled_from([torch.float64, torch.float32]))
    kw = PAIR_LOSSES[name](data)
    # Low D and duplicated rows draw the near-duplicate pairs whose euclidean distance the
    # kernels take from the differences. Batch-hard mining gets no duplicates: two copies of a
    # row tie as every anchor's hardest pick, and which copy wins (and gets the gradient) then
    # rests on the last bit of a GEMM. A 1-D row is never normalised: x / |x| is
    # ill-conditioned there.
    d = data.draw(st.sampled_from([3, 16, 17, 64] if kw.get("normalize") else [1, 3, 16, 17, 64]))
    duplicates = name != "batch_hard_triplet" and data.draw(st.booleans())
    classes = data.draw(st.integers(1, 6))
    gen = _generator(data)
    x = torch.randn(n, d, dtype=torch.float64, generator=gen).to(dtype)
    if duplicates:
        x[-1] = x[0]
    x = _strided(x, data.draw(st.booleans())).to(device).requires_grad_()
    labels = _labels(data, n, classes).to(device)
    leaves, ref_kw = [x], {}
    if data.draw(st.booleans()):
        m = data.draw(st.sampled_from([1, 7, 31, 64]))
        ref = torch.randn(m, d, dtype=torch.float64, generator=gen).to(dtype).to(device)
        if duplicates:
            ref[0] = x[0].detach()
        ref.requires_grad_(data.draw(st.booleans()))
        ref_kw = dict(ref_embeddings=ref, ref_labels=_labels(data, m, classes).to(device))
        leaves.append(ref)
    kw.setdefault("normalize", d > 1 and data.draw(st.booleans()))
    kw.update(ref_kw)
    fn = getattr(fusedloss, f"{name}_loss")

    def call(backend):
        return fn(x, labels, backend=backend, **kw)
    return Case(call, leaves, dtype)


def info_nce_case(data, device, triton):
    n = data.draw(st.sampled_from([1, 2, 5, 16, 17, 33]))
    d = data.draw(st.sampled_from([1, 8, 17]))
    dtype = data.draw(st.sampled_from([torch.float64, torch.float32]))
    gen = _generator(data)
    q = torch.randn(n, d, dtype=torch.float64, generator=gen).to(dtype).to(device).requires_grad_()
    k = torch.randn(n, d, dtype=torch.float64, generator=gen).to(dtype).to(device).requires_grad_()
    kw = dict(temperature=data.draw(st.sampled_from([0.07, 1.0])),
              symmetric=data.draw(st.booleans()), normalize=d > 1 and data.draw(st.booleans()))

    def call(backend):
        return fusedloss.info_nce_loss(q, k, backend=backend, **kw)
    return Case(call, [q, k], dtype)


# The ops without a CUDA kernel: on CUDA tensors their "auto" backend is Triton.
NO_CUDA_KERNEL = {"sharded_margin_cross_entropy", "linear_sharded_margin_cross_entropy",
                  "pair losses", "info_nce_loss", "linear_margin_cross_entropy"}

# op name -> case builder: the inputs and the call of one drawn case
OPS: Dict[str, Callable] = {
    "margin_cross_entropy": margin_case,
    "linear_margin_cross_entropy": margin_linear_case,
    "sharded_margin_cross_entropy": sharded_case,
    "linear_sharded_margin_cross_entropy": linear_sharded_case,
    "spherical_z_loss": spherical_case,
    "pair losses": pair_case,
    "info_nce_loss": info_nce_case,
}


def _run(case: Case, backend: str):
    """Loss and gradients (None where the input takes none) of one backend."""
    for leaf in case.leaves:
        leaf.grad = None
    loss = case.call(backend)
    weights = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device)
    (loss.reshape(-1) * weights).sum().backward()
    return loss.detach(), [None if leaf.grad is None else leaf.grad.clone() for leaf in case.leaves]


def _reference_fp64(case: Case):
    """The same call on fp64 CPU copies of the inputs, with the reference backend."""
    originals = [leaf.data for leaf in case.leaves]
    try:
        for leaf in case.leaves:
            leaf.data = leaf.data.double().cpu()
        return _run(case, "reference")
    finally:
        for leaf, data in zip(case.leaves, originals):
            leaf.data = data


def _check(op: str, backend: str, device: str, data):
    case = OPS[op](data, device, backend == "triton")
    loss, grads = _run(case, backend)
    want_loss, want_grads = _reference_fp64(case)
    assert loss.dtype == case.dtype
    assert_close(loss.cpu(), want_loss, case.dtype, f"{op} loss")
    for i, (got, want) in enumerate(zip(grads, want_grads)):
        assert (got is None) == (want is None), f"{op}: gradient {i} missing on one side"
        if got is not None:
            assert_close(got.cpu(), want, case.dtype, f"{op} grad {i}")


CASES_RUN: Dict[tuple, int] = {}  # (op, backend) -> cases checked, for the assertion below


def _fuzz_test(examples: int):
    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(data=st.data())
    def body(op, backend, device, data):
        if backend == "cuda" and not HAS_CUDA:
            pytest.skip("needs a CUDA device")
        if backend == "cuda" and op in NO_CUDA_KERNEL:
            pytest.skip(f"{op} has no cuda kernel (auto runs triton on CUDA tensors)")
        _check(op, backend, device, data)
        CASES_RUN[op, backend] = CASES_RUN.get((op, backend), 0) + 1
    return body


def _fuzz(op, backend, device, examples):
    """Runs the profile and asserts that it checked (nearly) as many cases as it asked for:
    hypothesis stops early when it cannot find new ones, which would pass silently."""
    CASES_RUN.pop((op, backend), None)
    _fuzz_test(examples)(op, backend, device)
    ran = CASES_RUN.get((op, backend), 0)
    assert ran >= 0.9 * examples, f"{op} on {backend}: only {ran} of {examples} cases ran"


@pytest.mark.parametrize("backend,device", device_backends())
@pytest.mark.parametrize("op", list(OPS))
def test_fuzz_against_reference(op, backend, device):
    _fuzz(op, backend, device, CI_EXAMPLES)


@pytest.mark.slow
@pytest.mark.parametrize("backend,device", device_backends())
@pytest.mark.parametrize("op", list(OPS))
def test_fuzz_against_reference_slow(op, backend, device):
    _fuzz(op, backend, device, SLOW_EXAMPLES)
