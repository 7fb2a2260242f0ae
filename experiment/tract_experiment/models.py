"""Flax Linen image classifiers for the experiment: a small CNN, ResNet-18, a ViT.

Every model takes channels-last images ``(B, H, W, C)`` with any number of
channels and a ``train`` flag (batch statistics vs running averages), and its
first layer (the layer TrAct preconditions) is the first Conv or Dense called:
the stem convolution, or the ViT's patch embedding. Part of the experiment
application (``tract-optax-train``), not of the library.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

#: Default side of the ViT's square patches (``--patch-size``).
VIT_PATCH_SIZE = 4

#: BatchNorm momentum of the running averages; PyTorch's default (0.1 there).
#: Flax's 0.99 leaves short runs (a few hundred steps) with biased averages.
BN_MOMENTUM = 0.9


def _batch_norm(train: bool, name: str) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                      epsilon=1e-5, name=name)


class ResidualBlock(nn.Module):
  """Basic residual block: two 3x3 convolutions with BatchNorm.

  Attributes:
    features: output channels.
    strides: stride of the first convolution (and of the projection).
  """

  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv = functools.partial(nn.Conv, use_bias=False, padding='SAME')
    residual = x
    y = conv(self.features, (3, 3), strides=self.strides, name='conv1')(x)
    y = nn.relu(_batch_norm(train, 'bn1')(y))
    y = conv(self.features, (3, 3), name='conv2')(y)
    y = _batch_norm(train, 'bn2')(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      residual = conv(self.features, (1, 1), strides=self.strides, name='shortcut')(x)
      residual = _batch_norm(train, 'shortcut_bn')(residual)
    return nn.relu(y + residual)


class ResNet(nn.Module):
  """CIFAR-style ResNet: 3x3 stem (no max-pool), stages of residual blocks.

  Attributes:
    num_classes: outputs of the head.
    stage_widths: channels per stage.
    blocks_per_stage: residual blocks in each stage.
    stage_strides: stride of each stage's first block (default: 1 for the
      first stage, 2 for the others).
    stem_width: channels of the 3x3 stem convolution (default: the first
      stage's width).
  """

  num_classes: int
  stage_widths: Sequence[int] = (16, 32, 64)
  blocks_per_stage: Sequence[int] = (1, 1, 1)
  stage_strides: Sequence[int] | None = None
  stem_width: int | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Logits ``(B, num_classes)`` for images ``(B, H, W, C)``."""
    with jax.named_scope('stem'):
      x = nn.Conv(self.stem_width or self.stage_widths[0], (3, 3), padding='SAME',
                  use_bias=False, name='stem')(x)
      x = nn.relu(_batch_norm(train, 'stem_bn')(x))
    stage_strides = self.stage_strides or (1,) + (2,) * (len(self.stage_widths) - 1)
    for stage, (width, blocks) in enumerate(zip(self.stage_widths, self.blocks_per_stage)):
      for block in range(blocks):
        strides = stage_strides[stage] if block == 0 else 1
        x = ResidualBlock(width, strides, name=f'stage{stage + 1}_block{block + 1}')(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name='head')(x)


class EncoderBlock(nn.Module):
  """Pre-norm transformer block: self-attention and an MLP, both residual."""

  num_heads: int
  mlp_ratio: int = 2

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dim = x.shape[-1]
    y = nn.LayerNorm(name='norm1')(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.num_heads, name='attention')(y, y)
    y = nn.LayerNorm(name='norm2')(x)
    y = nn.gelu(nn.Dense(dim * self.mlp_ratio, name='mlp_in')(y))
    return x + nn.Dense(dim, name='mlp_out')(y)


class ViT(nn.Module):
  """Small Vision Transformer: conv patch embedding, class token, encoder.

  The patch embedding is a Conv with ``kernel_size = strides = patch_size``
  (``VALID`` padding), i.e. a Dense layer over flattened patches; it is the
  first layer, so TrAct preconditions it with ``n = patch_size^2 * channels``.

  Attributes:
    num_classes: outputs of the head.
    dim: token width.
    depth: transformer blocks.
    num_heads: attention heads.
    patch_size: side of the square patches.
    mlp_ratio: hidden width of the MLP relative to ``dim``.
  """

  num_classes: int
  dim: int = 64
  depth: int = 4
  num_heads: int = 4
  patch_size: int = VIT_PATCH_SIZE
  mlp_ratio: int = 2

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Logits ``(B, num_classes)`` for images ``(B, H, W, C)``; ``train`` is unused."""
    del train  # no dropout or BatchNorm
    patch = (self.patch_size, self.patch_size)
    x = nn.Conv(self.dim, patch, strides=patch, padding='VALID', name='patch_embed')(x)
    x = x.reshape(x.shape[0], -1, self.dim)
    cls = self.param('cls_token', nn.initializers.zeros, (1, 1, self.dim))
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.dim)), x], axis=1)
    position = self.param('position_embedding', nn.initializers.normal(0.02),
                          (1, x.shape[1], self.dim))
    x = x + position
    for index in range(self.depth):
      x = EncoderBlock(self.num_heads, self.mlp_ratio, name=f'block{index + 1}')(x)
    x = nn.LayerNorm(name='norm')(x[:, 0])
    return nn.Dense(self.num_classes, name='head')(x)


def cnn(num_classes: int, **kwargs: Any) -> ResNet:
  """Small BN ResNet for CPU runs: width-16 3x3 stem at full resolution, then
  stages of width 16-32-64 (one block each) that each halve the resolution."""
  options = dict(stage_widths=(16, 32, 64), blocks_per_stage=(1, 1, 1),
                 stage_strides=(2, 2, 2))
  options.update(kwargs)
  return ResNet(num_classes=num_classes, **options)


def resnet18(num_classes: int, **kwargs: Any) -> ResNet:
  """CIFAR-style ResNet-18: 3x3 stem of width 64, no max-pool, widths 64-512."""
  options = dict(stage_widths=(64, 128, 256, 512), blocks_per_stage=(2, 2, 2, 2))
  options.update(kwargs)
  return ResNet(num_classes=num_classes, **options)


def vit(num_classes: int, **kwargs: Any) -> ViT:
  """Small ViT: 4x4 patches (``patch_size=...`` to change), dim 64, 4 blocks of 4 heads."""
  return ViT(num_classes=num_classes, **kwargs)


#: Model factories by name: ``factory(num_classes, **kwargs) -> nn.Module``.
MODELS: Dict[str, Callable[..., nn.Module]] = {'cnn': cnn, 'resnet18': resnet18, 'vit': vit}

#: Module path of each model's first layer (the layer TrAct preconditions).
FIRST_LAYER: Dict[str, tuple] = {'cnn': ('stem',), 'resnet18': ('stem',),
                                 'vit': ('patch_embed',)}


def create_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
  """Builds a model by name: ``'cnn'``, ``'resnet18'`` or ``'vit'``.

  Args:
    name: a key of :data:`MODELS`.
    num_classes: outputs of the classification head.
    **kwargs: overrides of the model's attributes (e.g. ``stage_widths``).

  Returns:
    An unbound Flax Linen module; call it as ``model.apply(variables, images,
    train=...)``.

  Raises:
    ValueError: unknown name.

  Example:
    >>> model = tract_experiment.models.create_model('cnn', num_classes=10)
    >>> x = jnp.zeros((2, 28, 28, 1))
    >>> variables = jax.eval_shape(model.init, jax.random.key(0), x)  # shapes only
    >>> variables['params']['stem']['kernel'].shape  # the first layer
    (3, 3, 1, 16)
    >>> jax.eval_shape(model.apply, variables, x).shape
    (2, 10)
  """
  if name not in MODELS:
    raise ValueError(f'Unknown model {name!r}; choose one of {sorted(MODELS)}.')
  return MODELS[name](num_classes, **kwargs)
