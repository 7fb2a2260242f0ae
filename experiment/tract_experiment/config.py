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

#: Peak learning rate when neither ``--lr`` nor the preset (for its optimizer) sets it.
DEFAULT_LR: Dict[str, float] = {'sgd': 0.08, 'adam': 1e-3}

#: Settings of each preset; flags given on the command line win.
PRESETS: Dict[str, Dict[str, Any]] = {
    # Sized for a 2-core CPU (a few minutes), chosen by measurement: on 10k
    # examples without augmentation, lr 0.2 and lam 0.05 gave the clearest
    # paired gain at 2 epochs among lr 0.08/0.2/0.4 and lam 0.01-0.1.
    'default': dict(dataset='fashion_mnist', model='cnn', epochs=(1, 2), seeds=3,
                    train_examples=10000, test_examples=None, batch_size=128,
                    optimizer='sgd', lr=0.2, weight_decay=5e-4, warmup_epochs=0.0,
                    lam=0.05, augment='none'),
    # The GPU calibration of the project's notes: ResNet-18 on the full Fashion-MNIST.
    'paper': dict(dataset='fashion_mnist', model='resnet18', epochs=(1, 2, 4, 8),
                  seeds=4, train_examples=None, test_examples=None, batch_size=128,
                  optimizer='sgd', lr=0.08, weight_decay=5e-4, warmup_epochs=0.0,
                  lam=0.1, augment='auto'),
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
  :data:`INPUT_SCALES`. Every (input scale, method, budget, seed) is one run.
  """

  dataset: str
  data_dir: Optional[str]
  model: str
  methods: Tuple[str, ...]
  lam: float
  optimizer: str
  lr: float
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
