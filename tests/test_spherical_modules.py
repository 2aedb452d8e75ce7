"""nn modules of the spherical family: SphericalZLoss and SphericalLinear."""
import torch

import fusedloss
from fusedloss.nn import SphericalLinear, SphericalZLoss


def test_spherical_z_loss_module_matches_function():
    logits = torch.randn(6, 11)
    target = torch.randint(0, 11, (6,))
    module = SphericalZLoss(a=0.5, b=1.0, reduction="sum")
    assert torch.equal(module(logits, target),
                       fusedloss.spherical_z_loss(logits, target, a=0.5, b=1.0, reduction="sum"))


def test_spherical_linear_forward_logits_and_topk():
    torch.manual_seed(0)
    layer = SphericalLinear(16, 300, a=1.0, b=0.0).double()
    assert [name for name, _ in layer.named_parameters()] == ["weight", "bias"]
    hidden = torch.randn(9, 16, dtype=torch.float64)
    target = torch.randint(0, 300, (9,))
    want = fusedloss.reference.spherical.spherical_z_loss(layer.logits(hidden), target)
    torch.testing.assert_close(layer(hidden, target), want)
    full = layer.logits(hidden).topk(7, dim=1)
    for block in (1, 5, 64, 1000):
        values, indices = layer.topk(hidden, 7, block=block)
        torch.testing.assert_close(values, full.values)
        assert torch.equal(indices, full.indices)


def test_spherical_linear_without_bias():
    layer = SphericalLinear(8, 20, bias=False)
    assert layer.bias is None
    hidden = torch.randn(4, 8)
    assert torch.equal(layer.logits(hidden), hidden @ layer.weight.t())
