"""A small torch.nn copy of timm's ``VisionTransformer`` as DeiT uses it (timm/models/vision_transformer.py:
``PatchEmbed``, ``Attention`` with the fused ``qkv``, ``Mlp``, ``Block``; class token, learned position
embedding, pre-norm blocks, final ``norm``, ``head`` on ``x[:, 0]``), with timm's parameter names and
shapes, so the converter's tests need torch alone and not timm.

benchmarks/check_timm_reference.py checks it against the real timm once: the same state_dict names and
shapes as ``timm.create_model('deit_{tiny,small,base}_patch16_224')`` and identical logits with timm's
weights loaded.

``forward`` returns the logits and the tuple of every block's output tokens (B, N + 1, D), as the zoo's
ViT returns ``(logits, features)``.
"""

from __future__ import annotations

import torch
from torch import nn


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int, in_chans: int = 3):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D), row-major over the patch grid


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, N, head_dim) each
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    def __init__(self, img_size: int = 224, patch_size: int = 16, num_classes: int = 1000,
                 embed_dim: int = 192, depth: int = 12, num_heads: int = 3, mlp_ratio: float = 4.0):
        super().__init__()
        num_patches = (img_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        features = []
        for block in self.blocks:
            x = block(x)
            features.append(x)
        x = self.norm(x)
        return self.head(x[:, 0]), tuple(features)


DEIT = {"deit_tiny_patch16_224": dict(embed_dim=192, num_heads=3),
        "deit_small_patch16_224": dict(embed_dim=384, num_heads=6),
        "deit_base_patch16_224": dict(embed_dim=768, num_heads=12)}


def deit(arch: str, **overrides) -> VisionTransformer:
    """timm's ``arch`` (one of :data:`DEIT`), with keyword overrides (e.g. ``depth=2``, ``img_size=32``)."""
    return VisionTransformer(**{**DEIT[arch], **overrides})


def randomize(model: VisionTransformer, seed: int = 0) -> VisionTransformer:
    """Random weights of a realistic scale in every tensor (biases and LayerNorm affine parameters
    included, so that none of the conversion's mappings is tested on zeros or ones); eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=generator))
            elif p.dim() >= 2 and name not in ("cls_token", "pos_embed"):
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=generator) * fan_in ** -0.5)
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=generator))
    return model.eval()
