"""fusedloss: fused loss kernels for classification with very many classes and metric learning.

Names. A public function is named by its input form, then the loss (``linear_`` takes
embeddings and a weight instead of logits, ``sharded_`` splits the classes across ranks); an
op (``torch.ops.fusedloss.<op>``, schema in fusedloss/_schemas.py) and a module file are named
family first. The op registry, :mod:`fusedloss.specs`, states once which family and ops each
public function has (``OpSpec.family``, ``OpSpec.ops``); ``python -m fusedloss.info`` prints
that table with the backends that run each function here. The modules of ``fusedloss.nn`` sit
in ``nn/<family>.py``.
"""
from . import distributed, nn
from ._ops import BackendStatus, backends
from .ldr_kl import ldr_kl_loss, linear_ldr_kl_loss
from .margin import margin_cross_entropy
from .margin_linear import linear_margin_cross_entropy
from .multilabel import multilabel_margin_cross_entropy
from .multilabel_linear import linear_multilabel_margin_cross_entropy
from .multilabel_sharded import (linear_sharded_multilabel_margin_cross_entropy,
                                 sharded_multilabel_margin_cross_entropy)
from .pairs import (batch_hard_triplet_loss, contrastive_loss, info_nce_loss,
                    multi_similarity_loss, multi_similarity_miner, orthogonal_projection_loss,
                    supcon_loss, unpg_negatives)
from .sharded import linear_sharded_margin_cross_entropy, sharded_margin_cross_entropy
from .spherical import spherical_z_loss
from .spherical_linear import linear_spherical_z_loss

__version__ = "0.1.0"
__all__ = ["BackendStatus", "backends", "batch_hard_triplet_loss", "contrastive_loss",
           "distributed", "info_nce_loss", "ldr_kl_loss", "linear_ldr_kl_loss",
           "linear_margin_cross_entropy",
           "linear_multilabel_margin_cross_entropy",
           "linear_sharded_margin_cross_entropy",
           "linear_sharded_multilabel_margin_cross_entropy", "linear_spherical_z_loss",
           "margin_cross_entropy", "multi_similarity_loss", "multi_similarity_miner",
           "multilabel_margin_cross_entropy", "nn",
           "orthogonal_projection_loss",
           "sharded_margin_cross_entropy", "sharded_multilabel_margin_cross_entropy",
           "spherical_z_loss", "supcon_loss", "unpg_negatives",
           "__version__"]
