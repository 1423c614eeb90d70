"""kubearch's trainer: every architecture of the seeds, one CLI, DDP, Prometheus metrics.

Importing this package must stay cheap and torch-free: the operator imports
:mod:`kubearch_trainer.config` and :mod:`kubearch_trainer.exit_codes` from it.
"""

__version__ = "0.1.0"
