"""The GPU tests that bench/gpu_check.sh runs under compute-sanitizer (memcheck, and racecheck
for the CUDA kernels): one small case per family and GPU backend, shaped to reach the tail
blocks (sizes that are not multiples of any block), ignored rows and strided inputs, each
checked against the fp64 reference. (The margin op's case is in test_margin.py.)"""
import pytest
import torch

import fusedloss

from conftest import assert_close, loss_and_grads

pytestmark = pytest.mark.gpu


def _against_reference(call, tensors, dtype):
    """call(backend, *tensors) on CUDA in `dtype` against the reference on fp64 CPU copies of
    the same (unrounded) tensors."""
    def cast(t, device, float_dtype):
        return t.to(device=device, dtype=float_dtype) if t.is_floating_point() else t.to(device)

    got = loss_and_grads(call, call.backend, [cast(t, "cuda", dtype) for t in tensors])
    want = loss_and_grads(call, "reference", [cast(t, "cpu", torch.float64) for t in tensors])
    for g, w in zip(got, want):
        assert_close(g.cpu(), w, dtype, call.__name__)


def _case(backend):
    def wrap(fn):
        fn.backend = backend
        return fn
    return wrap


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_memcheck_subset_margin_linear_triton(dtype):
    x, w = torch.randn(37, 72), torch.randn(1031, 72)
    target = torch.randint(0, 1031, (37,))
    target[5] = -100

    @_case("triton")
    def margin_linear(backend, x, w, t):
        return fusedloss.linear_margin_cross_entropy(x, w, t, m2=0.5, backend=backend,
                                                     reduction="none")
    _against_reference(margin_linear, [x, w, target], dtype)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_memcheck_subset_spherical(backend, dtype):
    logits = torch.randn(9, 2 * 1031)[:, ::2]  # strided rows
    target = torch.randint(0, 1031, (9,))
    target[3] = -100

    @_case(backend)
    def spherical(backend, o, t):
        return fusedloss.spherical_z_loss(o, t, backend=backend, reduction="none")
    _against_reference(spherical, [logits, target], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_memcheck_subset_sharded_triton(dtype):
    cos = torch.rand(11, 1031) * 2 - 1
    target = torch.randint(0, 1031, (11,))
    target[2] = -100
    x, w = torch.randn(11, 40), torch.randn(1031, 40)

    @_case("triton")
    def sharded(backend, c, t):
        return fusedloss.sharded_margin_cross_entropy(c, t, class_start=0, num_classes=1031,
                                                      m2=0.5, backend=backend, reduction="none")

    @_case("triton")
    def linear_sharded(backend, x, w, t):
        return fusedloss.linear_sharded_margin_cross_entropy(
            x, w, t, class_start=0, num_classes=1031, m3=0.35, backend=backend, reduction="none")
    _against_reference(sharded, [cos, target], dtype)
    _against_reference(linear_sharded, [x, w, target], dtype)


@pytest.mark.parametrize("dtype", [torch.float32], ids=str)
def test_memcheck_subset_pairs_triton(dtype):
    emb = torch.randn(67, 40)
    labels = torch.arange(67) % 9
    bank, bank_labels = torch.randn(131, 40), torch.arange(131) % 9

    @_case("triton")
    def ms(backend, e, y):
        return fusedloss.multi_similarity_loss(e, y, backend=backend)

    @_case("triton")
    def ms_bank(backend, e, y, b, by):
        return fusedloss.multi_similarity_loss(e, y, b, by, backend=backend)

    @_case("triton")
    def contrastive(backend, e, y):
        return fusedloss.contrastive_loss(e, y, backend=backend)

    @_case("triton")
    def triplet(backend, e, y):
        return fusedloss.batch_hard_triplet_loss(e, y, backend=backend)
    for call, tensors in ((ms, [emb, labels]), (ms_bank, [emb, labels, bank, bank_labels]),
                          (contrastive, [emb, labels]), (triplet, [emb, labels])):
        _against_reference(call, tensors, dtype)
