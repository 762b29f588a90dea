"""Rotary position embedding with rotate-half pairing (i, i + Dh/2), as in Hugging Face Llama.

`cos`/`sin` are tables of shape (P, Dh/2) indexed by `position_ids`, so packed sequences (positions
restarting at 0) and decode offsets need nothing special.
"""

import torch


def rope_ref(
    q: torch.Tensor,  # (B, T, Hq, Dh)
    k: torch.Tensor,  # (B, T, Hk, Dh)
    cos: torch.Tensor,  # (P, Dh/2)
    sin: torch.Tensor,  # (P, Dh/2)
    position_ids: torch.Tensor,  # (B, T) int64
) -> tuple[torch.Tensor, torch.Tensor]:
    c = cos[position_ids].unsqueeze(2).float()  # (B, T, 1, Dh/2)
    s = sin[position_ids].unsqueeze(2).float()
    return _rotate(q, c, s), _rotate(k, c, s)


def _rotate(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)
