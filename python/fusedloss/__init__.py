"""fusedloss: fused loss kernels for classification with very many classes and metric learning."""
from . import nn
from ._ops import BackendStatus, backends
from .margin import margin_cross_entropy
from .margin_linear import linear_margin_cross_entropy

__version__ = "0.1.0"
__all__ = ["BackendStatus", "backends", "linear_margin_cross_entropy", "margin_cross_entropy", "nn",
           "__version__"]
