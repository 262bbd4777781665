"""psi_cuda: fused PSI-manifold optimizers and Batch Normalization Preconditioning for PyTorch."""
from . import ops, reference
from .bnp import BNP
from .groups import param_groups
from .optim import BNPSGD, PSIAdam, PSISGD

__all__ = ["BNP", "BNPSGD", "PSIAdam", "PSISGD", "ops", "param_groups", "reference"]
__version__ = "0.1.0"
