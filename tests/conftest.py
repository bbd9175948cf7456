import os
import sys

# the interpreter must be chosen before triton is first imported (CPU machines have no GPU)
try:
    import torch
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass

HERE = os.path.dirname(__file__)
sys.path.insert(0, HERE)  # tests import their helpers (tiny_model, tiny_tokenizer) by name
sys.path.insert(0, os.path.dirname(HERE))  # the repo root: minterleave, kernels
