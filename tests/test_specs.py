"""The op registry (fusedloss.specs): every public name has a spec, every spec is complete,
and every spec's samples agree with the fp64 oracle, loss and gradients, on every backend
this machine can run; an empty batch behaves as F.cross_entropy's."""
import inspect

import pytest
import torch

import fusedloss
import fusedloss.nn
from fusedloss import specs

from conftest import (assert_empty_batch_like_cross_entropy, assert_exactly_as_oracle,
                      assert_matches_oracle, spec_backends)

REGISTRY = specs.registry()
MODULES = specs.module_registry()


def _public_functions():
    return {name for name in fusedloss.__all__ if not name.startswith("__")}


def _public_modules():
    return {name for name, obj in vars(fusedloss.nn).items()
            if isinstance(obj, type) and issubclass(obj, torch.nn.Module)
            and obj.__module__.startswith("fusedloss.")}


def test_every_public_function_has_a_spec_or_a_reason():
    covered = {s.name for s in REGISTRY} | set(specs.NO_SPEC)
    missing = _public_functions() - covered
    assert not missing, f"public names without an OpSpec or a NO_SPEC reason: {sorted(missing)}"
    stale = {s.name for s in REGISTRY} - _public_functions()
    assert not stale, f"specs of names that fusedloss does not export: {sorted(stale)}"


def test_every_public_module_has_a_spec_or_a_reason():
    covered = {s.name for s in MODULES} | set(specs.NO_SPEC)
    missing = _public_modules() - covered
    assert not missing, f"fusedloss.nn modules without a ModuleSpec: {sorted(missing)}"
    assert {s.name for s in MODULES} <= _public_modules()


def test_names_are_unique():
    names = [s.name for s in REGISTRY] + [s.name for s in MODULES]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("spec", REGISTRY, ids=lambda s: s.name)
def test_spec_is_complete(spec):
    assert spec.family in specs.FAMILIES
    assert callable(spec.function)
    assert inspect.getmodule(spec.oracle).__name__ == f"fusedloss.reference.{spec.family}", \
        "the oracle lives in fusedloss.reference.<family>"
    assert set(spec.backends) <= set(specs.BACKENDS) and spec.backends
    for op in spec.ops:
        assert hasattr(torch.ops.fusedloss, op), f"no op fusedloss::{op}"
    assert spec.fuzz is not None or spec.no_fuzz, "a fuzz strategy or the reason for none"
    assert spec.samples("cpu"), "no samples"
    assert spec.bad_inputs(), "no bad inputs"
    assert "backend" in inspect.signature(spec.function).parameters


def test_every_op_has_opcheck_samples():
    ops = {op for s in REGISTRY for op in s.ops}
    sampled = {op for s in REGISTRY for op, _ in s.op_samples("cpu")}
    assert ops <= sampled, f"ops without opcheck samples: {sorted(ops - sampled)}"


def _sample_params():
    params = []
    for p in spec_backends(REGISTRY):
        spec = p.values[0]
        params += [pytest.param(*p.values, k, id=f"{p.id}-{sample.id}", marks=p.marks)
                   for k, sample in enumerate(spec.samples("cpu"))]
    return params


@pytest.mark.parametrize("spec,backend,device,k", _sample_params())
def test_samples_match_the_oracle(spec, backend, device, k):
    sample = spec.samples(device)[k]
    if spec.differentiable:
        assert_matches_oracle(spec.call(sample), backend, sample.inputs, sample.names)
    else:
        assert_exactly_as_oracle(spec.call(sample), backend, sample.inputs)


@pytest.mark.parametrize("spec,backend,device",
                         spec_backends([s for s in REGISTRY if s.empty_batch is not None]))
def test_empty_batch_behaves_like_cross_entropy(spec, backend, device):
    assert_empty_batch_like_cross_entropy(
        lambda reduction: spec.empty_batch(backend, device, reduction))
