"""Pretrained 3D encoders, each loaded as its authors saved it (networks/pretrained/). Every file here is written in
the upstream format: key names and shapes from the upstream model definition (listed here from the upstream code,
not from gliograde's modules), the wrapper its code saves, small sizes where the format allows, full key sets.
Nothing is downloaded."""

from __future__ import annotations

import argparse
import logging
import os

import pytest
import torch

from gliograde.config import ConfigError, TrainConfig, check_config
from gliograde.networks import build_for, build_from_description
from gliograde.networks.medicalnet import PretrainedError
from gliograde.networks.pretrained import FORMATS, chosen_format, load_pretrained
from gliograde.networks.pretrained.bm_mae import sincos_position_embedding
from gliograde.networks.pretrained.common import check_weights_for
from gliograde.networks.registry import ArchitectureError
from gliograde.networks.resnet3d import ResNet3D

# MONAI's own sin-cos table (upstream BM-MAE's, built here to compare with) calls torch.meshgrid without indexing
pytestmark = pytest.mark.filterwarnings("ignore:torch.meshgrid:UserWarning")


def _randomise(state: dict) -> dict:
    """Distinctive values (so that equality proves the copy), sane BatchNorm statistics."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for k, v in state.items():
        if not v.is_floating_point():
            out[k] = v.clone()
        elif k.endswith("running_var"):
            out[k] = torch.rand(v.shape, generator=g) + 0.5
        else:
            out[k] = torch.randn(v.shape, generator=g) * 0.05
    return out


def _unchanged(model, before) -> bool:
    return all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _snapshot(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------ Models Genesis
def genesis_unet3d_state() -> dict:
    """MrGiovanni/ModelsGenesis pytorch/unet3d.py UNet3D(n_class=1, act='relu'): every key and shape."""
    state = {}

    def luconv(prefix, cin, cout):
        state[f"{prefix}.conv1.weight"] = torch.zeros(cout, cin, 3, 3, 3)
        state[f"{prefix}.conv1.bias"] = torch.zeros(cout)
        for name in ("weight", "bias", "running_mean", "running_var"):  # ContBatchNorm3d (a _BatchNorm)
            state[f"{prefix}.bn1.{name}"] = torch.ones(cout) if name in ("weight", "running_var") else torch.zeros(cout)
        state[f"{prefix}.bn1.num_batches_tracked"] = torch.tensor(7)

    downs = (("down_tr64", 1, 0), ("down_tr128", 64, 1), ("down_tr256", 128, 2), ("down_tr512", 256, 3))
    for name, cin, depth in downs:
        luconv(f"{name}.ops.0", cin, 32 * 2**depth)
        luconv(f"{name}.ops.1", 32 * 2**depth, 64 * 2**depth)
    for name, cin, cout, depth in (("up_tr256", 512, 512, 2), ("up_tr128", 256, 256, 1), ("up_tr64", 128, 128, 0)):
        state[f"{name}.up_conv.weight"] = torch.zeros(cin, cout, 2, 2, 2)
        state[f"{name}.up_conv.bias"] = torch.zeros(cout)
        luconv(f"{name}.ops.0", cin + cout // 2, 32 * 2 ** (depth + 1))
        luconv(f"{name}.ops.1", 32 * 2 ** (depth + 1), 32 * 2 ** (depth + 1))
    state["out_tr.final_conv.weight"] = torch.zeros(1, 64, 1, 1, 1)
    state["out_tr.final_conv.bias"] = torch.zeros(1)
    return {**state, **_randomise({k: v for k, v in state.items() if k.startswith("down_tr")})}  # the decoder: dropped


def write_genesis(path) -> dict:
    """pytorch/Genesis_Chest_CT.py: {'state_dict': nn.DataParallel(model).state_dict(), 'optimizer_state_dict'}."""
    state = genesis_unet3d_state()
    optimizer = {"state": {}, "param_groups": [{"lr": 1.0, "momentum": 0.9, "params": [0, 1, 2]}]}
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "optimizer_state_dict": optimizer}, path)
    return state


def genesis(in_channels: int = 4, size: int = 32):
    return build_from_description({"model": "genesis-unet3d", "in_channels": in_channels, "num_classes": 2,
                                   "size": size})  # fmt: skip


# ------------------------------------------------------------------------------------------ SAM-Med3D
SAM_SMALL = {"img_size": 32, "patch_size": 16, "embed_dim": 24, "depth": 4, "num_heads": 2, "out_chans": 8,
             "window_size": 14, "global_attn_indexes": [1, 3]}  # fmt: skip


def sam3d_image_encoder_state(img_size, patch_size, embed_dim, depth, num_heads, out_chans, window_size,
                              global_attn_indexes, in_chans=1) -> dict:  # fmt: skip
    """uni-medical/SAM-Med3D segment_anything/modeling/image_encoder3D.py ImageEncoderViT3D(use_rel_pos=True)."""
    grid, head, e = img_size // patch_size, embed_dim // num_heads, embed_dim
    s = {"patch_embed.proj.weight": torch.zeros(embed_dim, in_chans, patch_size, patch_size, patch_size),
         "patch_embed.proj.bias": torch.zeros(embed_dim),
         "pos_embed": torch.zeros(1, grid, grid, grid, embed_dim)}  # fmt: skip
    for i in range(depth):
        rel = 2 * (grid if i in global_attn_indexes else window_size) - 1
        b = f"blocks.{i}"
        s |= {f"{b}.norm1.weight": torch.ones(e), f"{b}.norm1.bias": torch.zeros(e),
              f"{b}.attn.qkv.weight": torch.zeros(3 * e, e), f"{b}.attn.qkv.bias": torch.zeros(3 * e),
              f"{b}.attn.proj.weight": torch.zeros(e, e), f"{b}.attn.proj.bias": torch.zeros(e),
              f"{b}.attn.rel_pos_d": torch.zeros(rel, head), f"{b}.attn.rel_pos_h": torch.zeros(rel, head),
              f"{b}.attn.rel_pos_w": torch.zeros(rel, head),
              f"{b}.norm2.weight": torch.ones(e), f"{b}.norm2.bias": torch.zeros(e),
              f"{b}.mlp.lin1.weight": torch.zeros(4 * e, e), f"{b}.mlp.lin1.bias": torch.zeros(4 * e),
              f"{b}.mlp.lin2.weight": torch.zeros(e, 4 * e), f"{b}.mlp.lin2.bias": torch.zeros(e)}  # fmt: skip
    s |= {"neck.0.weight": torch.zeros(out_chans, embed_dim, 1, 1, 1), "neck.1.weight": torch.ones(out_chans),
          "neck.1.bias": torch.zeros(out_chans), "neck.2.weight": torch.zeros(out_chans, out_chans, 3, 3, 3),
          "neck.3.weight": torch.ones(out_chans), "neck.3.bias": torch.zeros(out_chans)}  # fmt: skip
    return _randomise(s)


def write_sam(path, args=False, **size) -> dict:
    """train.py's save_checkpoint: {'epoch', 'model_state_dict': Sam3D.state_dict(), 'optimizer_state_dict', 'losses',
    'dices', 'best_loss', 'best_dice', ('args'), 'used_datas'}; Sam3D holds the prompt encoder and mask decoder too."""
    encoder = sam3d_image_encoder_state(**(size or SAM_SMALL))
    state = {f"image_encoder.{k}": v for k, v in encoder.items()}
    state["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = torch.randn(3, 192)
    state["prompt_encoder.no_mask_embed.weight"] = torch.randn(1, 384)
    state["mask_decoder.iou_token.weight"] = torch.randn(1, 384)
    ckpt = {"epoch": 200, "model_state_dict": state, "optimizer_state_dict": {"state": {}, "param_groups": []},
            "losses": [0.3, 0.2], "dices": [0.5], "best_loss": 0.2, "best_dice": 0.5,
            "used_datas": ["BraTS2021"]}  # fmt: skip
    if args:
        ckpt["args"] = argparse.Namespace(model_type="vit_b_ori", img_size=128)
    torch.save(ckpt, path)
    return encoder


def sam(in_channels: int = 4, **size):
    return build_from_description({"model": "sam-med3d", "in_channels": in_channels, "num_classes": 2,
                                   **(size or SAM_SMALL)})  # fmt: skip


# ------------------------------------------------------------------------------------------ BM-MAE
BM_SMALL = {"img_size": 32, "patch_size": 16, "hidden_size": 48, "num_layers": 2, "num_heads": 4, "mlp_dim": 96}


def upstream_bmmae(modalities=("t1", "t1ce", "t2", "flair"), **s):
    """perkyfever/BM-MAE bmmae/model.py ViTEncoder over bmmae/tokenizers.py MRITokenizer, built from MONAI's blocks as
    upstream builds it (PatchEmbeddingBlock conv + sincos, TransformerBlock qkv_bias=True)."""
    from monai.networks.blocks import PatchEmbeddingBlock, TransformerBlock

    class MRITokenizer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.patch_embedding = PatchEmbeddingBlock(1, s["img_size"], s["patch_size"], s["hidden_size"],
                                                       s["num_heads"], proj_type="conv",
                                                       pos_embed_type="sincos")  # fmt: skip

        def forward(self, x):
            return self.patch_embedding(x)

    class ViTEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.modalities = modalities
            self.tokenizers = torch.nn.ModuleDict({m: MRITokenizer() for m in modalities})
            self.norm = torch.nn.LayerNorm(s["hidden_size"])
            blocks = [TransformerBlock(s["hidden_size"], s["mlp_dim"], s["num_heads"], qkv_bias=True)
                      for _ in range(s["num_layers"])]  # fmt: skip
            self.blocks = torch.nn.ModuleList(blocks)
            self.cls_token = torch.nn.Parameter(torch.randn(1, 1, s["hidden_size"]) * 0.02)

        def forward(self, x: dict):
            tokens = torch.cat([self.tokenizers[m](t) for m, t in x.items()], dim=1)
            tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
            for blk in self.blocks:
                tokens = blk(tokens)
            return self.norm(tokens)

    return ViTEncoder()


def write_bmmae(path, modalities=("t1", "t1ce", "t2", "flair")):
    """bmmae/loops.py: torch.save(model.state_dict(), 'pretrained_models/bmmae.pth'), BMMAE with its decoder."""
    torch.manual_seed(0)
    donor = upstream_bmmae(modalities, **BM_SMALL)
    state = {k: v for k, v in donor.state_dict().items()}
    for k, v in list(state.items()):
        if v.is_floating_point() and "position_embeddings" not in k:
            state[k] = v + torch.randn(v.shape) * 0.02  # LayerNorms away from 1/0
    donor.load_state_dict(state)
    state |= {"decoder.mask_tokens": torch.zeros(1, 1, 24), "decoder.decoder_embed.weight": torch.zeros(24, 48),
              "decoder.decoder_embed.bias": torch.zeros(24),
              "decoder.modality_embeddings.t1": torch.zeros(1, 1, 24)}  # fmt: skip
    torch.save(state, path)
    return donor


def bmmae(modalities=("t1", "t1ce", "t2", "flair")):
    return build_from_description({"model": "bm-mae", "in_channels": len(modalities), "num_classes": 2,
                                   "modalities": list(modalities), **BM_SMALL})  # fmt: skip


# ------------------------------------------------------------------------------------------ Swin UNETR
SWIN_SMALL = {"feature_size": 12, "depths": [2, 2, 2, 2], "num_heads": [3, 6, 12, 24], "window_size": 7,
              "patch_size": 2}  # fmt: skip


def swin_donor(spatial_dims: int = 3):
    from monai.networks.nets.swin_unetr import SwinTransformer

    torch.manual_seed(0)
    d = SwinTransformer(in_chans=1, embed_dim=12, window_size=(7,) * spatial_dims, patch_size=(2,) * spatial_dims,
                        depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24), spatial_dims=spatial_dims)  # fmt: skip
    d.load_state_dict(_randomise(d.state_dict()))
    return d


def write_model_swinvit(path, spatial_dims: int = 3):
    """The released model_swinvit.pt, as MONAI's SwinUNETR.load_from reads it: {'state_dict': 'module.'-prefixed
    SwinTransformer keys without the SSL head's attribute, the MLP as fc1/fc2}."""
    donor = swin_donor(spatial_dims)
    state = {"module." + k.replace(".mlp.linear1.", ".mlp.fc1.").replace(".mlp.linear2.", ".mlp.fc2."): v
             for k, v in donor.state_dict().items()}  # fmt: skip
    torch.save({"state_dict": state}, path)
    return donor


def write_brainsegfounder(path):
    """lab-smile/BrainSegFounder pretrain/main.py: {'global_step', 'epoch', 'state_dict': DDP(SSLHead).state_dict(),
    'optimizer'}; SSLHead (pretrain/T1_T2/ssl_head.py) holds swinViT, rotation_head, contrastive_head and conv."""
    donor = swin_donor()
    state = {f"module.swinViT.{k}": v for k, v in donor.state_dict().items()}
    state |= {"module.rotation_head.weight": torch.zeros(4, 192), "module.rotation_head.bias": torch.zeros(4),
              "module.contrastive_head.weight": torch.zeros(512, 192), "module.contrastive_head.bias": torch.zeros(512),
              "module.conv.0.weight": torch.zeros(96, 192, 3, 3, 3), "module.conv.0.bias": torch.zeros(96)}  # fmt: skip
    torch.save({"global_step": 10, "epoch": 1, "state_dict": state, "optimizer": {"state": {}, "param_groups": []}},
               path)  # fmt: skip
    return donor


def swinvit(in_channels: int = 4):
    return build_from_description({"model": "swinvit", "in_channels": in_channels, "num_classes": 2, "size": 32,
                                   **SWIN_SMALL})  # fmt: skip


# ------------------------------------------------------------------------------------------ BrainIAC
VIT_SMALL = {"patch_size": 16, "hidden_size": 48, "mlp_dim": 96, "num_layers": 2, "num_heads": 4, "qkv_bias": False}


def write_brainiac(path, img_size: int = 32):
    """xwumed/BrainIAC: a Lightning checkpoint, state_dict['backbone.*'] = MONAI ViT(in_channels=1, img_size, patch 16,
    save_attn=True, no classification token) beside the SimCLR projection head."""
    from monai.networks.nets import ViT

    torch.manual_seed(0)
    vit = ViT(in_channels=1, img_size=img_size, patch_size=16, hidden_size=48, mlp_dim=96, num_layers=2, num_heads=4,
              save_attn=True)  # fmt: skip
    vit.load_state_dict(_randomise(vit.state_dict()))
    state = {f"backbone.{k}": v for k, v in vit.state_dict().items()}
    state |= {"projection_head.0.weight": torch.zeros(48, 48), "projection_head.2.weight": torch.zeros(16, 48)}
    torch.save({"epoch": 99, "global_step": 1000, "pytorch-lightning_version": "2.1.0", "state_dict": state}, path)
    return vit


def vit(in_channels: int = 4, size: int = 32):
    return build_from_description({"model": "vit", "in_channels": in_channels, "num_classes": 2, "size": size,
                                   **VIT_SMALL})  # fmt: skip


# ------------------------------------------------------------------------------------------ the tests
def test_models_genesis_file_loads_every_encoder_tensor(tmp_path, caplog):
    path = tmp_path / "Genesis_Chest_CT.pt"
    state = write_genesis(path)
    model = genesis(in_channels=1)
    head = model.fc.weight.clone()
    with caplog.at_level(logging.INFO, logger="gliograde"):
        report = load_pretrained(model, path)
    got = model.encoder.state_dict()
    encoder_keys = [k for k in state if k.startswith("down_tr")]
    assert set(got) == set(encoder_keys)  # the upstream names, unchanged
    assert all(torch.equal(got[k], state[k]) for k in encoder_keys)
    assert torch.equal(model.fc.weight, head)
    assert report.format == "models-genesis" and report.loaded == len(encoder_keys)
    assert report.total == len(model.state_dict()) and report.missing == ["fc.bias", "fc.weight"]
    assert report.dropped == sorted(k for k in state if not k.startswith("down_tr"))
    assert any("decoder" in why for why in report.why.values())
    assert "recognised from its keys" in caplog.text and "no BraTS or TCGA" in caplog.text


def test_sam_med3d_turbo_file_loads_the_image_encoder(tmp_path):
    path = tmp_path / "sam_med3d_turbo.pth"
    state = write_sam(path)
    model = sam(in_channels=1)
    report = load_pretrained(model, path)
    got = model.encoder.state_dict()
    assert set(got) == set(state) and all(torch.equal(got[k], state[k]) for k in state)
    assert report.format == "sam-med3d-turbo" and report.loaded == len(state)
    assert report.wrapper == "checkpoint['model_state_dict']" and len(report.dropped) == 3
    with torch.no_grad():
        assert model.feature_maps(torch.randn(1, 1, 32, 32, 32)).shape == (1, 8, 2, 2, 2)


@pytest.mark.parametrize(("name", "fmt"), [("bmmae.pth", "bm-mae"), ("bmmae_tcga.pth", "bm-mae-notcga")])
def test_bm_mae_files_load_and_compute_what_upstream_computes(tmp_path, name, fmt):
    path = tmp_path / name
    donor = write_bmmae(path).eval()
    model = bmmae().eval()
    report = load_pretrained(model, path)
    assert report.format == fmt  # the two variants share their keys: the file name tells them apart
    assert any("decoder" in why for why in report.why.values())
    x = torch.randn(2, 4, 32, 32, 32)
    inputs = {m: x[:, i : i + 1] for i, m in enumerate(("t1", "t1ce", "t2", "flair"))}
    with torch.no_grad():
        assert torch.allclose(model.encoder(x), donor(inputs), atol=1e-5)
        # the missing-modality input: any subset, as a dict, as upstream takes it
        assert torch.allclose(model.encoder({"t2": inputs["t2"]}), donor({"t2": inputs["t2"]}), atol=1e-5)
        assert model(x).shape == (2, 2)


def test_bm_mae_run_over_a_modality_subset_loads_only_its_tokenizers(tmp_path):
    path = tmp_path / "bmmae.pth"
    donor = write_bmmae(path).eval()
    model = bmmae(("flair", "t1")).eval()  # the run's order, not the file's
    report = load_pretrained(model, path)
    assert sum("tokenizers" in k for k in report.dropped) == 6  # t1ce and t2: three tensors each
    x = torch.randn(1, 2, 32, 32, 32)
    with torch.no_grad():
        want = donor({"flair": x[:, :1], "t1": x[:, 1:]})
        assert torch.allclose(model.encoder(x), want, atol=1e-5)


def test_sincos_position_embedding_is_monais():
    from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding

    assert torch.equal(sincos_position_embedding(8, 768), build_sincos_position_embedding([8, 8, 8], 768, 3).data)


@pytest.mark.parametrize("writer", [write_model_swinvit, write_brainsegfounder])
def test_swin_unetr_files_load_into_swinvit(tmp_path, writer):
    path = tmp_path / ("model_swinvit.pt" if writer is write_model_swinvit else "brainsegfounder_stage1.pt")
    donor = writer(path)
    model = swinvit(in_channels=1)
    report = load_pretrained(model, path)
    got, want = model.encoder.state_dict(), donor.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want) and report.loaded == len(want)
    assert report.format == ("swinunetr-ssl" if writer is write_model_swinvit else "brainsegfounder")
    assert len(report.dropped) == (0 if writer is write_model_swinvit else 6)


def test_tensors_beside_the_swin_encoder_are_dropped_as_load_from_ignores_them(tmp_path):
    path = tmp_path / "model_swinvit.pt"
    write_model_swinvit(path)
    ckpt = torch.load(path, weights_only=True)
    ckpt["state_dict"] |= {"module.norm.weight": torch.ones(192), "module.norm.bias": torch.zeros(192)}
    torch.save(ckpt, path)
    report = load_pretrained(swinvit(), path)
    assert report.dropped == ["norm.bias", "norm.weight"] and any("load_from" in w for w in report.why.values())


def test_the_model_swinvit_file_written_here_is_the_one_monai_load_from_reads(tmp_path):
    """MONAI's own reader of the released file (SwinUNETR.load_from) takes the file these tests write."""
    from monai.networks.nets.swin_unetr import SwinUNETR

    path = tmp_path / "model_swinvit.pt"
    donor = write_model_swinvit(path)
    net = SwinUNETR(in_channels=1, out_channels=2, feature_size=12)
    net.load_from(torch.load(path, weights_only=True))
    assert all(torch.equal(net.swinViT.state_dict()[k], v) for k, v in donor.state_dict().items())


def test_brainiac_lightning_checkpoint_loads_into_vit(tmp_path):
    path = tmp_path / "BrainIAC.ckpt"
    donor = write_brainiac(path)
    model = vit(in_channels=1)
    report = load_pretrained(model, path)
    got = model.encoder.state_dict()
    assert all(torch.equal(got[k], v) for k, v in donor.state_dict().items() if k in got)
    assert report.format == "brainiac" and report.dropped == ["projection_head.0.weight", "projection_head.2.weight"]


def test_one_channel_weights_adapted_to_four_give_the_one_channel_features(tmp_path, caplog):
    """The one rule, MedicalNet's: the 1-channel kernel repeated on C channels, scaled by 1/C."""
    g_path, s_path = tmp_path / "Genesis_Chest_CT.pt", tmp_path / "sam_med3d_turbo.pth"
    write_genesis(g_path)
    fast = {**SAM_SMALL, "global_attn_indexes": [0, 1, 2, 3]}  # no 14^3 windows padding a 2^3 grid: quick
    write_sam(s_path, **fast)
    cases = ((genesis, g_path, "down_tr64.ops.0.conv1.weight", 16),
             (lambda in_channels: sam(in_channels, **fast), s_path, "patch_embed.proj.weight", 32))  # fmt: skip
    for build, path, key, side in cases:
        x = torch.randn(1, 1, side, side, side)
        one, four = build(in_channels=1).eval(), build(in_channels=4).eval()
        load_pretrained(one, path)
        with caplog.at_level(logging.INFO, logger="gliograde"):
            report = load_pretrained(four, path)
        assert report.adapted_conv1 == (1, 4) and report.adapted_key == key
        assert f"Adapted {key} from 1 to 4 input channels" in caplog.text
        with torch.no_grad():
            assert torch.allclose(one.forward_features(x), four.forward_features(x.repeat(1, 4, 1, 1, 1)), atol=1e-5)


# ------------------------------------------------------------------------------------------ bad input
def _refused(model, path, match, fmt=None) -> str:
    before = _snapshot(model)
    with pytest.raises(PretrainedError, match=match) as err:
        load_pretrained(model, path, fmt=fmt)
    message = str(err.value)
    assert "\n" not in message
    assert _unchanged(model, before)  # nothing loaded half-way
    return message


def test_a_file_for_another_network_names_the_expected_and_found_prefixes(tmp_path):
    path = tmp_path / "model_swinvit.pt"
    write_model_swinvit(path)
    message = _refused(genesis(), path, "does not fit", fmt="models-genesis")
    assert "expected keys under down_tr128., down_tr256., down_tr512., down_tr64." in message
    assert "found layers1., layers2., layers3., layers4., patch_embed." in message
    assert "Nothing was loaded" in message


def test_a_file_made_for_another_size_names_the_shapes(tmp_path):
    path = tmp_path / "sam_med3d_turbo.pth"
    write_sam(path, **{**SAM_SMALL, "img_size": 64})  # pos_embed for a 4^3 grid, the model's is 2^3
    message = _refused(sam(), path, r"pos_embed \(1, 4, 4, 4, 24\) in the file, \(1, 2, 2, 2, 24\) in the model")
    assert "another input size" in message


def test_a_file_of_another_format_is_refused_by_its_own_loader(tmp_path):
    donor = ResNet3D(10, 1, 2, shortcut="B", layout="medicalnet")
    path = tmp_path / "resnet_10.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in donor.state_dict().items()}}, path)
    _refused(genesis(), path, "MedicalNet weights fit --model resnet3d")
    before = _snapshot(donor)  # and an encoder's file into the ResNet-3D
    g_path = tmp_path / "Genesis_Chest_CT.pt"
    write_genesis(g_path)
    with pytest.raises(PretrainedError, match=r"load into a network's encoder, and ResNet10-3D .* has none"):
        load_pretrained(donor, g_path)
    assert _unchanged(donor, before)


def test_a_file_of_no_known_format(tmp_path):
    path = tmp_path / "mystery.pt"
    torch.save({"encoder.stem.weight": torch.zeros(3)}, path)
    _refused(genesis(), path, "are those of no known pretrained format; name one with --pretrained-format")


@pytest.mark.parametrize("which", ["swin", "sam"])
def test_a_2d_checkpoint_given_to_a_3d_network(tmp_path, which):
    path = tmp_path / "w2d.pt"
    if which == "swin":
        write_model_swinvit(path, spatial_dims=2)
        model = swinvit()
    else:  # segment-anything's 2D image encoder: image_encoder.patch_embed.proj.weight (embed, 3, 16, 16), ...
        enc = {"patch_embed.proj.weight": torch.zeros(24, 3, 16, 16), "patch_embed.proj.bias": torch.zeros(24),
               "pos_embed": torch.zeros(1, 2, 2, 24), "blocks.0.attn.rel_pos_h": torch.zeros(27, 12),
               "neck.0.weight": torch.zeros(8, 24, 1, 1)}  # fmt: skip
        torch.save({"model": {f"image_encoder.{k}": v for k, v in enc.items()}}, path)
        model = sam()
    message = _refused(model, path, "holds 2D weights")
    assert "a 2D network's checkpoint cannot initialise a 3D network" in message


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_holding_pickled_code_or_objects_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "sam_med3d_turbo.pth"
    write_sam(path)
    ckpt = torch.load(path, weights_only=True)
    torch.save({**ckpt, "payload": _Evil(marker)}, path)
    _refused(sam(), path, "refused to load")
    assert not marker.exists()
    write_sam(path, args=True)  # train.py's own checkpoints keep the argparse Namespace: weights_only refuses them
    _refused(sam(), path, r"refused to load.*argparse\.Namespace.*re-save")


def test_a_modality_subset_the_encoder_cannot_take(tmp_path):
    path = tmp_path / "bmmae_t1_t2.pth"
    write_bmmae(path, modalities=("t1", "t2"))  # a file with two tokenizers only
    message = _refused(bmmae(("t1", "flair")), path, "the file has tokenizers for t1, t2 only, and the run asks flair")
    assert "choose --modalities among t1, t2" in message
    with pytest.raises(ArchitectureError, match="BM-MAE takes a subset of t1, t1ce, t2, flair"):
        build_from_description({"model": "bm-mae", "in_channels": 1, "num_classes": 2, "modalities": ["dwi"],
                                **BM_SMALL})  # fmt: skip


# ------------------------------------------------------------------------------------------ choosing the format
def test_pretrained_format_is_a_checked_option():
    assert check_config(TrainConfig()).pretrained_format is None  # default: recognised from the file
    assert check_config(TrainConfig(pretrained_format="bm-mae-notcga")).pretrained_format == "bm-mae-notcga"
    with pytest.raises(ConfigError, match=r"--pretrained-format bm-mea is not a registered .*did you mean 'bm-mae'"):
        check_config(TrainConfig(pretrained_format="bm-mea"))


def test_the_chosen_format_reaches_the_loader_through_build_for(tmp_path, caplog):
    path = tmp_path / "renamed.pt"  # a file name that tells nothing: the flag names the format
    state = write_genesis(path)
    log = logging.getLogger("gliograde")
    cfg = TrainConfig(model="genesis-unet3d", size=32, dropout=0.0, pretrained_format="models-genesis")
    with caplog.at_level(logging.INFO, logger="gliograde"):
        model = build_for(cfg, 4, path, log)
    assert "format models-genesis)" in caplog.text and "recognised" not in caplog.text
    assert torch.equal(model.encoder.down_tr512.ops[1].conv1.weight, state["down_tr512.ops.1.conv1.weight"])
    with pytest.raises(PretrainedError, match="fits --model bm-mae, not --model genesis-unet3d"):
        build_for(TrainConfig(model="genesis-unet3d", size=32, pretrained_format="bm-mae-notcga"), 4, path, log)
    bm_path = tmp_path / "bm.pth"  # BM-MAE's two variants share their keys: the chosen one is the one said
    write_bmmae(bm_path)
    with chosen_format("bm-mae-notcga"):
        assert load_pretrained(bmmae(), bm_path).format == "bm-mae-notcga"
    assert load_pretrained(bmmae(), bm_path).format == "bm-mae"


def test_weights_of_another_network_are_refused_before_any_work(tmp_path):
    path = tmp_path / "sam_med3d_turbo.pth"
    write_sam(path)
    with pytest.raises(PretrainedError, match=r"is a SAM-Med3D-turbo image encoder file.*--model genesis-unet3d takes"):
        check_weights_for("genesis-unet3d")(str(path))
    check_weights_for("sam-med3d")(str(path))
    with pytest.raises(PretrainedError, match="does not exist"):
        check_weights_for("sam-med3d")(str(tmp_path / "nope.pth"))


def test_every_format_states_its_provenance():
    for name, spec in FORMATS.items():
        assert spec.architectures and spec.pretraining and spec.licence and spec.where, name
        assert "(" in spec.pretraining, f"{name}: the pretraining data need their source"
