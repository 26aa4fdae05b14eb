"""Vision Transformer with timm-compatible parameter names and a masked / re-positioned token input.

    model = ViT.small_data(num_classes=10)                     # Gani et al. small-data ViT, 32 px
    logits = model(images)                                     # images [B, 3, 32, 32] -> [B, 10]
    tokens = model.forward_features(images, keep_idx, pos_idx) # [B, 1 + K, D], CLS first, final norm

Parameter names follow timm's `VisionTransformer` (`patch_embed.proj`, `cls_token`, `pos_embed`,
`blocks.{i}.norm1`, `blocks.{i}.attn.qkv`, `blocks.{i}.attn.proj`, `blocks.{i}.norm2`,
`blocks.{i}.mlp.fc1`, `blocks.{i}.mlp.fc2`, `norm`, `head`), so timm, MAE and DINO checkpoints
load with `load_state_dict` (MAE pre-training checkpoints carry decoder keys too: `strict=False`).

Token input (see `forward_features`), always through the fused op `vitfast.ops.masked_patch_embed`:
- full images: patch embedding of every patch + pos-embed, N = (H/p)(W/p) tokens in grid order;
- `keep_idx: [B, K] int64`: only the K listed patches are embedded (MAE / DILEMMA); the op never
  computes the embeddings of dropped patches;
- `pos_idx: [B, K] int64`: token k gets the position embedding of grid cell `pos_idx[b, k]` instead of
  `keep_idx[b, k]` (DILEMMA's deliberately wrong positions).
The CLS token gets `pos_embed[:, 0]`, like timm: zero for the sin-cos table (MAE), learned otherwise.

Position embedding, `pos_embed_kind`:
- "learned": Parameter [1, 1 + N, D], trunc-normal std 0.02;
- "sincos":  MAE's fixed 2-D table (vitfast.nn.pos_embed), stored like MAE as a Parameter with
             requires_grad=False named `pos_embed`, so it is in the state dict and checkpoints load;
- "none":    no `pos_embed` at all (RelViT upstream: position must be inferred from content).
  `enable_pos_embed(kind)` switches a "none" model to "learned" or "sincos" later (RelViT fine-tuning);
  it creates a new Parameter, so build the optimizer after calling it.

Other image sizes (DINO's local crops) need `dynamic_img_size=True`; the patch part of the table is
then resampled (DINO's bicubic with its +0.1 quirk by default, `pos_embed_resample="mae"` for MAE's).

Attention, `attn_impl`:
- "auto" (default): vitfast.ops.self_attention (the fused CPU op: no head split / merge copies, fp32 GEMMs and
  softmax for fp16 / bf16 storage) on CPU tensors of the dtypes and lengths where it measured faster than SDPA
  (FUSED_MAX_TOKENS) and without attention dropout in training; "sdpa" otherwise;
- "sdpa": F.scaled_dot_product_attention (FlashAttention-2 / memory-efficient kernels on GPU);
- "vitfast": vitfast.ops.self_attention always (attention dropout is not supported there: a ValueError);
- "xformers": xformers.ops.memory_efficient_attention (must be installed);
- "math": explicit softmax(QK^T/sqrt(d))V, the reference the others are tested against.

Differences from timm kept on purpose: LayerNorm eps 1e-6 always (timm's ViT presets, MAE, DINO);
`global_pool="avg"` averages the final-norm patch tokens (DINO's linear-probe pooling) where timm and
MAE fine-tuning swap the final norm for an `fc_norm` applied after pooling.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from vitfast import ops
from vitfast.ops._checks import describe as _describe
from vitfast.ops.self_attention import BACKENDS as _SELF_ATTENTION
from vitfast.nn.pos_embed import resample_pos_embed, sincos_2d_pos_embed, to_grid_size

__all__ = ["ViT", "VIT_CONFIGS", "vit_config", "PatchEmbed", "Attention", "Mlp", "Block", "DropPath"]

ImageSize = Union[int, Sequence[int]]

POS_EMBED_KINDS = ("learned", "sincos", "none")
ATTN_IMPLS = ("auto", "sdpa", "vitfast", "xformers", "math")
# "auto" takes the fused CPU op for these dtypes of the qkv projection up to this many tokens (fp64: SDPA). Forward +
# backward against SDPA as timm calls it, quiet 2-core AMD EPYC (AVX2), 2026-12-02 (README, Benchmarks): fp32 1.05-1.42x
# faster from N = 17 to 577, 0.75x at 785, 0.47x at 1025 (whole score rows per (b, h) leave the caches); bf16 2.4-5.4x
# faster from 17 to 1025 (PyTorch's bf16 CPU flash backward is slow), fp16 4.8-6.0x from 197 to 1025.
FUSED_MAX_TOKENS = {torch.float32: 600, torch.bfloat16: 1025, torch.float16: 1025}
GLOBAL_POOLS = ("token", "avg")
WEIGHT_INITS = ("timm", "mae")
LAYER_NORM_EPS = 1e-6

# Architecture numbers of the papers. Anything not listed takes ViT.__init__'s default
# (qkv_bias True, LayerNorm eps 1e-6, GELU MLP, learned pos-embed, no dropout).
VIT_CONFIGS: Dict[str, Dict[str, Any]] = {
    # DeiT-Ti / DeiT-S: Touvron et al., "Training data-efficient image transformers", ICML 2021, Table 1.
    "tiny": dict(img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3, mlp_ratio=4.0),
    "small": dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0),
    # ViT-B/16: Dosovitskiy et al., "An image is worth 16x16 words", ICLR 2021, Table 1.
    "base": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0),
    # Gani, Naseer, Yaqub, "How to train ViT on small-scale datasets?", BMVC 2022, Sec. 4 (implementation
    # details; docs/methods.md §5.1): 32-px images, patch 4 (use patch_size=8 for 64-px data), drop-path 0.1.
    "small_data": dict(
        img_size=32, patch_size=4, embed_dim=192, depth=9, num_heads=12, mlp_ratio=2.0, drop_path_rate=0.1
    ),
}


def vit_config(name: str) -> Dict[str, Any]:
    """A copy of the architecture table entry `name` (tiny, small, base, small_data)."""
    if name not in VIT_CONFIGS:
        raise ValueError(f"ViT config name must be one of {sorted(VIT_CONFIGS)}, got {name!r}")
    return copy.deepcopy(VIT_CONFIGS[name])


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _load_xformers_attention() -> Callable[..., torch.Tensor]:
    try:
        import xformers.ops as xops  # optional dependency
    except ImportError as exc:
        raise ImportError(
            'attn_impl="xformers" needs the xformers package, which is not installed '
            '(pip install xformers); attn_impl="sdpa" uses FlashAttention-2 through PyTorch instead'
        ) from exc
    return xops.memory_efficient_attention


class DropPath(nn.Module):
    """Stochastic depth per sample: zero a residual branch with probability drop_prob, scale the rest by
    1 / (1 - drop_prob). Identity in eval mode."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep_prob)
        return x * mask.div_(keep_prob)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> Linear(C p^2, D) as a strided Conv2d: [B, C, H, W] -> [B, N, D]."""

    def __init__(self, img_size: ImageSize, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.img_size = to_grid_size(img_size, "img_size")
        if not isinstance(patch_size, int) or patch_size <= 0:
            raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
        if self.img_size[0] % patch_size or self.img_size[1] % patch_size:
            raise ValueError(f"img_size must be divisible by patch_size={patch_size}, got {self.img_size}")
        self.patch_size = patch_size
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention, fused qkv: [B, N, D] -> [B, N, D]."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        attn_impl: str = "auto",
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed_dim must be divisible by num_heads, got {dim} and {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = float(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.set_attn_impl(attn_impl)

    def set_attn_impl(self, attn_impl: str) -> None:
        _check_choice("attn_impl", attn_impl, ATTN_IMPLS)
        if attn_impl == "vitfast" and self.attn_drop > 0:
            raise ValueError(f'attn_impl="vitfast" has no attention dropout, got attn_drop={self.attn_drop}; '
                             'use "auto" or "sdpa"')
        self._xformers_attention = _load_xformers_attention() if attn_impl == "xformers" else None
        self._fused_cpu_built = _SELF_ATTENTION.runs_on("cpu", torch.device("cpu"))  # vitfast._C has the kernel
        self.attn_impl = attn_impl

    def uses_fused_op(self, qkv: torch.Tensor) -> bool:
        """Whether forward runs vitfast.ops.self_attention on this qkv projection output [B, N, 3 D] (module doc)."""
        if self.attn_impl == "vitfast":
            return True
        return (self.attn_impl == "auto" and qkv.device.type == "cpu" and self._fused_cpu_built
                and qkv.shape[1] <= FUSED_MAX_TOKENS.get(qkv.dtype, 0) and not (self.training and self.attn_drop > 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        dropout_p = self.attn_drop if self.training else 0.0
        qkv = self.qkv(x)  # under autocast already in its dtype
        if self.uses_fused_op(qkv):  # [B, N, 3 D] -> [B, N, D], heads split and merged in place
            return self.proj_drop(self.proj(ops.self_attention(qkv, self.num_heads, self.scale)))
        qkv = qkv.reshape(B, N, 3, self.num_heads, self.head_dim)
        if self.attn_impl == "xformers":
            q, k, v = qkv.unbind(2)  # xformers wants [B, N, heads, head_dim]
            out = self._xformers_attention(q, k, v, p=dropout_p, scale=self.scale).reshape(B, N, D)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [B, heads, N, head_dim]
            if self.attn_impl in ("auto", "sdpa"):
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
            else:
                attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
                out = F.dropout(attn, dropout_p, training=dropout_p > 0) @ v
            out = out.transpose(1, 2).reshape(B, N, D)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, attn_impl={self.attn_impl!r}, attn_drop={self.attn_drop}"


class Mlp(nn.Module):
    """fc1 -> GELU (exact erf form, timm's default) -> fc2."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block: x + DropPath(Attn(LN(x))), then x + DropPath(MLP(LN(x)))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        drop_path: float = 0.0,
        attn_impl: str = "auto",
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, proj_drop, attn_impl)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), proj_drop)
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class ViT(nn.Module):
    """Vision Transformer (timm layout). Sizes: `ViT.tiny/small/base/small_data(**overrides)`,
    `ViT.from_config(name, **overrides)`, or the keyword arguments below.

    Args:
        img_size: int or (H, W) the pos-embed table is built for. Other sizes need dynamic_img_size.
        patch_size: p; N = (H/p)(W/p) tokens on a row-major grid (token n at row n // W_p, col n % W_p).
        in_chans, num_classes: num_classes = 0 makes `head` an Identity (forward returns features).
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: the transformer.
        pos_embed_kind: "learned" | "sincos" | "none" (module docstring).
        global_pool: "token" (CLS) | "avg" (mean of final-norm patch tokens) for forward/forward_head.
        drop_path_rate: stochastic depth of the last block; block i gets rate * i / (depth - 1).
        attn_drop_rate, proj_drop_rate, pos_drop_rate, head_drop_rate: dropout, all 0 by default.
        attn_impl: "auto" | "sdpa" | "vitfast" | "xformers" | "math" (module docstring).
        dynamic_img_size: accept images of other sizes (multiples of p) by resampling the pos-embed.
        pos_embed_resample: "dino" | "mae", how that resampling is done (vitfast.nn.pos_embed).
        weight_init: "timm" (trunc-normal 0.02 Linear, as timm / DINO / Gani et al.) | "mae" (Xavier-uniform
            Linear and patch projection, normal 0.02 CLS, as MAE's encoder).
        patch_embed_backend: backend argument passed to vitfast.ops.masked_patch_embed (None: automatic).
    """

    def __init__(
        self,
        *,
        img_size: ImageSize = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 0,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        pos_embed_kind: str = "learned",
        global_pool: str = "token",
        drop_path_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        head_drop_rate: float = 0.0,
        attn_impl: str = "auto",
        dynamic_img_size: bool = False,
        pos_embed_resample: str = "dino",
        weight_init: str = "timm",
        patch_embed_backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        _check_choice("pos_embed_kind", pos_embed_kind, POS_EMBED_KINDS)
        _check_choice("global_pool", global_pool, GLOBAL_POOLS)
        _check_choice("attn_impl", attn_impl, ATTN_IMPLS)
        _check_choice("weight_init", weight_init, WEIGHT_INITS)
        _check_choice("pos_embed_resample", pos_embed_resample, ("dino", "mae"))
        for name, value in (("in_chans", in_chans), ("embed_dim", embed_dim), ("depth", depth),
                            ("num_heads", num_heads)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")
        if pos_embed_kind == "sincos" and embed_dim % 4 != 0:
            raise ValueError(f'pos_embed_kind="sincos" needs embed_dim divisible by 4, got {embed_dim}')

        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_features = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.global_pool = global_pool
        self.pos_embed_kind = pos_embed_kind
        self.dynamic_img_size = dynamic_img_size
        self.pos_embed_resample = pos_embed_resample
        self.patch_embed_backend = patch_embed_backend
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_parameter("pos_embed", None)
        if pos_embed_kind != "none":
            self.pos_embed = self._new_pos_embed(pos_embed_kind, self.cls_token)
        self.pos_drop = nn.Dropout(pos_drop_rate)
        # Stochastic depth grows linearly from 0 (first block) to drop_path_rate (last), as in timm/DINO.
        rates = [drop_path_rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, attn_drop_rate, proj_drop_rate, rates[i], attn_impl)
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self.head_drop = nn.Dropout(head_drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights(weight_init)

    # ----------------------------------------------------------------------------------- configs
    @classmethod
    def from_config(cls, name: str, **overrides: Any) -> "ViT":
        config = vit_config(name)
        config.update(overrides)
        return cls(**config)

    @classmethod
    def tiny(cls, **overrides: Any) -> "ViT":
        return cls.from_config("tiny", **overrides)

    @classmethod
    def small(cls, **overrides: Any) -> "ViT":
        return cls.from_config("small", **overrides)

    @classmethod
    def base(cls, **overrides: Any) -> "ViT":
        return cls.from_config("base", **overrides)

    @classmethod
    def small_data(cls, **overrides: Any) -> "ViT":
        return cls.from_config("small_data", **overrides)

    # -------------------------------------------------------------------------------- properties
    @property
    def patch_size(self) -> int:
        return self.patch_embed.patch_size

    @property
    def grid_size(self) -> Tuple[int, int]:
        return self.patch_embed.grid_size

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    @property
    def img_size(self) -> Tuple[int, int]:
        return self.patch_embed.img_size

    # ---------------------------------------------------------------------------- initialisation
    def _new_pos_embed(self, kind: str, like: torch.Tensor) -> nn.Parameter:
        shape = (1, 1 + self.num_patches, self.embed_dim)
        if kind == "learned":
            table = torch.empty(shape, dtype=like.dtype, device=like.device)
            nn.init.trunc_normal_(table, std=0.02)
            return nn.Parameter(table)
        # MAE keeps the fixed table as a frozen Parameter (not a buffer) named pos_embed.
        table = sincos_2d_pos_embed(self.embed_dim, self.grid_size, cls_token=True, dtype=like.dtype,
                                    device=like.device)
        return nn.Parameter(table[None], requires_grad=False)

    def _init_weights(self, weight_init: str) -> None:
        if weight_init == "mae":
            weight = self.patch_embed.proj.weight.data
            nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
            nn.init.normal_(self.cls_token, std=0.02)
        else:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                if weight_init == "mae":
                    nn.init.xavier_uniform_(module.weight)
                else:
                    nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------------ mutable behaviour
    def enable_pos_embed(self, kind: str = "learned") -> "ViT":
        """Give a pos_embed_kind="none" model a position embedding ("learned" or "sincos"), e.g. for
        RelViT's fine-tuning stage. Adds a new Parameter: build (or rebuild) the optimizer afterwards."""
        _check_choice("kind", kind, ("learned", "sincos"))
        if self.pos_embed is not None:
            raise ValueError(f"enable_pos_embed needs a model without position embedding, this one has "
                             f"pos_embed_kind={self.pos_embed_kind!r}")
        if kind == "sincos" and self.embed_dim % 4 != 0:
            raise ValueError(f'kind="sincos" needs embed_dim divisible by 4, got {self.embed_dim}')
        self.pos_embed = self._new_pos_embed(kind, self.cls_token)
        self.pos_embed_kind = kind
        return self

    def set_attn_impl(self, attn_impl: str) -> "ViT":
        for block in self.blocks:
            block.attn.set_attn_impl(attn_impl)
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> "ViT":
        """Recompute each block in backward instead of storing its activations."""
        self.grad_checkpointing = enable
        return self

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> "ViT":
        if global_pool is not None:
            _check_choice("global_pool", global_pool, GLOBAL_POOLS)
            self.global_pool = global_pool
        self.num_classes = num_classes
        like = self.cls_token
        if num_classes > 0:
            self.head = nn.Linear(self.embed_dim, num_classes, device=like.device, dtype=like.dtype)
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        else:
            self.head = nn.Identity()
        return self

    def no_weight_decay(self) -> set:
        return {"pos_embed", "cls_token"}

    # ----------------------------------------------------------------------------------- checks
    def _check_images(self, images: torch.Tensor) -> Tuple[int, int]:
        """Returns the patch grid (rows, cols) of `images`."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor [B, C, H, W], got {type(images).__name__}")
        if images.dim() != 4:
            raise ValueError(f"images must be [B, C, H, W] (4-D), got {images.dim()}-D {_describe(images)}")
        if not images.is_floating_point():
            raise ValueError(f"images must be a floating-point tensor [B, C, H, W], got {_describe(images)}")
        _, channels, height, width = images.shape
        if channels != self.in_chans:
            raise ValueError(f"images must have in_chans={self.in_chans} channels (dim 1), got {_describe(images)}")
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"images height and width must be divisible by patch_size={p}, "
                             f"got {height}x{width} ({_describe(images)})")
        if (height, width) != self.img_size and not self.dynamic_img_size:
            raise ValueError(
                f"images must be {self.img_size[0]}x{self.img_size[1]} (the model's img_size), got "
                f"{height}x{width}; build the model with dynamic_img_size=True to resample the position "
                f"embedding for other sizes"
            )
        return height // p, width // p

    @staticmethod
    def _check_index(name: str, index: torch.Tensor, images: torch.Tensor, num_tokens: Optional[int],
                     num_patches: int) -> None:
        """Shape, dtype and device; the values' range is checked by vitfast.ops.masked_patch_embed."""
        batch = images.shape[0]
        expected = f"int64 [{batch}, {'K' if num_tokens is None else num_tokens}] with values in [0, {num_patches})"
        if not isinstance(index, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor {expected}, got {type(index).__name__}")
        if (index.dtype != torch.int64 or index.dim() != 2 or index.shape[0] != batch
                or (num_tokens is not None and index.shape[1] != num_tokens)):
            raise ValueError(f"{name} must be {expected}, got {_describe(index)}")
        if index.device != images.device:
            raise ValueError(f"{name} must be on the images' device {images.device}, got {index.device}")

    # ---------------------------------------------------------------------------------- forward
    def _patch_pos_embed(self, grid: Tuple[int, int]) -> Optional[torch.Tensor]:
        """Rows 1.. of the table for `grid`: [N, D], or None without position embedding."""
        if self.pos_embed is None:
            return None
        table = self.pos_embed[0, 1:]
        if grid != self.grid_size:
            table = resample_pos_embed(table, self.grid_size, grid, method=self.pos_embed_resample)
        return table

    def forward_features(
        self,
        images: torch.Tensor,
        keep_idx: Optional[torch.Tensor] = None,
        pos_idx: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """images [B, C, H, W] -> tokens [B, 1 + K, D] after the final norm, CLS first.

        keep_idx [B, K] int64 in [0, N): which patches enter, in this order (None: all N in grid order).
        pos_idx  [B, K] int64 in [0, N): whose position embedding each token gets (None: keep_idx).
        Patch token k is  patch_embed(images)[b, keep_idx[b, k]] + pos_embed[1 + pos_idx[b, k]].
        """
        grid = self._check_images(images)
        num_patches = grid[0] * grid[1]
        batch = images.shape[0]
        if keep_idx is not None:
            self._check_index("keep_idx", keep_idx, images, None, num_patches)
        if pos_idx is not None:
            num_tokens = num_patches if keep_idx is None else keep_idx.shape[1]
            self._check_index("pos_idx", pos_idx, images, num_tokens, num_patches)
        pos_patch = self._patch_pos_embed(grid)

        if keep_idx is None:
            # The full image goes through the op too (all N indices, grid order): one code path, equal
            # values. Measured on CPU against the strided conv + add (min of 40, shared 2-core machine):
            # p = 4 (32 px) forward 3-4x faster, forward+backward 0.8-1.0x the time; p = 8 and 16 within
            # 0.8-1.2x either way, where the patch embedding is under 1% of the model's FLOPs anyway.
            keep_idx = torch.arange(num_patches, device=images.device).expand(batch, num_patches)
        proj = self.patch_embed.proj
        x = ops.masked_patch_embed(images, proj.weight, proj.bias, pos_patch, keep_idx, pos_idx,
                                   backend=self.patch_embed_backend)

        cls = self.cls_token if self.pos_embed is None else self.cls_token + self.pos_embed[:, :1]
        x = torch.cat([cls.expand(batch, -1, -1).to(x.dtype), x], dim=1)
        x = self.pos_drop(x)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.norm(x)

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """tokens [B, 1 + K, D] -> pooled [B, D] (pre_logits) or head(pooled) [B, num_classes]."""
        pooled = tokens[:, 1:].mean(dim=1) if self.global_pool == "avg" else tokens[:, 0]
        pooled = self.head_drop(pooled)
        return pooled if pre_logits else self.head(pooled)

    def forward(
        self,
        images: torch.Tensor,
        keep_idx: Optional[torch.Tensor] = None,
        pos_idx: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        return self.forward_head(self.forward_features(images, keep_idx, pos_idx))
