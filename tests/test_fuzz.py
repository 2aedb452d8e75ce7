"""Differential fuzzing: for every public op with a fuzz strategy in its spec
(fusedloss.specs), hypothesis draws shapes (1, primes, sizes just around the kernels' block
sizes), dtypes, hyperparameters, ignored rows and strides, runs every backend of the op
available here and compares the loss and the gradients with the reference run in fp64 on the
same rounded inputs (tolerances of tests/conftest.py).

Two profiles: the default one runs CI_EXAMPLES cases per (op, backend); the `slow` tests run
SLOW_EXAMPLES. A failure hypothesis finds becomes a fixed bug and a plain regression test in
the op's own test file.
"""
from typing import Dict

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusedloss import specs
from fusedloss.specs import FuzzCase

from conftest import assert_close, spec_backends

CI_EXAMPLES = 12
SLOW_EXAMPLES = 300

FUZZED = [s for s in specs.registry() if s.fuzz is not None]


def _run(case: FuzzCase, backend: str):
    """Loss and gradients (None where the input takes none) of one backend."""
    for leaf in case.leaves:
        leaf.grad = None
    loss = case.call(backend)
    weights = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device)
    (loss.reshape(-1) * weights).sum().backward()
    return loss.detach(), [None if leaf.grad is None else leaf.grad.clone() for leaf in case.leaves]


def _reference_fp64(case: FuzzCase):
    """The same call on fp64 CPU copies of the inputs, with the reference backend."""
    originals = [leaf.data for leaf in case.leaves]
    try:
        for leaf in case.leaves:
            leaf.data = leaf.data.double().cpu()
        return _run(case, "reference")
    finally:
        for leaf, data in zip(case.leaves, originals):
            leaf.data = data


def _check(spec, backend: str, device: str, data):
    op = spec.name
    case = spec.fuzz(data, device, backend == "triton")
    if not spec.differentiable:
        got, want = case.call(backend), case.call("reference")
        assert torch.equal(got.cpu(), want.cpu()), f"{op}: {got} != {want}"
        return
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
    def body(spec, backend, device, data):
        _check(spec, backend, device, data)
        CASES_RUN[spec.name, backend] = CASES_RUN.get((spec.name, backend), 0) + 1
    return body


def _fuzz(spec, backend, device, examples):
    """Runs the profile and asserts that it checked (nearly) as many cases as it asked for:
    hypothesis stops early when it cannot find new ones, which would pass silently."""
    CASES_RUN.pop((spec.name, backend), None)
    _fuzz_test(examples)(spec, backend, device)
    ran = CASES_RUN.get((spec.name, backend), 0)
    assert ran >= 0.9 * examples, f"{spec.name} on {backend}: only {ran} of {examples} cases ran"


@pytest.mark.parametrize("spec,backend,device", spec_backends(FUZZED))
def test_fuzz_against_reference(spec, backend, device):
    _fuzz(spec, backend, device, CI_EXAMPLES)


@pytest.mark.slow
@pytest.mark.parametrize("spec,backend,device", spec_backends(FUZZED))
def test_fuzz_against_reference_slow(spec, backend, device):
    _fuzz(spec, backend, device, SLOW_EXAMPLES)


def test_every_spec_without_fuzzing_says_why():
    for spec in specs.registry():
        assert spec.fuzz is not None or spec.no_fuzz, spec.name
