"""Parameter lists shaped like real models, for the step benchmark (psi_cuda.apps.bench) and the
GPU roofline model (benchmarks/gpu_static.py): ``(name, shape, manifold)`` per tensor, no tensors
made. Standard library only, so that gpu_static.py can load this file without torch.
"""
from __future__ import annotations

import math

Shape = tuple[int, ...]
ShapeList = list[tuple[str, Shape, "str | None"]]


def resnet50() -> ShapeList:
    """torchvision's ResNet-50 (25.56M parameters): bottlenecks [3, 4, 6, 3], expansion 4.
    Conv weights feed BatchNorm: channel groups; BN and fc parameters: Euclidean."""
    out = [("conv1.weight", (64, 3, 7, 7), "channel"), ("bn1.weight", (64,), None),
           ("bn1.bias", (64,), None)]
    inplanes = 64
    for li, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), start=1):
        for b in range(blocks):
            pre = f"layer{li}.{b}"
            convs = [(f"{pre}.conv1", (width, inplanes, 1, 1)), (f"{pre}.conv2", (width, width, 3, 3)),
                     (f"{pre}.conv3", (width * 4, width, 1, 1))]
            if b == 0:
                convs.append((f"{pre}.downsample.0", (width * 4, inplanes, 1, 1)))
            for i, (name, shape) in enumerate(convs, start=1):
                bn = f"{pre}.bn{i}" if "downsample" not in name else f"{pre}.downsample.1"
                out += [(f"{name}.weight", shape, "channel"), (f"{bn}.weight", (shape[0],), None),
                        (f"{bn}.bias", (shape[0],), None)]
            inplanes = width * 4
    out += [("fc.weight", (1000, 2048), None), ("fc.bias", (1000,), None)]
    return out


def vit_b16() -> ShapeList:
    """ViT-B/16 (86.6M parameters). Pre-norm blocks: the attention/MLP input projections follow a
    LayerNorm but feed no norm themselves, so the weights that feed a LayerNorm are none in the
    stock model; this list marks the qkv and fc1 weights as bias-free tensor groups, the variant
    (as in LN-after-projection designs) that PSI targets, and keeps the rest Euclidean."""
    d, mlp, layers = 768, 3072, 12
    out = [("conv_proj.weight", (d, 3, 16, 16), None), ("conv_proj.bias", (d,), None),
           ("class_token", (1, 1, d), None), ("pos_embedding", (1, 197, d), None)]
    for i in range(layers):
        pre = f"encoder.layers.{i}"
        out += [(f"{pre}.ln_1.weight", (d,), None), (f"{pre}.ln_1.bias", (d,), None),
                (f"{pre}.attn.in_proj_weight", (3 * d, d), "tensor"),
                (f"{pre}.attn.out_proj.weight", (d, d), None), (f"{pre}.attn.out_proj.bias", (d,), None),
                (f"{pre}.ln_2.weight", (d,), None), (f"{pre}.ln_2.bias", (d,), None),
                (f"{pre}.mlp.0.weight", (mlp, d), "tensor"),
                (f"{pre}.mlp.3.weight", (d, mlp), None), (f"{pre}.mlp.3.bias", (d,), None)]
    out += [("encoder.ln.weight", (d,), None), ("encoder.ln.bias", (d,), None),
            ("heads.head.weight", (1000, d), None), ("heads.head.bias", (1000,), None)]
    return out


def numel(shapes: ShapeList) -> int:
    return sum(math.prod(shape) for _, shape, _ in shapes)


def large(target: int) -> ShapeList:
    """ResNet-50 lists repeated, cut after at least ``target`` values (a batch of models, or one
    very wide one: the same mix of channel groups and Euclidean tensors at scale)."""
    one = resnet50()
    copies = max(1, math.ceil(target / numel(one)))
    return prefix([(f"m{k}.{name}", shape, man) for k in range(copies) for name, shape, man in one],
                  target)


def prefix(shapes: ShapeList, target: int) -> ShapeList:
    """The shortest prefix of ``shapes`` holding at least ``target`` values."""
    out, n = [], 0
    for entry in shapes:
        if n >= target:
            break
        out.append(entry)
        n += math.prod(entry[1])
    return out


def large_target(device: str) -> int:
    return 1_000_000_000 if device.startswith("cuda") else 500_000_000


def model_list(model: str, device: str, large_values: int | None = None) -> ShapeList:
    if model == "resnet50":
        return resnet50()
    if model == "vit_b16":
        return vit_b16()
    if model == "large":
        return large(large_values or large_target(device))
    if model == "tiny":  # the smoke test's list: a few channel/tensor/Euclidean tensors
        return [("conv.weight", (16, 8, 3, 3), "channel"), ("bn.weight", (16,), None),
                ("bn.bias", (16,), None), ("proj.weight", (32, 16), "tensor"),
                ("fc.weight", (10, 32), None), ("fc.bias", (10,), None)]
    raise ValueError(f"unknown model {model!r}")


MODELS = ("resnet50", "vit_b16", "large")
