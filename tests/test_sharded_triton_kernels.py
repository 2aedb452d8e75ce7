"""The Triton kernels of the sharded ops (triton_kernels/sharded.py), called directly, through
the checks of test_sharded_cpu_kernels.py: against the dense contracts of
python/fusedloss/reference/sharded.py run in fp64, the stats [N, 3] and the gradients from
coef, at the logit level and fused with the linear layer. Every margin variant, per-row
margins, targets in this shard / in another / ignored, class_start > 0, C_local = 1 and 0,
sizes off the blocks, fp64 / fp32 / fp16 / bf16, non-contiguous inputs. On CPU the kernels run
under TRITON_INTERPRET=1 (conftest sets it), so the shapes stay small."""
import pytest
import torch

from conftest import HAS_CUDA
from test_sharded_cpu_kernels import (DTYPES, VARIANTS, Kernels, check_empty_shard,
                                      check_linear, check_logits)

# log(0) = -inf is the lse_other of a row without classes j != y here; the interpreter's numpy
# warns about it.
pytestmark = [pytest.mark.triton,
              pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")]


@pytest.fixture(scope="module")
def triton():
    """The Triton kernels (conftest skips these tests where Triton is not installed)."""
    from fusedloss.triton_kernels import sharded

    return Kernels(sharded, "cuda" if HAS_CUDA else "cpu")


# ---------------------------------------------------------------------------------------
# Logit level: sharded_margin_stats, sharded_margin_grad


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logit_variants(triton, variant):
    check_logits(triton, 7, 45, 20, 30, variant, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", ["arcface", "combined"])
def test_logit_dtypes(triton, dtype, variant):
    check_logits(triton, 6, 37, 3, 11, variant, dtype)


@pytest.mark.parametrize("n,c_local,class_start,extra", [
    (1, 1, 0, 0),     # the whole problem is one class
    (4, 1, 9, 3),     # one class per shard: rows 0 and 1 have no class j != y here
    (5, 300, 7, 5),   # several chunks of the interpreter's 128 columns
    (3, 17, 0, 40),   # the first shard
    (4, 16, 50, 0),   # the last shard
])
def test_logit_odd_shapes(triton, n, c_local, class_start, extra):
    check_logits(triton, n, c_local, class_start, extra, "arcface", torch.float32)


@pytest.mark.parametrize("layout", ["strided", "transposed"])
def test_logit_non_contiguous(triton, layout):
    check_logits(triton, 5, 33, 4, 6, "combined", torch.float32, layout=layout)


@pytest.mark.parametrize("variant", ["arcface", "sphereface"])
def test_logit_detached_margin(triton, variant):
    check_logits(triton, 6, 29, 2, 7, variant, torch.float64, detach_margin=True)


# ---------------------------------------------------------------------------------------
# Fused linear: sharded_margin_linear_stats, sharded_margin_linear_grad


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_linear_variants(triton, variant):
    check_linear(triton, 6, 41, 19, 13, 20, variant, torch.float32, normalize=variant != "plain")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_dtypes(triton, dtype, normalize):
    variant = "arcface" if normalize else "plain"
    check_linear(triton, 5, 33, 16, 6, 9, variant, dtype, normalize=normalize)


@pytest.mark.parametrize("n,c_local,d,class_start,extra,block_size", [
    (1, 1, 3, 0, 0, 0),       # (D = 1: cos = +-1 and a normalised gradient of 0 + rounding)
    (4, 1, 5, 9, 3, 0),       # one class per shard
    (7, 70, 33, 30, 2, 0),    # several class blocks and splits
    (21, 18, 20, 0, 7, 16),   # several row blocks, block_size set
])
def test_linear_odd_shapes(triton, n, c_local, d, class_start, extra, block_size):
    check_linear(triton, n, c_local, d, class_start, extra, "combined", torch.float32,
                 block_size=block_size)


def test_linear_non_contiguous_detached(triton):
    check_linear(triton, 5, 27, 18, 3, 4, "arcface", torch.float32, detach_margin=True,
                 transposed=True)


def test_empty_shard(triton):
    """A shard without classes (more ranks than classes): nothing here, by every op."""
    check_empty_shard(triton)
