"""fusedloss: fused loss kernels for classification with very many classes and metric learning."""
from . import nn
from ._ops import BackendStatus, backends
from .margin import margin_cross_entropy
from .margin_linear import linear_margin_cross_entropy
from . import distributed
from .sharded import linear_sharded_margin_cross_entropy, sharded_margin_cross_entropy
from .spherical import spherical_z_loss
from .spherical_linear import linear_spherical_z_loss

__version__ = "0.1.0"
__all__ = ["BackendStatus", "backends", "linear_margin_cross_entropy", "linear_spherical_z_loss",
           "distributed", "linear_sharded_margin_cross_entropy", "sharded_margin_cross_entropy",
           "margin_cross_entropy", "nn", "spherical_z_loss", "__version__"]

from .pairs import (batch_hard_triplet_loss, contrastive_loss, info_nce_loss,  # noqa: E402
                    multi_similarity_loss, multi_similarity_miner, supcon_loss)

__all__ += ["batch_hard_triplet_loss", "contrastive_loss", "info_nce_loss", "multi_similarity_loss",
            "multi_similarity_miner", "supcon_loss"]
