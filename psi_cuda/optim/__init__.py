"""Optimizers: thin torch.optim.Optimizer classes over the fused ops."""
from .bnp_sgd import BNPSGD
from .psi_adam import PSIAdam
from .psi_sgd import PSISGD

__all__ = ["BNPSGD", "PSIAdam", "PSISGD"]
