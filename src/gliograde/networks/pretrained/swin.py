"""Swin UNETR encoder weights (MONAI's `SwinTransformer`, the `.encoder` of --model swinvit), as two projects save them.

MONAI's self-supervised `model_swinvit.pt` (Project-MONAI/research-contributions, SwinUNETR/Pretrain; read by
`SwinUNETR.load_from` in monai/networks/nets/swin_unetr.py): {'state_dict': {'module.patch_embed.proj.weight',
'module.layers{1..4}.0.blocks.{0,1}.{norm1, attn.relative_position_bias_table, attn.relative_position_index,
attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}', 'module.layers{1..4}.0.downsample.{reduction, norm}'}}: DataParallel
keys without the SSL head's attribute, and the MLP under timm's names fc1/fc2, which MONAI's MLPBlock calls
linear1/linear2 (load_from copies fc1 into linear1). One input channel, feature size 48, depths (2,2,2,2), heads
(3,6,12,24), window 7, patch 2; pretrained on 96^3 CT crops at 1.5x1.5x2 mm, intensities -1000..1000 -> 0..1.

Checkpoints of the pretraining script itself (SSLHead: {'state_dict': DDP keys 'module.swin_vit.*' or, in
lab-smile/BrainSegFounder pretrain/T1_T2/ssl_head.py, 'module.swinViT.*', plus rotation_head, contrastive_head and
the reconstruction `conv`}) and of a fine-tuned SwinUNETR ('swinViT.*' beside its CNN decoder encoder1..decoder1,
out) carry MONAI's own names: the same translation reads them all, and drops the heads and the decoder, said.
"""

from __future__ import annotations

from gliograde.networks.pretrained.formats import PretrainedFormat, State, register_format

STAGES = ("patch_embed.", "layers1.", "layers2.", "layers3.", "layers4.", "layers1c.", "layers2c.", "layers3c.",
          "layers4c.")  # fmt: skip
ATTRIBUTES = ("swin_vit.", "swinViT.")  # the research-contributions SSLHead's; BrainSegFounder's and SwinUNETR's
SSL_HEADS = ("rotation_head.", "contrastive_head.", "conv.")
DECODER = ("encoder1.", "encoder2.", "encoder3.", "encoder4.", "encoder10.", "decoder1.", "decoder2.", "decoder3.",
           "decoder4.", "decoder5.", "out.")  # fmt: skip


def translate_swin(state: State, model) -> tuple[State, dict[str, str]]:
    """The encoder's tensors under MONAI's names; the heads and the decoder dropped, said. Other tensors beside an
    encoder (what the pretraining model held besides, which MONAI's load_from never reads) are dropped too; in a
    file without the encoder they are kept, so that the refusal names them."""
    kept, dropped, other = {}, {}, {}
    for k, v in state.items():
        inner = next((k.removeprefix(a) for a in ATTRIBUTES if k.startswith(a)), k)
        if inner.startswith(STAGES):
            kept[inner.replace(".mlp.fc1.", ".mlp.linear1.").replace(".mlp.fc2.", ".mlp.linear2.")] = v
        elif k.startswith(SSL_HEADS):
            dropped[k] = "the self-supervised heads (rotation, contrastive, reconstruction)"
        elif k.startswith(DECODER):
            dropped[k] = "Swin UNETR's convolutional decoder (segmentation)"
        else:
            other[k] = v
    if kept:
        dropped |= dict.fromkeys(other, "beside the Swin encoder, not part of it (MONAI's load_from reads none of it)")
    else:
        kept = other
    return kept, dropped


def _has(state: State, *starts: str) -> bool:
    return any(k.startswith(starts) for k in state)


def sniff_monai_ssl(state: State) -> bool:
    return _has(state, "layers1.0.blocks.", "swin_vit.layers1.0.blocks.")


def sniff_brainsegfounder(state: State) -> bool:
    return _has(state, "swinViT.layers1.0.blocks.")


def relative_index(key: str) -> bool:
    return key.endswith("relative_position_index")  # a buffer every build computes alike


register_format(PretrainedFormat(
    name="swinunetr-ssl",
    title="MONAI self-supervised Swin UNETR",
    architectures=("swinvit",),
    pretraining="5,050 CT volumes: HNSCC, LUNA16, TCIA CT Colonography, TCIA COVID-19, LIDC-IDRI (Tang et al., "
    "arXiv:2111.14791; Project-MONAI/research-contributions SwinUNETR/Pretrain/README.md)",
    overlap=None,
    licence="Apache-2.0",
    files=("model_swinvit.pt",),
    where="https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/model_swinvit.pt",
    translate=translate_swin,
    sniff=sniff_monai_ssl,
    channel_keys=("patch_embed.proj.weight",),
    optional=relative_index,
    input_note="1 channel (CT); 96^3 crops at 1.5x1.5x2 mm, intensities clipped to -1000..1000 and scaled to 0..1; "
    "sides divisible by 32",
))  # fmt: skip

register_format(PretrainedFormat(
    name="brainsegfounder",
    title="BrainSegFounder (Swin UNETR)",
    architectures=("swinvit",),
    pretraining="stage 1: UK Biobank T1/T2 brain MRI (self-supervised); stage 2: BraTS 2021 or ATLAS v2.0 (Cox et "
    "al., arXiv:2406.10395; lab-smile/BrainSegFounder README.md, pretrain/, Downstream/)",
    overlap="BrainSegFounder's stage-2 weights were pretrained on BraTS 2021 (Cox et al., arXiv:2406.10395; "
    "lab-smile/BrainSegFounder Downstream/BraTS), whose cases include the TCGA-GBM/LGG patients of TCIA; its stage-1 "
    "weights saw UK Biobank only, and the two files cannot be told apart by their keys. With stage-2 weights, "
    "patients seen in pretraining may sit in your validation folds (BraTS, TCGA): treat fine-tuned AUCs as "
    "possibly optimistic, and compare with a run from random initialisation",
    licence="GPL-3.0 (code; the weights' terms follow UK Biobank's)",
    files=(),
    where="the Google Drive folder linked from lab-smile/BrainSegFounder README.md",
    translate=translate_swin,
    sniff=sniff_brainsegfounder,
    channel_keys=("patch_embed.proj.weight",),
    optional=relative_index,
    input_note="1 or 2 channels (T1, T1+T2; a 2-channel file fits only a 2-modality run); 96^3 crops",
))  # fmt: skip
