"""Optimizers: thin torch.optim.Optimizer classes over the fused ops."""
from .psi_sgd import PSISGD

__all__ = ["PSISGD"]
