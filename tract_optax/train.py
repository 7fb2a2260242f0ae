"""Entry point of the experiment application ``tract-optax-train``; not library.

``tract-optax-train`` (the console script) and ``python -m tract_optax.train``
land here and are forwarded to :func:`tract_optax.experiment.cli.main`, where
the application lives (see :mod:`tract_optax.experiment`). Nothing in the
library imports this module.
"""

import sys

from tract_optax.experiment.cli import main

__all__ = ['main']

if __name__ == '__main__':
  sys.exit(main())
