"""Parameter lists shaped like real models, without building the models (no torchvision needed).

Each entry is (name, shape, manifold): the manifold psi_cuda.param_groups would assign
("channel" for conv/linear weights feeding BatchNorm, "tensor" for bias-free weights feeding
LayerNorm, None for everything else).
"""
from __future__ import annotations


def resnet50() -> list[tuple[str, tuple[int, ...], str | None]]:
    """torchvision's ResNet-50 (25.56M parameters): bottlenecks [3, 4, 6, 3], expansion 4."""
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


def vit_b16() -> list[tuple[str, tuple[int, ...], str | None]]:
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


MODELS = {"resnet50": resnet50, "vit_b16": vit_b16}


def numel(shapes) -> int:
    total = 0
    for _, shape, _ in shapes:
        n = 1
        for s in shape:
            n *= s
        total += n
    return total
