"""The experiment application: plain vs TrAct training, ``tract-optax-train``.

Not part of the library. It imports the library (``tract_optax``); the library
never imports it. One job per module:

- :mod:`~tract_experiment.data`: datasets, batches, augmentation.
- :mod:`~tract_experiment.models`: the model zoo (Flax Linen).
- :mod:`~tract_experiment.config`: presets and the resolved settings.
- :mod:`~tract_experiment.training`: optimizers, steps, one training run.
- :mod:`~tract_experiment.speedup`: the epoch saving read off the curves.
- :mod:`~tract_experiment.report`: summary tables and the plot.
- :mod:`~tract_experiment.comparison`: every run of a comparison, outputs.
- :mod:`~tract_experiment.cli`: the command line.
"""
