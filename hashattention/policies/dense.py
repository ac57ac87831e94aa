"""Dense attention through the shared sparse path: every valid token is read (the quality reference)."""
from __future__ import annotations

import torch

from .base import SelectionPolicy


class DensePolicy(SelectionPolicy):
    name = "dense"

    def select(self, layer, state, q, k, v, valid, scale) -> torch.Tensor:
        return valid

    def __repr__(self):
        return "DensePolicy()"
