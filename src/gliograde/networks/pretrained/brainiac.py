"""BrainIAC (Tak et al., medRxiv 10.1101/2024.12.02.24317992): a MONAI ViT-B trained with SimCLR, loaded into the
`.encoder` (MONAI's ViT) of --model vit.

Upstream (xwumed/BrainIAC, src/model.py `ViTBackboneNet`): ViT(in_channels=1, img_size=(96, 96, 96), patch_size=16,
hidden_size=768, mlp_dim=3072, num_layers=12, num_heads=12, save_attn=True): learnable position embeddings
(1, 216, 768), qkv without bias, no classification token (the feature it fine-tunes on, features[0][:, 0], is the
first patch token). The file is a PyTorch Lightning checkpoint: ckpt['state_dict'] with the ViT under 'backbone.'
(and the SimCLR projection head beside it), loaded with strict=True after stripping the prefix. Upstream reads it
with weights_only=False; a file whose Lightning hyper-parameters hold objects other than tensors and plain values
is refused here (re-save its state_dict). Quad-modality models run the one-channel backbone on each modality and
average the features; gliograde adapts the one-channel patch embedding to the run's channels instead (the common
rule). Non-commercial licence.
"""

from __future__ import annotations

from gliograde.networks.pretrained.formats import PretrainedFormat, State, register_format


def translate_brainiac(state: State, model) -> tuple[State, dict[str, str]]:
    backbone = any(k.startswith("backbone.") for k in state)
    own = set(model.encoder.state_dict())
    kept, dropped = {}, {}
    for k, v in state.items():
        if backbone and not k.startswith("backbone."):
            dropped[k] = "the SimCLR projection head and whatever else the Lightning module held beside the backbone"
        elif ".norm_cross_attn." in k and k.removeprefix("backbone.") not in own:
            dropped[k] = "MONAI's cross-attention norm, unused without cross-attention"
        else:
            kept[k.removeprefix("backbone.")] = v
    return kept, dropped


register_format(PretrainedFormat(
    name="brainiac",
    title="BrainIAC (ViT-B, SimCLR)",
    architectures=("vit",),
    pretraining="about 32,000 structural brain MRI scans of several public and institutional cohorts, SimCLR (Tak "
    "et al., medRxiv 10.1101/2024.12.02.24317992; xwumed/BrainIAC README.md)",
    overlap="BrainIAC's pretraining set (about 32,000 brain MRI scans, Tak et al., medRxiv "
    "10.1101/2024.12.02.24317992) gathers public brain MRI cohorts, and its glioma tasks use TCIA collections "
    "(UPENN-GBM samples ship with xwumed/BrainIAC); its code does not list the pretraining scans, so BraTS and TCGA "
    "patients may be among them: treat fine-tuned BraTS or TCGA AUCs as possibly optimistic, and compare with a run "
    "from random initialisation",
    licence="non-commercial academic research only (Mass General Brigham; xwumed/BrainIAC LICENSE)",
    files=(),
    where="the Dropbox folder linked from xwumed/BrainIAC README.md (Model Checkpoints)",
    translate=translate_brainiac,
    sniff=lambda state: "backbone.patch_embedding.patch_embeddings.weight" in state,
    channel_keys=("patch_embedding.patch_embeddings.weight",),
    # MONAI >= 1.4 builds norm_cross_attn, unused; older files lack it. BrainIAC's ViT has no classification token
    optional=lambda k: ".norm_cross_attn." in k or k == "cls_token" or k.startswith("classification_head."),
    input_note="1 channel, exactly 96^3 (learnable position embedding: --size 96), skull-stripped (HD-BET) and "
    "registered",
))  # fmt: skip
