import os

# the interpreter must be chosen before triton is first imported (CPU machines have no GPU)
try:
    import torch
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass
