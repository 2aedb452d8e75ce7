"""nn.Module wrappers of the fusedloss ops, one file per family:

    margin      MarginCrossEntropy, MarginSoftmaxHead, PRESETS and preset()
    ldr_kl      LDRKLLoss, LDRKLLinear
    sharded     PartialFC
    pairs       CrossBatchMemory
    spherical   SphericalZLoss, SphericalLinear, FactoredSphericalLinear

Every module checks its constructor arguments as the function it calls checks them, so a bad
preset or hyperparameter raises at construction, not at the first forward."""
from .ldr_kl import LDRKLLinear, LDRKLLoss
from .margin import PRESETS, MarginCrossEntropy, MarginSoftmaxHead, preset
from .pairs import CrossBatchMemory
from .sharded import PartialFC
from .spherical import FactoredSphericalLinear, SphericalLinear, SphericalZLoss

__all__ = ["PRESETS", "CrossBatchMemory", "FactoredSphericalLinear", "LDRKLLinear",
           "LDRKLLoss", "MarginCrossEntropy",
           "MarginSoftmaxHead", "PartialFC", "SphericalLinear", "SphericalZLoss", "preset"]
