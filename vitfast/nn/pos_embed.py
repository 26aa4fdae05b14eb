"""Absolute position embeddings of the ViT: the fixed 2-D sin-cos table of MAE and its resampling.

    table = sincos_2d_pos_embed(192, 8, cls_token=True)       # [1 + 64, 192], row 0 (CLS) is zero
    table = sincos_2d_pos_embed(192, (4, 8))                  # [32, 192], non-square grid
    new = resample_pos_embed(table[1:], (8, 8), (4, 4))       # [16, 192], DINO-style bicubic

Layout of the sin-cos table (MAE's `get_2d_sincos_pos_embed`, util/pos_embed.py, kept exactly).
Token n sits at row r = n // W and column c = n % W of the row-major grid; with D = embed_dim,
F = D // 4 and omega_i = 10000 ** (-i / F), i in [0, F):

    table[n, 0F:1F] = sin(c * omega)      first half: the COLUMN (x, width) coordinate
    table[n, 1F:2F] = cos(c * omega)
    table[n, 2F:3F] = sin(r * omega)      second half: the ROW (y, height) coordinate
    table[n, 3F:4F] = cos(r * omega)

MAE names the first half `emb_h`, but builds it from `np.meshgrid(grid_w, grid_h)[0]`, which varies
along the width: the first half encodes the column. We keep that order on purpose so that MAE
checkpoints (which store this table) and our freshly built tables agree bit for bit in float32.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

GridSize = Union[int, Sequence[int]]

__all__ = ["sincos_1d_pos_embed", "sincos_2d_pos_embed", "resample_pos_embed", "to_grid_size"]


def to_grid_size(grid_size: GridSize, name: str = "grid_size") -> Tuple[int, int]:
    """`8` or `(8, 8)` -> `(8, 8)` (rows, columns); positive ints only."""
    if isinstance(grid_size, int):
        pair = (grid_size, grid_size)
    else:
        pair = tuple(grid_size)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {grid_size!r}")
    return pair  # type: ignore[return-value]


def sincos_1d_pos_embed(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """1-D sin-cos embedding: positions [M] -> [M, embed_dim] float64, sines first then cosines.

    omega_i = 10000 ** (-i / (embed_dim / 2)) for i in [0, embed_dim / 2).
    """
    if embed_dim <= 0 or embed_dim % 2 != 0:
        raise ValueError(f"embed_dim must be a positive even int, got {embed_dim}")
    half = embed_dim // 2
    # float64 like MAE (numpy's default float), cast once at the end by the caller.
    omega = torch.arange(half, dtype=torch.float64) / half
    omega = 1.0 / (10000.0 ** omega)
    angles = positions.reshape(-1).to(torch.float64)[:, None] * omega[None, :]  # [M, half]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d_pos_embed(
    embed_dim: int,
    grid_size: GridSize,
    cls_token: bool = False,
    *,
    dtype: torch.dtype = torch.float32,
    device: Optional[Union[str, torch.device]] = None,
) -> torch.Tensor:
    """Fixed 2-D sin-cos table: [N, embed_dim], or [1 + N, embed_dim] with a zero CLS row first.

    grid_size: int (square) or (rows, columns); N = rows * columns, row-major. embed_dim % 4 == 0.
    See the module docstring for which quarter of the dims encodes what.
    """
    if embed_dim <= 0 or embed_dim % 4 != 0:
        raise ValueError(f"embed_dim must be a positive multiple of 4 for a 2-D sin-cos table, got {embed_dim}")
    rows, cols = to_grid_size(grid_size)
    row = torch.arange(rows, dtype=torch.float64).repeat_interleave(cols)  # r of token n = n // cols
    col = torch.arange(cols, dtype=torch.float64).repeat(rows)  # c of token n = n % cols
    table = torch.cat([sincos_1d_pos_embed(embed_dim // 2, col), sincos_1d_pos_embed(embed_dim // 2, row)], dim=1)
    if cls_token:
        table = torch.cat([table.new_zeros(1, embed_dim), table], dim=0)
    return table.to(dtype=dtype, device=device)


def resample_pos_embed(
    pos_embed: torch.Tensor,
    old_grid: GridSize,
    new_grid: GridSize,
    *,
    method: str = "dino",
) -> torch.Tensor:
    """Bicubic resampling of a patch position table: [N_old, D] -> [N_new, D] (or [1, N, D] -> [1, N', D]).

    Only the patch rows: the caller keeps the CLS row apart. Same grid in and out returns the input.

    method:
      "dino": DINO's `interpolate_pos_encoding` (also used by Gani et al.'s small-data ViT for the
              16-px local crops): `F.interpolate(scale_factor=(new + 0.1) / old, mode="bicubic")`.
              The +0.1 enters the sampling coordinates, not only the output size; we keep that quirk
              so multi-crop features match the reference.
      "mae":  MAE's `interpolate_pos_embed` (fine-tuning at another resolution):
              `F.interpolate(size=new, mode="bicubic", align_corners=False)`.
    """
    old_rows, old_cols = to_grid_size(old_grid, "old_grid")
    new_rows, new_cols = to_grid_size(new_grid, "new_grid")
    batched = pos_embed.dim() == 3
    table = pos_embed[0] if batched else pos_embed
    if table.dim() != 2 or table.shape[0] != old_rows * old_cols:
        raise ValueError(
            f"pos_embed must be [N, D] or [1, N, D] with N = {old_rows}*{old_cols} = {old_rows * old_cols}, "
            f"got {list(pos_embed.shape)}"
        )
    if (old_rows, old_cols) == (new_rows, new_cols):
        return pos_embed
    dim = table.shape[1]
    grid = table.reshape(1, old_rows, old_cols, dim).permute(0, 3, 1, 2)  # [1, D, rows, cols]
    if method == "dino":
        scale = ((new_rows + 0.1) / old_rows, (new_cols + 0.1) / old_cols)
        out = F.interpolate(grid, scale_factor=scale, mode="bicubic")
    elif method == "mae":
        out = F.interpolate(grid, size=(new_rows, new_cols), mode="bicubic", align_corners=False)
    else:
        raise ValueError(f'method must be "dino" or "mae", got {method!r}')
    if tuple(out.shape[-2:]) != (new_rows, new_cols):  # cannot happen with the +0.1; guards edits
        raise RuntimeError(f"resampled grid is {tuple(out.shape[-2:])}, expected {(new_rows, new_cols)}")
    out = out.permute(0, 2, 3, 1).reshape(new_rows * new_cols, dim)
    return out[None] if batched else out
