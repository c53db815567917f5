"""BM-MAE (Robinet et al., arXiv:2505.00568): a ViT over any subset of T1, T1c, T2 and FLAIR, one tokenizer per
modality, under the upstream parameter names; and the loaders of `bmmae.pth` and `bmmae_tcga.pth`.

Upstream (perkyfever/BM-MAE, bmmae/model.py `ViTEncoder`, bmmae/tokenizers.py `MRITokenizer`): tokenizers =
ModuleDict {modality: MRITokenizer}, each a MONAI PatchEmbeddingBlock (patch_embeddings: Conv3d 1 -> 768, k16 s16;
position_embeddings: the 3D sin-cos table (1, 512, 768), frozen) over one 128^3 modality; the modalities' tokens
concatenated in the order given, a cls_token prepended, 12 MONAI TransformerBlocks (norm1, attn.qkv with bias,
attn.out_proj, norm2, mlp.linear1 768 -> 1536, GELU, mlp.linear2), then norm. Fine-tuning (finetune_cls.py,
BMMAEViT) classifies from the CLS token, which is what the head reads here. pretrain_bmmae.py builds BMMAE over
("t1", "t1ce", "t2", "flair") with a reconstruction `decoder`, and bmmae/loops.py saves `model.state_dict()` flat:
tokenizers.*, cls_token, blocks.*, norm.*, decoder.*; the fine-tuning scripts load it with weights_only=True after
dropping 'decoder' keys. Inputs: 1 mm, centre-cropped to 128^3, z-scored over nonzero voxels per modality.

The missing-modality input it was built for: the network is built for the modalities of the run (--modalities,
any subset, in any order), and loads only those tokenizers; its forward also takes a dict {modality: (B, 1, D, H,
W)} holding any subset of them, as upstream's does. The blocks are written here rather than taken from MONAI (whose
attention needs einops, and whose TransformerBlock since 1.4 holds an unused `norm_cross_attn`, which files written
with it carry and the loader drops, said): the same parameters and the same arithmetic.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from gliograde import MODALITIES
from gliograde.networks.classifier import EncoderClassifier
from gliograde.networks.pretrained.common import (
    NO_MEDICALNET,
    check_weights_for,
    initialise_encoder,
    size_check,
)
from gliograde.networks.pretrained.formats import PretrainedFormat, State, register_format
from gliograde.networks.registry import ArchSpec, register_architecture

BMMAE_MODALITIES = ("t1", "t1ce", "t2", "flair")  # pretrain_bmmae.py's, and gliograde's names
SIZE = {"hidden_size": 768, "num_layers": 12, "num_heads": 12, "mlp_dim": 1536, "patch_size": 16}


def sincos_position_embedding(grid: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """MONAI's build_sincos_position_embedding (pos_embed_utils.py) for a cubic 3D grid: (1, grid^3, dim)."""
    if dim % 6:
        raise ValueError(f"hidden size {dim} is not divisible by 6 (3D sin-cos position embedding)")
    axis = torch.arange(grid, dtype=torch.float32)
    gh, gw, gd = torch.meshgrid(axis, axis, axis, indexing="ij")
    pos_dim = dim // 6
    omega = 1.0 / (temperature ** (torch.arange(pos_dim, dtype=torch.float32) / pos_dim))
    oh, ow, od = (torch.einsum("m,d->md", g.flatten(), omega) for g in (gh, gw, gd))
    return torch.cat([ow.sin(), ow.cos(), oh.sin(), oh.cos(), od.sin(), od.cos()], dim=1)[None]


class PatchEmbeddingBlock(nn.Module):
    def __init__(self, img_size: int, patch_size: int, hidden_size: int, in_channels: int = 1):
        super().__init__()
        self.patch_embeddings = nn.Conv3d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        pos = sincos_position_embedding(img_size // patch_size, hidden_size)
        self.position_embeddings = nn.Parameter(pos, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch_embeddings(x).flatten(2).transpose(-1, -2) + self.position_embeddings


class MRITokenizer(nn.Module):
    def __init__(self, img_size: int, patch_size: int, hidden_size: int):
        super().__init__()
        self.patch_embedding = PatchEmbeddingBlock(img_size, patch_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch_embedding(x)


class SABlock(nn.Module):
    """MONAI's SABlock: qkv -> 'b h (qkv l d) -> qkv b l h d', softmax(q k^T / sqrt(d)) v, out_proj."""

    def __init__(self, hidden_size: int, num_heads: int, dropout_rate: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, hidden_size * 3, bias=True)
        self.out_proj = nn.Linear(hidden_size, hidden_size)
        self.dropout_rate = dropout_rate
        self.drop_output = nn.Dropout(dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout_rate if self.training else 0.0)
        return self.drop_output(self.out_proj(x.transpose(1, 2).reshape(b, n, c)))


class MLPBlock(nn.Module):
    def __init__(self, hidden_size: int, mlp_dim: int, dropout_rate: float = 0.0):
        super().__init__()
        self.linear1 = nn.Linear(hidden_size, mlp_dim)
        self.linear2 = nn.Linear(mlp_dim, hidden_size)
        self.fn = nn.GELU()
        self.drop1, self.drop2 = nn.Dropout(dropout_rate), nn.Dropout(dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.linear2(self.drop1(self.fn(self.linear1(x)))))


class TransformerBlock(nn.Module):
    def __init__(self, hidden_size: int, mlp_dim: int, num_heads: int, dropout_rate: float = 0.0):
        super().__init__()
        self.mlp = MLPBlock(hidden_size, mlp_dim, dropout_rate)
        self.norm1 = nn.LayerNorm(hidden_size)
        self.attn = SABlock(hidden_size, num_heads, dropout_rate)
        self.norm2 = nn.LayerNorm(hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class BMMAEEncoder(nn.Module):
    """Upstream's ViTEncoder: (B, M, D, H, W) with channel i the modality `modalities[i]`, or a dict of any subset
    {modality: (B, 1, D, H, W)} -> normed tokens (B, 1 + m * (S/16)^3, hidden), the CLS token first."""

    def __init__(self, modalities, img_size: int = 128, patch_size: int = 16, hidden_size: int = 768,
                 num_layers: int = 12, num_heads: int = 12, mlp_dim: int = 1536,
                 dropout_rate: float = 0.0):  # fmt: skip
        super().__init__()
        unknown = [m for m in modalities if m not in BMMAE_MODALITIES]
        if unknown or not modalities or len(set(modalities)) != len(modalities):
            raise ValueError(f"BM-MAE takes a subset of {', '.join(BMMAE_MODALITIES)}, each once; got "
                             f"{', '.join(modalities) or 'none'}")  # fmt: skip
        if img_size % patch_size:
            raise ValueError(f"--size {img_size} is not divisible by the patch size {patch_size}")
        self.modalities = tuple(modalities)
        self.tokenizers = nn.ModuleDict({m: MRITokenizer(img_size, patch_size, hidden_size) for m in modalities})
        self.hidden_size = hidden_size
        self.norm = nn.LayerNorm(hidden_size)
        self.blocks = nn.ModuleList(TransformerBlock(hidden_size, mlp_dim, num_heads, dropout_rate)
                                    for _ in range(num_layers))  # fmt: skip
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, x: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
        if not isinstance(x, dict):
            if x.shape[1] != len(self.modalities):
                raise ValueError(f"{x.shape[1]} input channels for the {len(self.modalities)} modalities "
                                 f"{', '.join(self.modalities)}")  # fmt: skip
            x = {m: x[:, i : i + 1] for i, m in enumerate(self.modalities)}
        unknown = [m for m in x if m not in self.tokenizers]
        if unknown or not x:
            raise ValueError(f"this BM-MAE encoder was built for {', '.join(self.modalities)}; got "
                             f"{', '.join(x) or 'no modality'}")  # fmt: skip
        tokens = torch.cat([self.tokenizers[m](t) for m, t in x.items()], dim=1)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        for blk in self.blocks:
            tokens = blk(tokens)
        return self.norm(tokens)


class BMMAEClassifier(EncoderClassifier):
    """BM-MAE's encoder with one linear layer on its CLS token (upstream's fine-tuning reads the CLS token)."""

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """Input first: the tokenizers and the CLS token, each block, the final norm."""
        enc = self.encoder
        embed = [*enc.tokenizers.parameters(), enc.cls_token]
        return [embed, *[list(b.parameters()) for b in enc.blocks], list(enc.norm.parameters())]


def _cls_token(encoder: BMMAEEncoder, x) -> torch.Tensor:
    return encoder(x)[:, :1]  # (B, 1, C): the classifier's mean over tokens is the CLS token


def _describe(cfg, in_channels: int) -> dict:
    mods = list(cfg.modalities) if len(cfg.modalities) == in_channels else list(MODALITIES[:in_channels])
    return {"model": "bm-mae", "in_channels": in_channels, "num_classes": 2, "dropout": cfg.dropout,
            "modalities": mods, "img_size": cfg.size, **SIZE}  # fmt: skip


def _build(d: dict) -> BMMAEClassifier:
    if len(d["modalities"]) != d["in_channels"]:
        raise ValueError(f"{d['in_channels']} input channels for the modalities {d['modalities']}")
    enc = BMMAEEncoder(d["modalities"], d["img_size"], d["patch_size"], d["hidden_size"], d["num_layers"],
                       d["num_heads"], d["mlp_dim"])  # fmt: skip
    return BMMAEClassifier(enc, _cls_token, d["hidden_size"], d["num_classes"], d.get("dropout", 0.0), (),
                           f"BM-MAE ViT over {'+'.join(d['modalities'])}", d["in_channels"])  # fmt: skip


register_architecture(ArchSpec(
    "bm-mae", _describe, _build, BMMAEClassifier, initialise_encoder("bm-mae"),
    display=lambda desc: "BM-MAE-ViTB16", config_defaults=NO_MEDICALNET,
    check=size_check("bm-mae", 16, "the patch size 16"),
    check_weights=check_weights_for("bm-mae"), batchnorm_per_volume=False,
))  # fmt: skip


def _tokenizer_modalities(state: State) -> list[str]:
    return sorted({k.split(".")[1] for k in state if k.startswith("tokenizers.") and k.count(".") >= 2})


def check_modalities(state: State, model) -> str | None:
    """A modality of the run that the file has no tokenizer for cannot be embedded: one line, nothing loaded."""
    built = getattr(getattr(model, "encoder", None), "modalities", None)
    if built is None:
        return None  # not a BM-MAE network: the key check names what differs
    have = _tokenizer_modalities(state)
    lacking = [m for m in built if m not in have]
    if lacking:
        return (f"the file has tokenizers for {', '.join(have) or 'no modality'} only, and the run asks "
                f"{', '.join(lacking)} (--modalities {','.join(built)}): BM-MAE embeds each modality with its own "
                f"pretrained tokenizer, so choose --modalities among {', '.join(have) or 'none'}")  # fmt: skip
    return None


def translate_bmmae(state: State, model) -> tuple[State, dict[str, str]]:
    built = set(getattr(model.encoder, "modalities", ())) if hasattr(model, "encoder") else set()
    kept, dropped = {}, {}
    for k, v in state.items():
        if k.startswith("decoder."):
            dropped[k] = "the masked-autoencoder's reconstruction decoder"
        elif k.startswith("output_layer."):
            dropped[k] = "a fine-tuned head (BMMAEViT.output_layer)"
        elif ".norm_cross_attn." in k:
            dropped[k] = "MONAI's cross-attention norm, unused without cross-attention"
        elif k.startswith("tokenizers.") and built and k.split(".")[1] not in built:
            dropped[k] = "the tokenizers of modalities not among --modalities (BM-MAE takes any subset)"
        else:
            kept[k] = v
    return kept, dropped


def _sniff(state: State) -> bool:
    return any(k.startswith("tokenizers.") and k.endswith("patch_embedding.patch_embeddings.weight") for k in state)


PRETRAINING = ("BraTS 2021 training set, T1, T1c, T2, FLAIR, masked autoencoding (Robinet et al., arXiv:2505.00568; "
               "perkyfever/BM-MAE README.md, pretrain_bmmae.py)")  # fmt: skip
COMMON = dict(
    architectures=("bm-mae",), licence="no licence file in the repository (perkyfever/BM-MAE): ask the authors",
    where="https://huggingface.co/luklebigbosse/BM-MAE, or the Google Drive folder of perkyfever/BM-MAE README.md",
    translate=translate_bmmae, sniff=_sniff, check=check_modalities,
    input_note="any subset of T1, T1c, T2, FLAIR (no channel adaptation: one pretrained tokenizer per modality), "
    "each 128^3 at 1 mm, z-scored over nonzero voxels per modality",
)  # fmt: skip

register_format(PretrainedFormat(
    name="bm-mae",
    title="BM-MAE (BraTS 2021)",
    pretraining=PRETRAINING,
    overlap="BM-MAE (bmmae.pth) was pretrained on the BraTS 2021 training set (Robinet et al., arXiv:2505.00568; "
    "perkyfever/BM-MAE pretrain_bmmae.py), whose cases include the TCGA-GBM/LGG patients of TCIA: on a BraTS or "
    "TCGA cohort, patients these weights saw (their images, not their labels) sit in your validation folds. Treat "
    "fine-tuned AUCs as possibly optimistic, compare with a run from random initialisation, and use "
    "--pretrained-format bm-mae-notcga (bmmae_tcga.pth) to keep TCGA external",
    files=("bmmae.pth",),
    **COMMON,
))  # fmt: skip

register_format(PretrainedFormat(
    name="bm-mae-notcga",
    title="BM-MAE (BraTS 2021 without TCGA)",
    pretraining=PRETRAINING + ", less its TCGA patients (those of data/data.csv, withdrawn in pretrain_bmmae.py)",
    overlap="BM-MAE's no-TCGA weights (bmmae_tcga.pth) were pretrained on BraTS 2021 less its TCGA patients "
    "(perkyfever/BM-MAE README.md, pretrain_bmmae.py's withdrawal of data/data.csv): TCGA stays external, but every "
    "other BraTS 2021 patient was seen in pretraining, so on a BraTS cohort treat fine-tuned AUCs as possibly "
    "optimistic, and compare with a run from random initialisation",
    files=("bmmae_tcga.pth",),
    **COMMON,
))  # fmt: skip
