"""Settings of a comparison: the methods, the presets and the resolved :class:`Config`.

Part of the experiment application (``tract-optax-train``), not of the library.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

#: Methods a comparison can run: no TrAct, TrAct with an absolute ridge
#: ``lam``, TrAct with the ridge relative to the statistic's mean eigenvalue
#: (``tract(lam, relative_lam=True)``, invariant to the input's scale).
METHODS: Tuple[str, ...] = ('plain', 'tract', 'tract_rel')

#: How each method is named in tables and plots.
METHOD_LABELS: Dict[str, str] = {'plain': 'plain', 'tract': 'TrAct',
                                 'tract_rel': 'TrAct rel-lam'}

#: Shorthands accepted by ``--method``.
METHOD_SETS: Dict[str, Tuple[str, ...]] = {'both': ('plain', 'tract'), 'all': METHODS}

#: The method every TrAct run is compared against (paired by seed).
BASELINE = 'plain'

#: Input scales: standardised per channel (mean 0, std 1); the stored pixel
#: values as float (``'raw'``: 0..255 for Fashion-MNIST and CIFAR-10); or
#: those divided by the format's peak value (``'unit'``: 0..1). Raw and unit
#: differ by a pure scale factor.
INPUT_SCALES: Tuple[str, ...] = ('standardized', 'raw', 'unit')

#: Peak learning-rate grid when neither ``--lr`` nor the preset (for its
#: optimizer) sets it: each method is tuned over it on the validation split.
DEFAULT_LRS: Dict[str, Tuple[float, ...]] = {'sgd': (0.03, 0.1, 0.3),
                                             'adam': (3e-4, 1e-3, 3e-3)}

#: Validation examples with ``--val-examples auto``: a sixth of the training
#: file, at most this many (5000 of Fashion-MNIST's 60000).
AUTO_VAL_EXAMPLES = 5000

#: Settings of each preset; flags given on the command line win.
PRESETS: Dict[str, Dict[str, Any]] = {
    # The default demonstration, sized for a 2-core CPU (about 5 minutes on 2
    # idle cores, the runs vectorised per method and budget) and chosen by measurement
    # (docs/experiment.md): a ViT whose first layer sees 7x7 patches (16
    # tokens of 49 inputs), SGD, each method tuned over the lr grid on a
    # validation split carved from the training file. Measured, plain's best
    # lr is 0.03 at every budget, inside the grid; 0.3 diverged for plain.
    'default': dict(dataset='fashion_mnist', model='vit', patch_size=7, epochs=(1, 2, 3),
                    seeds=3, train_examples=5000, val_examples=2000, test_examples=5000,
                    batch_size=128, optimizer='sgd', lr=(0.01, 0.03, 0.1), weight_decay=5e-4,
                    warmup_epochs=0.0, lam=0.1, augment='none'),
    # The GPU protocol: ResNet-18 on the full Fashion-MNIST (55000 training,
    # 5000 validation examples), each method tuned over the lr grid.
    'paper': dict(dataset='fashion_mnist', model='resnet18', patch_size=None,
                  epochs=(1, 2, 4, 8), seeds=4, train_examples=None, val_examples=5000,
                  test_examples=None, batch_size=128, optimizer='sgd',
                  lr=(0.03, 0.1, 0.3), weight_decay=5e-4, warmup_epochs=0.0, lam=0.1,
                  augment='auto'),
}

#: Augmentation used with ``--augment auto``: (crop padding, horizontal flip).
AUTO_AUGMENT: Dict[str, Tuple[int, bool]] = {
    'fashion_mnist': (2, True), 'cifar10': (4, True), 'digits': (0, False)}

#: Explicit augmentations: (crop padding or None for the dataset's, flip).
AUGMENTATIONS: Dict[str, Tuple[Optional[int], bool]] = {
    'none': (0, False), 'crop': (None, False), 'flip': (0, True), 'crop_flip': (None, True)}


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything that defines a comparison (the resolved command line).

  ``methods`` are keys of :data:`METHODS`; ``input_scales`` of
  :data:`INPUT_SCALES`. Every (input scale, budget, seed, lr, method) is one
  run. ``lrs`` is the learning-rate grid each method is tuned over (on the
  validation split of ``val_examples``; ``None``: automatic size); one lr
  means a shared-lr comparison with nothing tuned. ``timing_compiles`` fresh
  compiles of each method's step, ``timing_steps`` timed steps each, give
  the seconds per epoch of the speedup in seconds (0 compiles: none).
  """

  dataset: str
  data_dir: Optional[str]
  model: str
  methods: Tuple[str, ...]
  lam: float
  optimizer: str
  lrs: Tuple[float, ...]
  momentum: float
  nesterov: bool
  weight_decay: float
  warmup_epochs: float
  batch_size: int
  epochs: Tuple[int, ...]
  seeds: int
  first_seed: int
  train_examples: Optional[int]
  test_examples: Optional[int]
  augment: str
  crop_pad: int
  flip: bool
  eval_batch_size: int
  out: str
  preset: str
  progress: bool
  refresh_every: int = 1
  input_scales: Tuple[str, ...] = ('standardized',)
  val_examples: Optional[int] = None
  patch_size: Optional[int] = None
  plot: bool = True
  overwrite: bool = False
  timing_compiles: int = 3
  timing_steps: int = 20

  @property
  def tuned(self) -> bool:
    """Whether each method's lr is chosen from a grid (two or more lrs)."""
    return len(self.lrs) > 1

  @property
  def tract_methods(self) -> Tuple[str, ...]:
    """The TrAct methods run, in :data:`METHODS` order."""
    return tuple(m for m in self.methods if m != BASELINE)

  @property
  def paired(self) -> bool:
    """Whether plain and at least one TrAct method run (paired comparisons)."""
    return BASELINE in self.methods and bool(self.tract_methods)

  @property
  def seed_list(self) -> Tuple[int, ...]:
    """The seeds run: ``first_seed, first_seed + 1, ...``."""
    return tuple(range(self.first_seed, self.first_seed + self.seeds))
