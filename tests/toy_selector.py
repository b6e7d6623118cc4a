"""A selector added from outside the library, in one file: it prefers positions divisible by 3, later ones
first. Importing this module registers it as `options={"selector": "toy_mod3"}`."""
from __future__ import annotations

import torch

from spts_compile import selectors


def mod3_scores(x_c: torch.Tensor, cand: torch.Tensor, layer: int, seed: int) -> torch.Tensor:
    """[B, C]: 1 for positions divisible by 3, 0 otherwise, plus a small share of the position (later wins)."""
    return (cand % 3 == 0).to(torch.float32) + cand.to(torch.float32) * 1e-4


TOY = selectors.register(selectors.ScoreSelector("toy_mod3", mod3_scores))
