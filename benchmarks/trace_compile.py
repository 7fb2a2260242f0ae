"""Trace + compile time of a Linen train step: plain vs TrAct's two routes.

Each variant is one jitted train step (loss, gradient, SGD update) of a
ViT-B/16-size model (12 blocks x 768, 12 heads, MLP 3072, 16 x 16 patches):

  plain     ``model.apply`` in the loss, ``optax.sgd``.
  gradient  ``tract_optax.linen.apply_tract`` in the loss (the gradient route).
  optax     ``tract_optax.linen.apply_with_stats`` in the loss and
            ``optax.chain(tract_optax.tract(0.1), optax.sgd(...))`` (the
            Optax route).

Every repetition builds a new step function and times
``jax.jit(step).trace(...).lower().compile()`` (wall clock; each phase is
reported too): Python tracing, lowering and XLA compilation, nothing run. Variants are interleaved round by round, so
a shared machine's load hits them alike; the report gives each variant's
median and best wall time and median process CPU time (all threads; less
sensitive to other processes' load), each as a ratio to plain. The first-layer probe's cache
(``layers=None``) is cleared before every repetition unless ``--cached``, so
the default measures what a job's first compile costs.

With ``--eager`` the same steps run un-jitted instead (every call traces its
operations as it goes, so an eager step's time is mostly tracing): each
variant is called once to warm the first-layer cache, then timed round by
round, interleaved; the report gives medians and ratios to plain.

Usage:
  python benchmarks/trace_compile.py                 # ViT-B/16 size, 32 px, 3 rounds
  python benchmarks/trace_compile.py --eager --depth 2 --dim 64 --rounds 15
  python benchmarks/trace_compile.py --depth 2 --dim 64 --rounds 1   # a quick check
  python benchmarks/trace_compile.py --layers patch_embed   # skip the probe
  PYTHONPATH=/tmp/old python benchmarks/trace_compile.py --baseline-package tract_optax_old
      # an earlier copy, its imports renamed to tract_optax_old, side by side
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import tract_optax
from tract_optax._src import first_layer


class Block(nn.Module):
  """Pre-norm transformer block."""

  dim: int
  heads: int

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(y, y)
    y = nn.LayerNorm()(x)
    y = nn.Dense(4 * self.dim)(y)
    return x + nn.Dense(self.dim)(nn.gelu(y))


class ViT(nn.Module):
  """A ViT: conv patch embedding, class token, learned positions, blocks."""

  depth: int
  dim: int
  heads: int
  patch: int
  classes: int = 10

  @nn.compact
  def __call__(self, images):
    x = nn.Conv(self.dim, (self.patch, self.patch), strides=self.patch, name='patch_embed')(images)
    x = x.reshape(x.shape[0], -1, self.dim)
    cls = self.param('cls', nn.initializers.zeros, (1, 1, self.dim))
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.dim)), x], axis=1)
    x = x + self.param('pos', nn.initializers.normal(0.02), (1, x.shape[1], self.dim))
    for _ in range(self.depth):
      x = Block(self.dim, self.heads)(x)
    return nn.Dense(self.classes)(nn.LayerNorm()(x[:, 0]))


def _cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_steps(
  model: nn.Module, layers, package: Any = tract_optax, suffix: str = ''
) -> Dict[str, Callable[[], Callable]]:
  """Builders of a fresh step function per variant (a new function: a new trace).

  ``package`` is the tract_optax to measure (``--baseline-package`` gives a
  second copy, e.g. an earlier version, measured side by side); ``suffix``
  tells its variants apart.
  """
  glue = importlib.import_module(package.__name__ + '.linen')
  sgd = optax.sgd(0.1)
  tract_tx = optax.chain(package.tract(0.1), optax.sgd(0.1))

  def plain():
    def step(params, opt_state, images, labels):
      def loss_fn(p):
        return _cross_entropy(model.apply({'params': p}, images), labels)

      grads = jax.grad(loss_fn)(params)
      updates, opt_state = sgd.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    return step

  def gradient():
    def step(params, opt_state, images, labels):
      def loss_fn(p):
        logits = glue.apply_tract(model, {'params': p}, images, lam=0.1, layers=layers)
        return _cross_entropy(logits, labels)

      grads = jax.grad(loss_fn)(params)
      updates, opt_state = sgd.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    return step

  def optax_route():
    def step(params, opt_state, images, labels):
      def loss_fn(p):
        logits, stats = glue.apply_with_stats(model, {'params': p}, images, layers=layers)
        return _cross_entropy(logits, labels), stats

      grads, stats = jax.grad(loss_fn, has_aux=True)(params)
      updates, opt_state = tract_tx.update(grads, opt_state, params, tract_stats=stats)
      return optax.apply_updates(params, updates), opt_state

    return step

  steps = {'gradient' + suffix: gradient, 'optax' + suffix: optax_route}
  return steps if suffix else {'plain': plain, **steps}


def _clear_probe_cache() -> None:
  clear = getattr(first_layer, 'clear_cache', None)
  if clear is not None:
    clear()


def _variants(
  args: argparse.Namespace, model: nn.Module, params: Any
) -> Tuple[Dict[str, Callable[[], Callable]], Dict[str, Any]]:
  """The step builders of every variant (``--baseline-package``'s too) and their
  optimizer states."""
  layers = None if args.layers is None else [args.layers]
  builders = make_steps(model, layers)
  sgd_state = optax.sgd(0.1).init(params)
  opt_states = {
    'plain': sgd_state,
    'gradient': sgd_state,
    'optax': optax.chain(tract_optax.tract(0.1), optax.sgd(0.1)).init(params),
  }
  if args.baseline_package:
    baseline = importlib.import_module(args.baseline_package)
    suffix = '@' + args.baseline_package
    builders.update(make_steps(model, layers, baseline, suffix))
    opt_states['gradient' + suffix] = sgd_state
    opt_states['optax' + suffix] = optax.chain(baseline.tract(0.1), optax.sgd(0.1)).init(params)
  return builders, opt_states


def measure(args: argparse.Namespace) -> Dict[str, object]:
  """Times every variant's trace + compile, interleaved over ``args.rounds``."""
  model = ViT(depth=args.depth, dim=args.dim, heads=args.heads, patch=args.patch)
  images = jnp.zeros((args.batch, args.size, args.size, 3), jnp.float32)
  labels = jnp.zeros((args.batch,), jnp.int32)
  params = jax.jit(model.init)(jax.random.key(0), images)['params']
  builders, opt_states = _variants(args, model, params)
  times: Dict[str, List[float]] = {name: [] for name in builders}
  phases: Dict[str, List[List[float]]] = {name: [] for name in builders}
  cpu_times: Dict[str, List[float]] = {name: [] for name in builders}
  # one untimed compile first: JAX's own one-time set-up is no variant's cost
  jax.jit(builders['plain']()).lower(params, opt_states['plain'], images, labels).compile()
  for _ in range(args.rounds):
    for name, build in builders.items():
      if not args.cached:
        _clear_probe_cache()
      cpu_start = time.process_time()
      start = time.perf_counter()
      traced = jax.jit(build()).trace(params, opt_states[name], images, labels)
      traced_at = time.perf_counter()
      lowered = traced.lower()
      lowered_at = time.perf_counter()
      lowered.compile()
      end = time.perf_counter()
      times[name].append(end - start)
      cpu_times[name].append(time.process_time() - cpu_start)
      phases[name].append([traced_at - start, lowered_at - traced_at, end - lowered_at])
  medians = {name: statistics.median(values) for name, values in times.items()}
  best = {name: min(values) for name, values in times.items()}
  cpu = {name: statistics.median(values) for name, values in cpu_times.items()}
  phase_medians = {
    name: dict(
      zip(
        ('trace', 'lower', 'compile'), map(statistics.median, zip(*rows, strict=True)), strict=True
      )
    )
    for name, rows in phases.items()
  }
  return {
    'model': f'ViT depth {args.depth} x dim {args.dim}, patch {args.patch}, {args.size} px',
    'layers': args.layers,
    'cached': args.cached,
    'seconds': times,
    'median_s': medians,
    'median_phase_s': phase_medians,
    'ratio_to_plain': {name: medians[name] / medians['plain'] for name in medians},
    'best_s': best,
    'best_ratio_to_plain': {name: best[name] / best['plain'] for name in best},
    'cpu_seconds': cpu_times,
    'median_cpu_ratio_to_plain': {name: cpu[name] / cpu['plain'] for name in cpu},
  }


def measure_eager(args: argparse.Namespace) -> Dict[str, object]:
  """Times every variant's un-jitted step, interleaved over ``args.rounds``."""
  model = ViT(depth=args.depth, dim=args.dim, heads=args.heads, patch=args.patch)
  images = jax.random.normal(jax.random.key(1), (args.batch, args.size, args.size, 3))
  labels = jnp.zeros((args.batch,), jnp.int32)
  params = model.init(jax.random.key(0), images)['params']
  builders, opt_states = _variants(args, model, params)
  steps = {name: build() for name, build in builders.items()}
  times: Dict[str, List[float]] = {name: [] for name in steps}
  for name, step in steps.items():  # warm-up: the first layer is chosen here
    jax.block_until_ready(step(params, opt_states[name], images, labels))
  for _ in range(args.rounds):
    for name, step in steps.items():
      start = time.perf_counter()
      jax.block_until_ready(step(params, opt_states[name], images, labels))
      times[name].append(time.perf_counter() - start)
  medians = {name: statistics.median(values) for name, values in times.items()}
  return {
    'model': f'ViT depth {args.depth} x dim {args.dim}, patch {args.patch}, {args.size} px',
    'eager': True,
    'layers': args.layers,
    'seconds': times,
    'median_s': medians,
    'ratio_to_plain': {name: medians[name] / medians['plain'] for name in medians},
  }


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
    description=__doc__.split('\n\n')[0],
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  parser.add_argument('--depth', type=int, default=12, help='transformer blocks')
  parser.add_argument('--dim', type=int, default=768, help='embedding width')
  parser.add_argument('--heads', type=int, default=12, help='attention heads')
  parser.add_argument('--patch', type=int, default=16, help='patch size')
  parser.add_argument('--size', type=int, default=32, help='image side in pixels')
  parser.add_argument('--batch', type=int, default=2, help='batch size')
  parser.add_argument('--rounds', type=int, default=3, help='interleaved rounds')
  parser.add_argument(
    '--layers', default=None, help='the layer to precondition (default: found by the probe)'
  )
  parser.add_argument(
    '--cached', action='store_true', help='keep the probe cache between repetitions'
  )
  parser.add_argument(
    '--baseline-package',
    default=None,
    help='another importable copy of tract_optax (e.g. an earlier version renamed) whose '
    'gradient and Optax routes are measured in the same rounds',
  )
  parser.add_argument(
    '--eager', action='store_true', help='time un-jitted steps instead of trace + compile'
  )
  parser.add_argument('--out', default=None, help='write the result as JSON here')
  args = parser.parse_args(argv)
  result = measure_eager(args) if args.eager else measure(args)
  text = json.dumps(result, indent=2)
  print(text)
  if args.out:
    with open(args.out, 'w', encoding='utf-8') as handle:
      handle.write(text + '\n')
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
