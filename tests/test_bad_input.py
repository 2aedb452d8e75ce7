"""Every bad input of every public function and module (their specs, fusedloss.specs) raises a
clear exception before any kernel runs: the type and a fragment of the message are checked,
on every backend of the function that this machine can run, so that a backend never raises
another type for the same mistake."""
import pytest

from fusedloss import specs

from conftest import spec_backends


def _function_cases():
    params = []
    for p in spec_backends(specs.registry()):
        spec = p.values[0]
        params += [pytest.param(*p.values, k, id=f"{p.id}-{case.id}", marks=p.marks)
                   for k, case in enumerate(spec.bad_inputs())
                   if (not case.backends or p.values[1] in case.backends)
                   and p.values[2] in case.devices]
    return params


@pytest.mark.parametrize("spec,backend,device,k", _function_cases())
def test_bad_input_raises_a_clear_error(spec, backend, device, k):
    case = spec.bad_inputs()[k]
    with pytest.raises(case.exception) as info:
        case.call(backend, device)
    assert case.message in str(info.value)


_MODULE_CASES = [pytest.param(spec, k, id=f"{spec.name}-{case.id}")
                 for spec in specs.module_registry() for k, case in enumerate(spec.bad_inputs())]


@pytest.mark.parametrize("spec,k", _MODULE_CASES)
def test_module_bad_input_raises_a_clear_error(spec, k):
    case = spec.bad_inputs()[k]
    with pytest.raises(case.exception) as info:
        case.call("auto", "cpu")
    assert case.message in str(info.value)


def test_every_module_has_bad_inputs():
    for spec in specs.module_registry():
        assert spec.bad_inputs(), spec.name
