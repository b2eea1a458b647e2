"""The paper's networks, and a tiny one for tests.

- ``resnet18``: torchvision's ResNet18 with its ImageNet stem (7x7 stride-2 conv and a
  max-pool), random init: the paper's CIFAR-100 network (clean accuracy ~62%).
- ``resnet34_cifar``: the CIFAR-style ResNet34 of the CIFAR-100N experiments
  (3x3 stride-1 stem, no max-pool, BasicBlock [3, 4, 6, 3]).
- ``resnet18_cifar``: the same CIFAR stem on ResNet18 (an option, not the paper's).
- ``vit_tiny``: a small Vision Transformer, for the labelled small analogue of
  figure 3 (the paper's ViT-L/16 on ImageNet is out of reach here).
- ``tiny``: a two-conv CNN with BatchNorm, seconds on a CPU.
"""

from __future__ import annotations

from torch import nn
from torchvision.models import resnet18, resnet34
from torchvision.models.vision_transformer import VisionTransformer


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


def vit_tiny(num_classes: int) -> nn.Module:
    return VisionTransformer(image_size=32, patch_size=4, num_layers=6, num_heads=4,
                             hidden_dim=192, mlp_dim=384, num_classes=num_classes)


MODELS = {
    "resnet18": lambda c: resnet18(num_classes=c),
    "resnet18_cifar": lambda c: _cifar_stem(resnet18(num_classes=c)),
    "resnet34_cifar": lambda c: _cifar_stem(resnet34(num_classes=c)),
    "vit_tiny": vit_tiny,
    "tiny": tiny_cnn,
}


def build_model(name: str, num_classes: int) -> nn.Module:
    """A freshly initialised network by name (see ``MODELS``)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    if not (isinstance(num_classes, int) and num_classes >= 2):
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    return MODELS[name](num_classes)
