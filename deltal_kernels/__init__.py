"""deltal-kernels: the RLVR policy loss straight from the logits, with Delta-L aggregation."""
from . import packing, reference
from .aggregation import AGGREGATIONS, sequence_weights
from .dispatch import available_backends
from .linear import linear_policy_loss
from .logprobs import linear_token_logprobs, token_logprobs
from .loss import PolicyLoss, policy_loss, validate
from .output import PolicyLossOutput

__version__ = "0.1.0"

__all__ = ["AGGREGATIONS", "PolicyLoss", "PolicyLossOutput", "available_backends", "packing", "policy_loss",
           "reference", "sequence_weights", "validate", "__version__"]
__all__ += ["linear_policy_loss", "linear_token_logprobs", "token_logprobs"]
