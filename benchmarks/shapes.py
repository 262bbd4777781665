"""Parameter lists shaped like real models: moved to psi_cuda/apps/bench.py (kept for old imports)."""
from psi_cuda.apps.bench import large, numel, resnet50, vit_b16  # noqa: F401

MODELS = {"resnet50": resnet50, "vit_b16": vit_b16}
