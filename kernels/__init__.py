"""Hand-written Triton kernels.

    from minterleave.kernels.flash_attention import flash_attention, is_available

(Deliberately no re-export here: `from .flash_attention import flash_attention` would
shadow the submodule `minterleave.kernels.flash_attention` with the function of the same name.)
"""
