"""Small zoo models: a VGG-style net, a ViT, LeNet-300-100 and a 1-D CNN for MNIST-1D."""

from __future__ import annotations

import torch
from torch import nn

VGG_CONFIGS = {
    # channel counts ("M" = 2x2 max-pool), VGG-11 layout at half width
    "vgg11": [32, "M", 64, "M", 128, 128, "M", 256, 256, "M", 256, 256],
    "vgg8": [32, "M", 64, "M", 128, "M", 256, 256],
}


class VGG(nn.Module):
    """VGG-style conv-BN-ReLU stack; pools are skipped once the feature map is 1 pixel wide."""

    def __init__(self, config: str = "vgg11", in_channels: int = 3, num_classes: int = 10, image_size: int = 32):
        super().__init__()
        layers: list[nn.Module] = []
        c, size = in_channels, image_size
        for v in VGG_CONFIGS[config]:
            if v == "M":
                if size >= 2:
                    layers.append(nn.MaxPool2d(2))
                    size //= 2
                continue
            layers += [nn.Conv2d(c, int(v), 3, padding=1, bias=False), nn.BatchNorm2d(int(v)), nn.ReLU(inplace=False)]
            c = int(v)
        self.body = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.flatten(self.pool(self.body(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class MLP(nn.Module):
    """LeNet-300-100 (LeCun et al. 1998): flatten -> 300 -> 100 -> classes, ReLU between."""

    def __init__(self, in_features: int = 784, hidden: tuple[int, ...] = (300, 100), num_classes: int = 10):
        super().__init__()
        self.flatten = nn.Flatten()
        layers: list[nn.Module] = []
        d = in_features
        for h in hidden:
            layers += [nn.Linear(d, h), nn.ReLU(inplace=False)]
            d = h
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(d, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.flatten(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class CNN1d(nn.Module):
    """A 1-D CNN for MNIST-1D signals (B, C, L): three conv-BN-ReLU stages, global pool, linear."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, widths: tuple[int, ...] = (32, 64, 128)):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for i, w in enumerate(widths):
            layers += [nn.Conv1d(c, w, 5 if i == 0 else 3, stride=1 if i == 0 else 2, padding=2 if i == 0 else 1,
                                 bias=False), nn.BatchNorm1d(w), nn.ReLU(inplace=False)]
            c = w
        self.body = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.flatten(self.pool(self.body(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def small_vit(image_size: int, in_channels: int, num_classes: int, embed_dim: int = 64, depth: int = 4,
              num_heads: int = 4, mlp_ratio: float = 2.0, patch_size: int | None = None) -> nn.Module:
    """A small ViT built from timm's ``VisionTransformer`` (real multi-head attention blocks).

    timm's class is used rather than a hand-written copy so that head pruning, layer removal and
    every other operation is exercised on exactly the modules timm users have.
    """
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:
        raise ImportError("the 'vit' model needs timm: pip install 'flowprune[vision]'") from None
    if patch_size is None:
        patch_size = next(p for p in (7, 4, 2, 1) if image_size % p == 0 and image_size // p >= 2)
    return VisionTransformer(img_size=image_size, patch_size=patch_size, in_chans=in_channels,
                             num_classes=num_classes, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                             mlp_ratio=mlp_ratio, class_token=True, global_pool="token", qkv_bias=True)
