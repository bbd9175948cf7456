"""Tiny Qwen2-like tokenizer + processor files, written without the network.

The code lives in the library (minterleave/tokenizer.py: train.py needs it for the bundled model);
this module re-exports it under the name the tests import.
"""

from minterleave.tokenizer import (BUILTIN_CORPUS, CHAT_TEMPLATE, QWEN_SPLIT_REGEX,  # noqa: F401
                                   SPECIAL_TOKENS, build_tokenizer, write_tokenizer_files)
