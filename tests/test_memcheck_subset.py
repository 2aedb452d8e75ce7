"""The GPU tests that bench/gpu_check.sh runs under compute-sanitizer (memcheck, and racecheck
for the CUDA kernels): the memcheck samples of every spec (fusedloss.specs), shaped to reach
the tail blocks (sizes that are not multiples of any block), ignored rows and strided inputs,
on every GPU backend of the op, each checked against the fp64 reference."""
import pytest

from fusedloss import specs

from conftest import assert_close, loss_and_grads, oracle, spec_backends

pytestmark = pytest.mark.gpu


def _params():
    params = []
    for p in spec_backends(specs.registry(), gpu_only=True):
        spec = p.values[0]
        params += [pytest.param(*p.values, k, id=f"{p.id}-{sample.id}", marks=p.marks)
                   for k, sample in enumerate(spec.memcheck())]
    return params


@pytest.mark.parametrize("spec,backend,device,k", _params())
def test_memcheck_subset(spec, backend, device, k):
    """The sample on CUDA in its own dtype against the reference on fp64 CPU copies."""
    sample = spec.memcheck()[k]
    call = spec.call(sample)
    inputs = [None if t is None else t.to(device) for t in sample.inputs]
    got = loss_and_grads(call, backend, inputs)
    want = oracle(call, sample.inputs)
    for g, w, what in zip(got, want, sample.names):
        assert (g is None) == (w is None), what
        if g is not None:
            assert_close(g.cpu(), w, sample.dtype, f"{spec.name} {sample.id}: {what}")
