"""Index helpers that feed masked_patch_embed: MAE's random masking and DILEMMA's position corruption.

    keep_idx, ids_restore, mask, ids_shuffle = random_masking(B, N, 0.75, generator=g, return_shuffle=True)
    pos_idx, corrupted = corrupt_positions(ids_shuffle, keep_idx.shape[1], probability=0.2, generator=g)
    tokens = masked_patch_embed(images, w, b, pos_embed, keep_idx, pos_idx)
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["random_masking", "corrupt_positions"]


def random_masking(
    batch_size: int, num_patches: int, mask_ratio: float, *,
    generator: Optional[torch.Generator] = None, device=None, return_shuffle: bool = False,
):
    """MAE's per-sample random masking (He et al., official ``random_masking``), index-exact.

    Draws ``noise`` [B, N] uniform, ``ids_shuffle = argsort(noise)`` (ascending), keeps the first
    K = int(N·(1 − mask_ratio)) of it. Returns ``keep_idx`` [B, K] int64, ``ids_restore`` [B, N]
    (argsort of ids_shuffle) and ``mask`` [B, N] float (1 = removed, in original token order); with
    ``return_shuffle`` also the permutation ``ids_shuffle`` [B, N] (DILEMMA draws wrong positions from its tail).
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    if num_patches < 1 or batch_size < 0:
        raise ValueError(f"need batch_size >= 0 and num_patches >= 1, got {batch_size} and {num_patches}")
    if generator is not None and device is None:
        device = generator.device
    num_keep = int(num_patches * (1 - mask_ratio))
    if num_keep < 1:
        raise ValueError(f"mask_ratio {mask_ratio} keeps no patch out of {num_patches}")
    noise = torch.rand(batch_size, num_patches, generator=generator, device=device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    keep_idx = ids_shuffle[:, :num_keep]
    mask = torch.ones(batch_size, num_patches, device=noise.device)
    mask[:, :num_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    if return_shuffle:
        return keep_idx, ids_restore, mask, ids_shuffle
    return keep_idx, ids_restore, mask


def corrupt_positions(
    ids_shuffle: Tensor, num_keep: int, probability: float = 0.2, *, generator: Optional[torch.Generator] = None,
):
    """DILEMMA's positional corruption (Sameni et al. 2023, docs/methods.md §3.4).

    ``ids_shuffle`` [B, N] is the permutation π whose first ``num_keep`` = K entries are the kept
    patches. Each kept token is corrupted independently with ``probability``; a corrupted token gets
    the position of a *dropped* patch, so it never equals its own position nor any other visible
    token's position:
      - K ≤ N − K (mask ratio ≥ 0.5): the k-th kept token takes π[N − K + k], the paper's rule
        (distinct for distinct k);
      - 0 < N − K < K (mask ratio < 0.5, our rule): it takes π[K + (k mod (N − K))], again a dropped
        position, though two corrupted tokens may then share one;
      - K = N (nothing dropped): no dropped position exists, so it takes π[(k + 1) mod N], the position
        of the next kept token — still never its own.
    Returns ``pos_idx`` [B, K] int64 and ``corrupted`` [B, K] float (1 = wrong position), the BCE target.
    """
    if ids_shuffle.dim() != 2 or ids_shuffle.dtype != torch.int64:
        raise ValueError(f"ids_shuffle must be int64 [B, N], got {ids_shuffle.dtype} {list(ids_shuffle.shape)}")
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability must be in [0, 1], got {probability}")
    batch, num_patches = ids_shuffle.shape
    if not 1 <= num_keep <= num_patches:
        raise ValueError(f"num_keep must be in [1, {num_patches}], got {num_keep}")
    num_dropped = num_patches - num_keep
    k = torch.arange(num_keep, device=ids_shuffle.device)
    if num_dropped >= num_keep:
        wrong_slot = num_patches - num_keep + k
    elif num_dropped > 0:
        wrong_slot = num_keep + k % num_dropped
    else:
        wrong_slot = (k + 1) % num_patches
    wrong = ids_shuffle[:, wrong_slot]
    draw = torch.rand(batch, num_keep, generator=generator, device=ids_shuffle.device)
    corrupted = draw < probability
    if num_patches == 1:  # a single patch has no other position to take
        corrupted = torch.zeros_like(corrupted)
    pos_idx = torch.where(corrupted, wrong, ids_shuffle[:, :num_keep])
    return pos_idx, corrupted.to(torch.float32)
