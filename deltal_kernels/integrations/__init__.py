"""Drop-in use of ``dk.policy_loss`` in trainers.

- ``accumulation``: whole-batch weights for gradient accumulation (no extra dependency);
- ``trl``: a GRPOTrainer subclass (imports trl);
- ``verl``: verl's ``agg_loss`` with "delta-l", a registered policy loss, and an actor patch
  (works without verl for the functions; registers with verl when it is importable).

The trainer modules are imported on demand so that ``import deltal_kernels`` never needs trl or verl.
"""
from .accumulation import accumulation_weights

__all__ = ["accumulation_weights"]
