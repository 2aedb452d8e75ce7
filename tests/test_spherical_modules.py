"""nn modules of the spherical family: SphericalZLoss, SphericalLinear and
FactoredSphericalLinear. (Their construction-time checks: tests/test_modules.py.)"""
import torch

import fusedloss
import fusedloss.spherical_factored
from fusedloss.nn import FactoredSphericalLinear, SphericalLinear, SphericalZLoss


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


def test_spherical_z_loss_module_forwards_every_keyword():
    logits = torch.randn(5, 6, dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 3, 4])
    kw = dict(a=2.0, b=0.5, ignore_index=3, reduction="none", backend="reference")
    module = SphericalZLoss(**kw)
    got = module(logits, target)
    assert got[3] == 0
    assert torch.equal(got, fusedloss.spherical_z_loss(logits, target, **kw))


def test_spherical_linear_forwards_every_keyword():
    torch.manual_seed(1)
    kw = dict(a=0.7, b=1.0, ignore_index=2, reduction="sum", backend="reference")
    layer = SphericalLinear(8, 12, **kw).double()
    hidden = torch.randn(4, 8, dtype=torch.float64)
    target = torch.tensor([1, 2, 3, 11])
    want = fusedloss.linear_spherical_z_loss(hidden, layer.weight, target, layer.bias, **kw)
    assert torch.equal(layer(hidden, target), want)
    assert "reduction='sum'" in repr(layer)


def test_factored_layer_is_one_class_under_both_names():
    assert FactoredSphericalLinear is fusedloss.spherical_factored.FactoredSphericalLinear
    assert fusedloss.nn.FactoredSphericalLinear is FactoredSphericalLinear
