"""fusedloss: fused loss kernels for classification with very many classes and metric learning."""
from ._ops import BackendStatus, backends
from .margin import margin_cross_entropy

__version__ = "0.1.0"
__all__ = ["BackendStatus", "backends", "margin_cross_entropy", "__version__"]
