"""``python -m tract_experiment``: the same as ``tract-optax-train``."""

import sys

from tract_experiment.cli import main

if __name__ == '__main__':
  sys.exit(main())
