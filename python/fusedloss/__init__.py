"""fusedloss: fused loss kernels for classification with very many classes and metric learning."""
from . import nn
from ._ops import BackendStatus, backends
from .margin import margin_cross_entropy
from .margin_linear import linear_margin_cross_entropy
from .spherical import spherical_z_loss
from .spherical_linear import linear_spherical_z_loss

__version__ = "0.1.0"
__all__ = ["BackendStatus", "backends", "linear_margin_cross_entropy", "linear_spherical_z_loss",
           "margin_cross_entropy", "nn", "spherical_z_loss", "__version__"]
