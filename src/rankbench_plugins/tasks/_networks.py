"""The networks of the task plugins (``torch.nn`` modules), kept apart so that importing a plugin does not import
torch: a task imports this module inside the methods that build or inspect its network. Each network's layout is
documented in its task's module docstring.

    ``mlp-classification``  :class:`MLP`
    ``cnn-classification``  :class:`LeNet5`, :class:`DLRTLeNet5`, :class:`SmallVGG`
    ``pinn``                :class:`TanhMLP`
    ``vit-classification``  :class:`ViT` (of :class:`Block` and :class:`Attention`), :class:`PretrainedImageClassifier`
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rankbench_plugins.tasks import _pde

# ---------------------------------------------------------------------------------------------------------------------
# mlp-classification


class MLP(nn.Module):
    def __init__(self, pixels: int, hidden: list[int], classes: int):
        super().__init__()
        widths = [pixels, *hidden, classes]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = images.flatten(1)
        for i, layer in enumerate(self.layers):
            h = layer(torch.relu(h) if i else h)
        return h


# ---------------------------------------------------------------------------------------------------------------------
# cnn-classification

SIDE = 28


def at_side(images: torch.Tensor) -> torch.Tensor:
    """Images resized bilinearly to SIDE x SIDE where they are of another size (digits: 8x8)."""
    if images.shape[-1] != SIDE or images.shape[-2] != SIDE:
        return F.interpolate(images, size=(SIDE, SIDE), mode="bilinear", align_corners=False)
    return images


def conv_relu_pool(conv: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(torch.relu(conv(h)), 2)


class LeNet5(nn.Module):
    """LeNet5 on 1-channel images, resized to 28x28 when they are not (``cnn_classification``'s docstring)."""

    def __init__(self, image_size: int, classes: int):
        super().__init__()
        self.image_size = int(image_size)
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = at_side(images)
        h = conv_relu_pool(self.conv2, conv_relu_pool(self.conv1, h))
        h = torch.relu(self.fc1(h.flatten(1)))
        h = torch.relu(self.fc2(h))
        return self.fc3(h)


class DLRTLeNet5(nn.Module):
    """The LeNet5 of DLRT's reference code (``cnn_classification``'s docstring); ``dense_output`` names the layer that
    is no site."""

    dense_output = "fc2"

    def __init__(self, image_size: int, classes: int):
        super().__init__()
        self.image_size = int(image_size)
        self.conv1 = nn.Conv2d(1, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(50 * 4 * 4, 500)
        self.fc2 = nn.Linear(500, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = at_side(images)
        h = conv_relu_pool(self.conv2, conv_relu_pool(self.conv1, h))
        return self.fc2(torch.relu(self.fc1(h.flatten(1))))


class SmallVGG(nn.Module):
    """Two VGG blocks (3x3 convs, 32 and 64 channels) and a 256-wide classifier, for 28x28 images
    (``cnn_classification``'s docstring)."""

    def __init__(self, image_size: int, classes: int, widths: tuple[int, int] = (32, 64), hidden: int = 256):
        super().__init__()
        self.image_size = int(image_size)
        a, b = widths
        self.features = nn.Sequential(
            nn.Conv2d(1, a, 3, padding=1), nn.Conv2d(a, a, 3, padding=1), nn.MaxPool2d(2),
            nn.Conv2d(a, b, 3, padding=1), nn.Conv2d(b, b, 3, padding=1), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Linear(b * 7 * 7, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = at_side(images)
        for layer in self.features:
            h = layer(h) if isinstance(layer, nn.MaxPool2d) else torch.relu(layer(h))
        return self.classifier(h.flatten(1))


# ---------------------------------------------------------------------------------------------------------------------
# pinn


class TanhMLP(nn.Module):
    """u(x) = layers[depth](tanh(... tanh(layers[0](a * x + c)))) with x mapped from the PDE box to [-1, 1]^d."""

    def __init__(self, lower, upper, width: int, depth: int, generator: torch.Generator):
        super().__init__()
        lower = torch.tensor(lower, dtype=_pde.dtype())
        upper = torch.tensor(upper, dtype=_pde.dtype())
        self.register_buffer("scale", 2.0 / (upper - lower))
        self.register_buffer("shift", -(upper + lower) / (upper - lower))
        sizes = [len(lower)] + [width] * depth + [1]
        self.layers = nn.ModuleList(nn.Linear(a, b, dtype=_pde.dtype()) for a, b in zip(sizes[:-1], sizes[1:]))
        with torch.no_grad():
            for layer in self.layers:  # Glorot (Xavier) normal, zero bias
                std = math.sqrt(2.0 / sum(layer.weight.shape))
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator, dtype=_pde.dtype()) * std)
                layer.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * self.scale + self.shift
        for layer in self.layers[:-1]:
            h = torch.tanh(layer(h))
        return self.layers[-1](h).squeeze(-1)


# ---------------------------------------------------------------------------------------------------------------------
# vit-classification


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.fc1, self.fc2 = nn.Linear(dim, mlp_ratio * dim), nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    def __init__(self, image_size: int, patch: int, classes: int, dim: int, depth: int, heads: int, mlp_ratio: int):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"patch {patch} does not divide the image side {image_size}")
        self.patch = patch
        tokens = (image_size // patch) ** 2
        self.patch_embed = nn.Linear(patch * patch, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        p = self.patch
        patches = F.unfold(images, kernel_size=p, stride=p).transpose(1, 2)  # (batch, tokens, p*p)
        h = self.patch_embed(patches)
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], dim=1) + self.pos
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h[:, 0]))


class PretrainedImageClassifier(nn.Module):
    """A transformers image classifier (``AutoModelForImageClassification``) on this task's grayscale images: they
    are resized to the model's input side and repeated over its input channels."""

    def __init__(self, net: nn.Module, image_size: int, channels: int):
        super().__init__()
        self.net, self.image_size, self.channels = net, image_size, channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] != self.image_size:
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear",
                                   align_corners=False)
        return self.net(pixel_values=images.expand(-1, self.channels, -1, -1)).logits

    def head(self) -> nn.Module:
        """The classification head (``classifier`` in transformers' ViT, DeiT, BEiT, Swin...; ``head`` elsewhere)."""
        return getattr(self.net, "classifier", None) or self.net.head
