"""SAM-Med3D's image encoder (Wang et al., arXiv:2310.15161), under the upstream parameter names, and the loader of
`sam_med3d_turbo.pth`.

Upstream (uni-medical/SAM-Med3D, segment_anything/modeling/image_encoder3D.py): ImageEncoderViT3D, a ViTDet-style
3D ViT: patch_embed.proj (Conv3d k16 s16), an absolute pos_embed (1, S/16, S/16, S/16, C), blocks of norm1 ->
Attention (qkv, proj, decomposed relative positions rel_pos_d/h/w) in 14^3 windows (padded) or global at blocks 2,
5, 8, 11 -> norm2 -> MLPBlock (lin1, GELU, lin2), and a neck of Conv3d 1x1 -> LayerNorm3d -> Conv3d 3x3 ->
LayerNorm3d. segment_anything/build_sam3D.py's `vit_b_ori`, the turbo model's: 128^3 input, patch 16, embed 768,
depth 12, 12 heads, mlp ratio 4, LayerNorm eps 1e-6, out_chans 384; one input channel. train.py saves
{'model_state_dict': Sam3D.state_dict() (image_encoder.*, prompt_encoder.*, mask_decoder.*), 'optimizer_state_dict',
..., 'args'} and the loaders read ckpt['model_state_dict'] (a file that still holds the argparse Namespace `args`
is refused by weights_only: re-save its model_state_dict). Inputs were z-scored over the foreground
(torchio ZNormalization, masking x > 0), in 128^3 crops.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from gliograde.networks.classifier import EncoderClassifier
from gliograde.networks.pretrained.common import (
    NO_MEDICALNET,
    check_weights_for,
    initialise_encoder,
    size_check,
)
from gliograde.networks.pretrained.formats import PretrainedFormat, State, register_format
from gliograde.networks.registry import ArchSpec, register_architecture

# segment_anything/build_sam3D.py, vit_b_ori (SAM-Med3D-turbo)
TURBO = {"patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12, "out_chans": 384, "window_size": 14,
         "global_attn_indexes": [2, 5, 8, 11]}  # fmt: skip


class MLPBlock(nn.Module):
    def __init__(self, embedding_dim: int, mlp_dim: int):
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class LayerNorm3d(nn.Module):
    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None, None] * x + self.bias[:, None, None, None]


def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    max_rel_dist = int(2 * max(q_size, k_size) - 1)
    if rel_pos.shape[0] != max_rel_dist:
        resized = F.interpolate(rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1), size=max_rel_dist,
                                mode="linear")  # fmt: skip
        resized = resized.reshape(-1, max_rel_dist).permute(1, 0)
    else:
        resized = rel_pos
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    relative = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return resized[relative.long()]


def add_decomposed_rel_pos(attn, q, rel_pos_d, rel_pos_h, rel_pos_w, q_size, k_size) -> torch.Tensor:
    q_d, q_h, q_w = q_size
    k_d, k_h, k_w = k_size
    rd, rh, rw = get_rel_pos(q_d, k_d, rel_pos_d), get_rel_pos(q_h, k_h, rel_pos_h), get_rel_pos(q_w, k_w, rel_pos_w)
    b, _, dim = q.shape
    r_q = q.reshape(b, q_d, q_h, q_w, dim)
    rel_d = torch.einsum("bdhwc,dkc->bdhwk", r_q, rd)
    rel_h = torch.einsum("bdhwc,hkc->bdhwk", r_q, rh)
    rel_w = torch.einsum("bdhwc,wkc->bdhwk", r_q, rw)
    attn = (attn.view(b, q_d, q_h, q_w, k_d, k_h, k_w) + rel_d[:, :, :, :, None, None]
            + rel_h[:, :, :, None, :, None] + rel_w[:, :, :, None, None, :])  # fmt: skip
    return attn.view(b, q_d * q_h * q_w, k_d * k_h * k_w)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, input_size: tuple[int, int, int]):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_d = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[2] - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, d, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, d * h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * self.num_heads, d * h * w, -1).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = add_decomposed_rel_pos(attn, q, self.rel_pos_d, self.rel_pos_h, self.rel_pos_w, (d, h, w), (d, h, w))
        attn = attn.softmax(dim=-1)
        x = (attn @ v).view(b, self.num_heads, d, h, w, -1).permute(0, 2, 3, 4, 1, 5).reshape(b, d, h, w, -1)
        return self.proj(x)


def window_partition3d(x: torch.Tensor, ws: int):
    b, d, h, w, c = x.shape
    pad_d, pad_h, pad_w = (ws - d % ws) % ws, (ws - h % ws) % ws, (ws - w % ws) % ws
    if pad_d or pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h, 0, pad_d))
    dp, hp, wp = d + pad_d, h + pad_h, w + pad_w
    x = x.view(b, dp // ws, ws, hp // ws, ws, wp // ws, ws, c)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).contiguous().view(-1, ws, ws, ws, c), (dp, hp, wp)


def window_unpartition3d(windows: torch.Tensor, ws: int, pad_dhw, dhw) -> torch.Tensor:
    (dp, hp, wp), (d, h, w) = pad_dhw, dhw
    b = windows.shape[0] // (dp * hp * wp // ws // ws // ws)
    x = windows.view(b, dp // ws, hp // ws, wp // ws, ws, ws, ws, -1)
    x = x.permute(0, 1, 4, 2, 5, 3, 6, 7).contiguous().view(b, dp, hp, wp, -1)
    return x[:, :d, :h, :w, :].contiguous() if (dp, hp, wp) != (d, h, w) else x


class Block3D(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, window_size: int, input_size):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, input_size if window_size == 0 else (window_size,) * 3)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio))
        self.window_size = window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            d, h, w = x.shape[1], x.shape[2], x.shape[3]
            x, pad_dhw = window_partition3d(x, self.window_size)
        x = self.attn(x)
        if self.window_size > 0:
            x = window_unpartition3d(x, self.window_size, pad_dhw, (d, h, w))
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class PatchEmbed3D(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 4, 1)  # B C X Y Z -> B X Y Z C


class ImageEncoderViT3D(nn.Module):
    """(B, C, S, S, S) -> (B, out_chans, S/16, S/16, S/16); S fixed by the absolute position embedding."""

    def __init__(self, img_size: int = 128, patch_size: int = 16, in_chans: int = 1, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, out_chans: int = 384,
                 window_size: int = 14, global_attn_indexes=(2, 5, 8, 11)):  # fmt: skip
        super().__init__()
        self.img_size = img_size
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed3D(patch_size, in_chans, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, grid, embed_dim))
        self.blocks = nn.ModuleList(
            Block3D(embed_dim, num_heads, mlp_ratio, 0 if i in global_attn_indexes else window_size, (grid,) * 3)
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv3d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm3d(out_chans),
            nn.Conv3d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm3d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.neck(x.permute(0, 4, 1, 2, 3))


class SAMMed3DClassifier(EncoderClassifier):
    """SAM-Med3D's image encoder with global average pooling of its neck's output and one linear layer."""

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """Input first: the patch and position embeddings, each block, the neck."""
        enc = self.encoder
        embed = [*enc.patch_embed.parameters(), enc.pos_embed]
        return [embed, *[list(b.parameters()) for b in enc.blocks], list(enc.neck.parameters())]


def _describe(cfg, in_channels: int) -> dict:
    return {"model": "sam-med3d", "in_channels": in_channels, "num_classes": 2, "dropout": cfg.dropout,
            "img_size": cfg.size, **TURBO}  # fmt: skip


def _build(d: dict) -> SAMMed3DClassifier:
    size, patch = d["img_size"], d["patch_size"]
    if size % patch:
        raise ValueError(f"--size {size} is not divisible by the patch size {patch}")
    encoder = ImageEncoderViT3D(size, patch, d["in_channels"], d["embed_dim"], d["depth"], d["num_heads"], 4.0,
                                d["out_chans"], d["window_size"], tuple(d["global_attn_indexes"]))  # fmt: skip
    return SAMMed3DClassifier(encoder, lambda enc, x: enc(x), d["out_chans"], d["num_classes"], d.get("dropout", 0.0),
                              ("blocks",), "SAM-Med3D image encoder (ViT-B/16, 3D)", d["in_channels"])  # fmt: skip


register_architecture(ArchSpec(
    "sam-med3d", _describe, _build, SAMMed3DClassifier, initialise_encoder("sam-med3d"),
    display=lambda desc: "SAM-Med3D-ViTB16", config_defaults=NO_MEDICALNET,
    check=size_check("sam-med3d", 16, "the patch size 16"),
    check_weights=check_weights_for("sam-med3d"), batchnorm_per_volume=False,
))  # fmt: skip


def translate_sam(state: State, model) -> tuple[State, dict[str, str]]:
    kept, dropped = {}, {}
    for k, v in state.items():
        if k.startswith(("prompt_encoder.", "mask_decoder.")):
            dropped[k] = "the promptable segmenter's prompt encoder and mask decoder"
        elif k in ("pixel_mean", "pixel_std"):
            dropped[k] = "the 2D SAM's pixel statistics (unused in 3D)"
        else:
            kept[k.removeprefix("image_encoder.")] = v
    return kept, dropped


register_format(PretrainedFormat(
    name="sam-med3d-turbo",
    title="SAM-Med3D-turbo image encoder",
    architectures=("sam-med3d",),
    pretraining="SA-Med3D-140K (143K 3D masks, 245 categories), then 44 public datasets for turbo, among them "
    "BraTS2020, BraTS2021 and the Decathlon's BrainTumour (uni-medical/SAM-Med3D readme.md; issue #39, the list of "
    "issue #2)",
    overlap="SAM-Med3D-turbo was trained on BraTS2020, BraTS2021 and the Medical Segmentation Decathlon's "
    "BrainTumour (BraTS 2016/2017) with their tumour masks (uni-medical/SAM-Med3D issue #39, the dataset list of "
    "issue #2), which include the TCGA-GBM/LGG patients of TCIA. Patients these weights saw may sit in your "
    "validation folds: treat fine-tuned BraTS or TCGA AUCs as possibly optimistic, and compare with a run from "
    "random initialisation",
    licence="Apache-2.0",
    files=("sam_med3d_turbo.pth",),
    where="https://huggingface.co/blueyo0/SAM-Med3D (sam_med3d_turbo.pth), or the Google Drive link of "
    "uni-medical/SAM-Med3D readme.md",
    translate=translate_sam,
    sniff=lambda state: "image_encoder.patch_embed.proj.weight" in state
    or ("patch_embed.proj.weight" in state and "neck.0.weight" in state),
    channel_keys=("patch_embed.proj.weight",),
    input_note="1 channel, exactly 128^3 (the absolute position embedding: --size 128), z-scored over the "
    "foreground",
))  # fmt: skip
