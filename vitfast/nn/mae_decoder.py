"""MAE's decoder (He et al. 2021, docs/methods.md §1.2), with MAE's parameter names (``decoder_embed``,
``mask_token``, ``decoder_pos_embed``, ``decoder_blocks``, ``decoder_norm``, ``decoder_pred``).

    decoder = MAEDecoder(num_patches=64, patch_size=4, in_chans=3, encoder_dim=192)
    pred = decoder(encoder_tokens, ids_restore)   # [B, N, p*p*C], MAE's (i, j, c) patch order
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .pos_embed import sincos_2d_pos_embed
from .vit import LAYER_NORM_EPS, Block


class MAEDecoder(nn.Module):
    def __init__(self, *, num_patches: int, grid_size=None, patch_size: int, in_chans: int, encoder_dim: int,
                 decoder_dim: int = 512, depth: int = 8, num_heads: int = 16, mlp_ratio: float = 4.0):
        super().__init__()
        side = int(round(num_patches ** 0.5))
        grid_size = grid_size or (side, side)
        self.num_patches = num_patches
        self.decoder_embed = nn.Linear(encoder_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        # Fixed sin-cos table with a zero CLS row, frozen like MAE's.
        table = sincos_2d_pos_embed(decoder_dim, grid_size, cls_token=True).unsqueeze(0)
        self.decoder_pos_embed = nn.Parameter(table, requires_grad=False)
        self.decoder_blocks = nn.ModuleList(Block(decoder_dim, num_heads, mlp_ratio, True) for _ in range(depth))
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=LAYER_NORM_EPS)
        self.decoder_pred = nn.Linear(decoder_dim, patch_size * patch_size * in_chans)
        torch.nn.init.normal_(self.mask_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def no_weight_decay(self):
        return {"mask_token", "decoder_pos_embed"}

    def forward(self, tokens: Tensor, ids_restore: Tensor) -> Tensor:
        """tokens [B, 1 + K, D_enc] (CLS first, kept patches in keep order), ids_restore [B, N] → [B, N, p*p*C]."""
        x = self.decoder_embed(tokens)
        batch, kept = x.shape[0], x.shape[1] - 1
        masks = self.mask_token.to(x.dtype).expand(batch, self.num_patches - kept, -1)
        patches = torch.cat([x[:, 1:], masks], dim=1)  # shuffled order: kept first, then masked
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # unshuffle
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed.to(x.dtype)
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x[:, 1:]))  # per-token maps: dropping CLS first is the same
