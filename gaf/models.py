"""The paper's networks, and a tiny one for tests.

- ``resnet18``: torchvision's ResNet18 with its ImageNet stem (7x7 stride-2 conv and a
  max-pool), random init: the paper's CIFAR-100 network (clean accuracy ~62%).
- ``resnet34_cifar``: the CIFAR-style ResNet34 of the CIFAR-100N experiments
  (3x3 stride-1 stem, no max-pool, BasicBlock [3, 4, 6, 3]).
- ``resnet18_cifar``: the same CIFAR stem on ResNet18 (an option, not the paper's).
- ``vit_tiny``: a small Vision Transformer, for the labelled small analogue of
  figure 3 (the paper's ViT-L/16 on ImageNet is out of reach here).
- ``resnet_cifar``: a small CIFAR-style ResNet (3x3 stem, three stages of BasicBlocks at
  widths w, 2w, 4w, the layout of He et al.'s CIFAR ResNets): the tiny scale's network,
  large enough to memorise a few thousand noisy labels yet minutes on a CPU. ``width``
  (w) and ``blocks`` (per stage; 1 = ResNet-8, 3 = ResNet-20) set its size.
- ``cnn4``: four 3x3 conv-BN-ReLU layers at widths w, 2w, 4w, 8w, a max-pool after
  each of the first three (w = 16: 99k parameters), about a third of ``resnet_cifar``'s
  cost per image at w = 16.
- ``tiny``: a two-conv CNN with BatchNorm (8k parameters), seconds on a CPU: unit tests.
"""

from __future__ import annotations

from torch import nn
from torchvision.models import resnet18, resnet34
from torchvision.models.resnet import BasicBlock
from torchvision.models.vision_transformer import VisionTransformer

from gaf.config import check_size  # the size keys each model takes are part of the schema


def _cifar_stem(net: nn.Module) -> nn.Module:
    """Swap the ImageNet stem for a 3x3 stride-1 conv without max-pool (32x32 inputs)."""
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


def tiny_cnn(num_classes: int, width: int = 16) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes),
    )


def resnet_cifar(num_classes: int, width: int = 16, blocks: int = 1) -> nn.Module:
    """3x3 stem, then stages of ``blocks`` BasicBlocks at widths w, 2w, 4w (strides 1, 2, 2)."""
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                               nn.ReLU(inplace=True)]
    channels = width
    for stage, stride in enumerate((1, 2, 2)):
        out = width * 2 ** stage
        for b in range(blocks):
            s = stride if b == 0 else 1
            # A 1x1 projection where the shape changes (torchvision's own BasicBlock convention).
            down = (nn.Sequential(nn.Conv2d(channels, out, 1, stride=s, bias=False), nn.BatchNorm2d(out))
                    if s != 1 or channels != out else None)
            layers.append(BasicBlock(channels, out, stride=s, downsample=down))
            channels = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)


def cnn4(num_classes: int, width: int = 16) -> nn.Module:
    layers: list[nn.Module] = []
    channels = 3
    for stage in range(4):
        out = width * 2 ** stage
        layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
        layers += [nn.MaxPool2d(2)] if stage < 3 else []
        channels = out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))


def vit_tiny(num_classes: int) -> nn.Module:
    return VisionTransformer(image_size=32, patch_size=4, num_layers=6, num_heads=4,
                             hidden_dim=192, mlp_dim=384, num_classes=num_classes)


# What exists: gaf.config.MODEL_SIZES names these same models (tests/test_models.py).
MODELS = {
    "resnet18": lambda c: resnet18(num_classes=c),
    "resnet18_cifar": lambda c: _cifar_stem(resnet18(num_classes=c)),
    "resnet34_cifar": lambda c: _cifar_stem(resnet34(num_classes=c)),
    "vit_tiny": vit_tiny,
    "resnet_cifar": resnet_cifar,
    "cnn4": cnn4,
    "tiny": tiny_cnn,
}


def build_model(name: str, num_classes: int, **size: int | None) -> nn.Module:
    """A freshly initialised network by name (see ``MODELS``); ``size`` holds the keys of
    ``gaf.config.MODEL_SIZES[name]`` (e.g. width=16, blocks=1); a key left out or None takes the default."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    if not (isinstance(num_classes, int) and num_classes >= 2):
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    return MODELS[name](num_classes, **check_size(name, **size))
