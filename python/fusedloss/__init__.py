"""fusedloss: fused loss kernels for classification with very many classes and metric learning.

Names. A public function is named by its input form, then the loss (``linear_`` takes
embeddings and a weight instead of logits, ``sharded_`` splits the classes across ranks); an
op (``torch.ops.fusedloss.<op>``, schema in fusedloss/_schemas.py) and a module file are named
family first. Every public function maps to its family, ops and module as follows:

==================================== ========= ============================== ====================
public name                          family    op(s)                          module
==================================== ========= ============================== ====================
margin_cross_entropy                 margin    margin_cross_entropy           margin.py
linear_margin_cross_entropy          margin    margin_linear_cross_entropy    margin_linear.py
sharded_margin_cross_entropy         sharded   sharded_margin_stats,          sharded.py
                                               sharded_margin_grad
linear_sharded_margin_cross_entropy  sharded   sharded_margin_linear_stats,   sharded.py
                                               sharded_margin_linear_grad
multi_similarity_loss                pairs     pair_extrema, pair_row_stats,  pairs.py
                                               pair_row_stats_backward
multi_similarity_miner               pairs     pair_extrema                   pairs.py
supcon_loss, info_nce_loss,          pairs     pair_row_stats,                pairs.py
contrastive_loss                               pair_row_stats_backward
batch_hard_triplet_loss              pairs     pair_extrema                   pairs.py
spherical_z_loss                     spherical spherical_z_loss               spherical.py
linear_spherical_z_loss              spherical none (torch matrix products)   spherical_linear.py
==================================== ========= ============================== ====================

The modules of ``fusedloss.nn`` sit in ``nn/<family>.py``: MarginCrossEntropy and
MarginSoftmaxHead (margin), PartialFC (sharded), CrossBatchMemory (pairs), SphericalZLoss,
SphericalLinear and FactoredSphericalLinear (spherical; the factored update in
spherical_factored.py).
"""
from . import distributed, nn
from ._ops import BackendStatus, backends
from .margin import margin_cross_entropy
from .margin_linear import linear_margin_cross_entropy
from .pairs import (batch_hard_triplet_loss, contrastive_loss, info_nce_loss,
                    multi_similarity_loss, multi_similarity_miner, supcon_loss)
from .sharded import linear_sharded_margin_cross_entropy, sharded_margin_cross_entropy
from .spherical import spherical_z_loss
from .spherical_linear import linear_spherical_z_loss

__version__ = "0.1.0"
__all__ = ["BackendStatus", "backends", "batch_hard_triplet_loss", "contrastive_loss",
           "distributed", "info_nce_loss", "linear_margin_cross_entropy",
           "linear_sharded_margin_cross_entropy", "linear_spherical_z_loss",
           "margin_cross_entropy", "multi_similarity_loss", "multi_similarity_miner", "nn",
           "sharded_margin_cross_entropy", "spherical_z_loss", "supcon_loss", "__version__"]
