"""Patch words (train.py --patch-words): an auxiliary loss that makes each vision patch name what it shows.

Fresh grid scenes (render.grid_scene) go through the vision tower and projector; each patch feature of an
occupied cell, through the decoder's final norm and its output head (tied to the embeddings in the bundled
model), should predict the cell's colour word and its shape word. The words are the ones the questions use,
so the patch feature of a red square moves towards the embeddings of " red" and " square".

    ids = patch_words.word_ids(proc)                      # once
    patch_words.check_grid(model.cfg)                     # once: grid cell k must be patch k
    pixels, targets = patch_words.batch(proc, seeds, size, ids)
    loss_sum, n_cells = patch_words.loss_sum(model, pixels, targets)
"""

import random

import torch
import torch.nn.functional as F

from ..config import IGNORE_INDEX
from .render import COLOURS, SHAPES, grid_scene

WORDS = COLOURS + SHAPES


def check_grid(cfg):
    """ValueError unless every image is cut into 3x3 patches: then cell k of a grid scene is exactly patch k."""
    if cfg.tokens_per_image != 9 or cfg.vision.image_size != 3 * cfg.vision.patch_size:
        raise ValueError("--patch-words needs 3x3 patches per image (image_size = 3 * patch_size)")


def word_ids(proc):
    """{word: token id} for the colour and shape words as they follow a space in a question."""
    ids = {}
    for w in WORDS:
        tok = proc.encode(" " + w)
        if len(tok) != 1:
            raise ValueError(f"--patch-words: the tokenizer splits {w!r} into {len(tok)} tokens")
        ids[w] = tok[0]
    return ids


def batch(proc, seeds, size, word_ids):
    """One labelled grid scene per seed, as (pixels (n, 3, S, S), targets (n, 9, 2)) with the token ids of each
    occupied cell's colour and shape words (IGNORE_INDEX for empty cells). A scene depends on its seed only,
    so any split of a step's seeds over processes and micro-batches trains on the same scenes."""
    pix, tgt = [], torch.full((len(seeds), 9, 2), IGNORE_INDEX, dtype=torch.long)
    for i, seed in enumerate(seeds):
        img, cells = grid_scene(random.Random(seed), size)
        pix.append(torch.from_numpy(proc.image_pixels(img)))
        for cell, (colour, shape) in cells.items():
            tgt[i, cell] = torch.tensor([word_ids[colour], word_ids[shape]])
    return torch.stack(pix), tgt


def loss_sum(model, pixels, targets):
    """(sum over occupied cells of the mean of its two words' negative log-likelihood, number of occupied
    cells). Divide the sum by the cell count of the whole step (all micro-batches and ranks) for the mean."""
    f = model.image_features(pixels)                                                 # (N, 9, C)
    logp = F.log_softmax(model.decoder.logits(model.decoder.norm(f)).float(), dim=-1)  # (N, 9, vocab)
    has = targets[..., 0] != IGNORE_INDEX                                            # (N, 9) occupied cells
    both = logp[has].gather(1, targets[has])                                         # (n, 2)
    return -both.sum() / 2, int(has.sum())
