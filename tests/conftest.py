import os
import sys

import torch

# Without a GPU the Triton kernels run on Triton's CPU interpreter. It must be chosen before any
# kernel is defined, hence here, before the tests import the package.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # tests/cases.py
