"""ImageNet-sized Flax Linen models for the overhead benchmark (GPU).

ResNet-50 (bottleneck blocks, 7x7 stride-2 stem and max-pool) and ViT-B/16
(16x16 conv patch embedding, 12 blocks of width 768). Their first layers are
``stem`` and ``patch_embed``, as in :mod:`tract_optax.models`.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from tract_experiment import models as model_zoo


class Bottleneck(nn.Module):
  """ResNet v1.5 bottleneck: 1x1, 3x3 (strided), 1x1 x4, with BatchNorm."""

  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv = functools.partial(nn.Conv, use_bias=False)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
    y = nn.relu(norm()(conv(self.features, (1, 1))(x)))
    y = nn.relu(norm()(conv(self.features, (3, 3), strides=self.strides,
                            padding='SAME')(y)))
    y = norm(scale_init=nn.initializers.zeros)(conv(self.features * 4, (1, 1))(y))
    if self.strides != 1 or x.shape[-1] != self.features * 4:
      x = norm()(conv(self.features * 4, (1, 1), strides=self.strides)(x))
    return nn.relu(x + y)


class ResNet50(nn.Module):
  """ResNet-50 for 224 px ImageNet images."""

  num_classes: int = 1000
  blocks: Sequence[int] = (3, 4, 6, 3)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = nn.Conv(64, (7, 7), strides=2, padding=[(3, 3), (3, 3)], use_bias=False,
                name='stem')(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
    for stage, count in enumerate(self.blocks):
      for block in range(count):
        strides = 2 if stage > 0 and block == 0 else 1
        x = Bottleneck(64 * 2**stage, strides)(x, train)
    return nn.Dense(self.num_classes, name='head')(jnp.mean(x, axis=(1, 2)))


def resnet50(num_classes: int) -> nn.Module:
  return ResNet50(num_classes=num_classes)


def vit_b16(num_classes: int) -> nn.Module:
  return model_zoo.ViT(num_classes=num_classes, dim=768, depth=12, num_heads=12,
                       patch_size=16, mlp_ratio=4)


def register() -> None:
  """Adds 'resnet50' and 'vit_b16' to the model zoo's registry."""
  model_zoo.MODELS.setdefault('resnet50', resnet50)
  model_zoo.MODELS.setdefault('vit_b16', vit_b16)
  model_zoo.FIRST_LAYER.setdefault('resnet50', ('stem',))
  model_zoo.FIRST_LAYER.setdefault('vit_b16', ('patch_embed',))
