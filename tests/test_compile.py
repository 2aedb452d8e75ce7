"""torch.library.opcheck of every op and torch.compile(fullgraph=True) of every public function,
from the op registry (fusedloss.specs). Triton twins are opchecked on CUDA only: their
fake-tensor checks cannot run on CPU tensors under the interpreter (DESIGN.md, Testing)."""
import pytest
import torch

from fusedloss import _ops, specs

from conftest import assert_compiled_matches_eager, cpu_and_gpu_backends, spec_backends

REGISTRY = specs.registry()


def _op_sample_params(*backends):
    """(spec, k) for every opcheck sample of every spec with kernels on one of `backends`."""
    return [pytest.param(spec, k, id=f"{spec.name}-{op}-{k}")
            for spec in REGISTRY if set(backends) & set(spec.backends)
            for k, (op, _) in enumerate(spec.op_samples("cpu"))]


@pytest.mark.parametrize("spec,k", _op_sample_params("cpu"))
def test_opcheck_cpu(spec, k):
    op, args = spec.op_samples("cpu")[k]
    torch.library.opcheck(getattr(torch.ops.fusedloss, op), args)


@pytest.mark.gpu
@pytest.mark.parametrize("spec,k", _op_sample_params("cuda", "triton"))
def test_opcheck_gpu(spec, k):
    op, args = spec.op_samples("cuda")[k]
    if "cuda" in _ops.kernel_backends(op):
        torch.library.opcheck(getattr(torch.ops.fusedloss, op), args)
    if "triton" in spec.backends:
        torch.library.opcheck(_ops.OPS[op].triton, args)


def _compile_params():
    compilable = [s for s in REGISTRY if s.compile_sample is not None]
    params = []
    for p in cpu_and_gpu_backends():
        backend, device = p.values
        params += [pytest.param(s, backend, device, id=f"{s.name}-{p.id}", marks=p.marks)
                   for s in compilable if backend in s.backends]
    return params


@pytest.mark.parametrize("spec,backend,device", _compile_params())
def test_compile_fullgraph(spec, backend, device):
    sample = spec.compile_sample(device)
    call = spec.call(sample)
    inputs = [t.detach().clone().requires_grad_() if t is not None and t.is_floating_point()
              else t for t in sample.inputs]
    assert_compiled_matches_eager(lambda *args: call(backend, *args), inputs, sample.names,
                                  spec.differentiable)


def test_every_uncompiled_spec_says_why():
    for spec in REGISTRY:
        assert spec.compile_sample is not None or spec.no_compile, spec.name
