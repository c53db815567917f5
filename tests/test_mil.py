"""Entropy slice selection (gliograde.data.slices) and the 2D MIL model (gliograde.networks.mil)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gliograde.data.slices import (
    brain_slice_counts,
    select_slices,
    select_volume_slices,
    slice_entropy,
)
from gliograde.networks.mil import MILResNet2D, make_bags, select_slice_indices, torch_slice_entropy


def known_volume() -> np.ndarray:
    """(1, 4, 4, 6): slice 0 empty, 1 constant (0 bits), 2 two values (1 bit), 3 four values (2 bits),
    4 two values (1 bit), 5 a single brain voxel (0 bits). Values 1..4 span the range, so with 4 bins
    value v lands in bin v - 1."""
    v = np.zeros((1, 4, 4, 6), dtype=np.float32)
    v[0, :, :, 1] = 3.0
    v[0, :, :, 2] = np.array([1.0, 4.0] * 8).reshape(4, 4)
    v[0, :, :, 3] = np.array([1.0, 2.0, 3.0, 4.0] * 4).reshape(4, 4)
    v[0, :2, :, 4] = 2.0
    v[0, 2:, :, 4] = 4.0
    v[0, 0, 0, 5] = 1.0
    return v


def test_entropy_known_values_in_bits():
    h = slice_entropy(known_volume(), bins=4)
    np.testing.assert_allclose(h, [0.0, 0.0, 1.0, 2.0, 1.0, 0.0], atol=1e-12)
    # a 3D volume is one channel; a tensor is accepted too
    np.testing.assert_allclose(slice_entropy(torch.from_numpy(known_volume()[0]), bins=4), h)
    np.testing.assert_array_equal(brain_slice_counts(known_volume()), [0, 16, 16, 16, 16, 1])


def test_entropy_channel_mean_and_choice():
    v0 = known_volume()
    v1 = np.where(v0 != 0, 5.0, 0.0).astype(np.float32)  # the same brain, constant: 0 bits everywhere
    v = np.concatenate([v0, v1])
    h0, h1 = slice_entropy(v, channel=0, bins=4), slice_entropy(v, channel=1, bins=4)
    np.testing.assert_allclose(h0, [0, 0, 1, 2, 1, 0], atol=1e-12)
    np.testing.assert_allclose(h1, np.zeros(6), atol=1e-12)
    np.testing.assert_allclose(slice_entropy(v, bins=4), (h0 + h1) / 2)
    # the brain is non-zero in ANY channel: channel 0's zeros inside channel 1's brain count as intensities
    v1[0, 0, 0, 0] = 5.0
    np.testing.assert_allclose(slice_entropy(np.concatenate([v0, v1]), channel=0, bins=4)[0], 0.0)
    v1[0, 0, 1, 0] = 5.0
    v0b = v0.copy()
    v0b[0, 0, 0, 0] = 4.0
    np.testing.assert_allclose(slice_entropy(np.concatenate([v0b, v1]), channel=0, bins=4)[0], 1.0)


def test_ranking_picks_most_varied_slices():
    h = slice_entropy(known_volume(), bins=4)
    np.testing.assert_array_equal(select_slices(h, k=1), [3])
    np.testing.assert_array_equal(select_slices(h, k=3), [2, 3, 4])
    # with the brain mask as candidates, the constant slice 1 and single-voxel slice 5 may fill the bag
    np.testing.assert_array_equal(select_volume_slices(known_volume(), k=5, bins=4), [1, 2, 3, 4, 5])


def test_min_gap_respected():
    rng = np.random.default_rng(0)
    h = rng.random(40) + 0.1
    for gap in (1, 2, 3):
        sel = select_slices(h, k=8, min_gap=gap)
        assert len(sel) == 8 and np.all(np.diff(sel) > gap)
        assert h.argmax() in sel  # greedy: the best slice is always taken
    # a peak next to the best slice is skipped with a gap of 1
    h = np.array([0.1, 5.0, 4.9, 0.2, 3.0, 0.3])
    np.testing.assert_array_equal(select_slices(h, k=2), [1, 2])
    np.testing.assert_array_equal(select_slices(h, k=2, min_gap=1), [1, 4])
    with pytest.raises(ValueError, match=r"k=4.*min_gap=1"):
        select_slices(h, k=4, min_gap=1)


def test_k_too_large_and_empty_volume_raise():
    h = slice_entropy(known_volume(), bins=4)
    with pytest.raises(ValueError, match=r"k=4.*only 3"):
        select_slices(h, k=4)
    with pytest.raises(ValueError, match=r"k=6.*only 5"):
        select_volume_slices(known_volume(), k=6, bins=4)
    empty = np.zeros((2, 8, 8, 8), dtype=np.float32)
    np.testing.assert_array_equal(slice_entropy(empty), np.zeros(8))
    with pytest.raises(ValueError, match="no brain"):
        select_volume_slices(empty, k=2)


def test_the_selection_of_a_volume_and_of_its_mirror():
    assert select_volume_slices(known_volume(), k=2, bins=4).tolist() == [2, 3]
    mirrored = known_volume()[:, :, :, ::-1]  # 2 bits at 2, 1 bit at 1 and 3 (tie -> lower)
    assert select_volume_slices(mirrored, k=2, bins=4).tolist() == [1, 2]


def random_batch(seed: int, b: int = 3, c: int = 2, s: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, s, s, s, generator=g)
    brain = torch.rand(b, 1, s, s, s, generator=g) < 0.6
    brain[..., :2] = False  # empty slices
    brain[1, ..., 2] = False
    brain[1, :, 0, 0, 2] = True  # a single-voxel slice
    return x * brain


@pytest.mark.parametrize("bins", [4, 32, 64])
def test_torch_entropy_matches_numpy(bins):
    x = random_batch(bins)
    ht = torch_slice_entropy(x, bins=bins)
    assert ht.shape == (3, 12)
    for i in range(3):
        np.testing.assert_allclose(ht[i].numpy(), slice_entropy(x[i].numpy(), bins=bins), atol=1e-4)
        np.testing.assert_allclose(
            torch_slice_entropy(x, bins=bins, channel=1)[i].numpy(),
            slice_entropy(x[i].numpy(), channel=1, bins=bins),
            atol=1e-4,
        )
    np.testing.assert_allclose(
        torch_slice_entropy(torch.from_numpy(known_volume())[None], bins=4)[0], [0, 0, 1, 2, 1, 0]
    )


def test_model_selection_and_bags():
    x = random_batch(1, s=16)
    idx = select_slice_indices(x, k=5, bins=32)
    h = torch_slice_entropy(x, bins=32)
    for i in range(3):
        want = np.sort(np.argsort(-h[i].numpy(), kind="stable")[:5])
        np.testing.assert_array_equal(idx[i].numpy(), want)
    gap = select_slice_indices(x, k=5, min_gap=2, bins=32)
    assert torch.all(gap.diff(dim=1) > 2)
    bags = make_bags(x, idx)
    assert bags.shape == (3, 5, 2, 16, 16)
    for i in range(3):
        for j in range(5):
            assert torch.equal(bags[i, j], x[i, ..., idx[i, j]])
    # an empty case still yields k distinct slices
    assert select_slice_indices(torch.zeros(1, 1, 4, 4, 6), k=6).unique().numel() == 6


@pytest.mark.parametrize("pooling", ["attention", "mean", "max"])
def test_pooling_forward_backward(pooling):
    torch.manual_seed(0)
    m = MILResNet2D(depth=18, in_channels=2, num_classes=3, k=4, pooling=pooling, dropout=0.1, min_gap=1)
    x = random_batch(2, s=16)
    out = m(x)
    assert out.shape == (3, 3)
    out.sum().backward()
    assert all(p.grad is not None for p in m.backbone_parameters())
    assert all(p.grad is not None for p in m.head_parameters())
    a, s = m.last_attention, m.last_slices
    assert a.shape == s.shape == (3, 4) and not a.requires_grad
    assert torch.all(a >= 0)
    torch.testing.assert_close(a.sum(1), torch.ones(3))
    assert torch.all(s.diff(dim=1) > 1)
    f = m.forward_features(x)
    assert f.shape == (3, m.num_features)
    head, backbone = {id(p) for p in m.head_parameters()}, {id(p) for p in m.backbone_parameters()}
    assert not head & backbone and len(head) + len(backbone) == len(list(m.parameters()))
    rec = m.arch_record()
    assert rec == {
        "model": "mil2d",
        "depth": 18,
        "in_channels": 2,
        "num_classes": 3,
        "k": 4,
        "pooling": pooling,
        "min_gap": 1,
        "bins": 32,
        "entropy_channel": None,
    }
    assert "ResNet18-2D" in m.describe()


def test_depth34_and_errors():
    m = MILResNet2D(depth=34, in_channels=1, k=2).eval()
    assert sum(len(getattr(m.backbone, f"layer{i}")) for i in range(1, 5)) == 16
    with torch.no_grad():
        assert m(torch.randn(1, 1, 16, 16, 8)).shape == (1, 2)
    with pytest.raises(ValueError, match=r"k=9.*only 8"):
        m.k = 9
        m(torch.randn(1, 1, 16, 16, 8))
    with pytest.raises(ValueError, match="depth"):
        MILResNet2D(depth=50)
    with pytest.raises(ValueError, match="pooling"):
        MILResNet2D(pooling="sum")


def test_tiny_model_overfits_toy_set():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    n, s = 4, 16
    x = torch.zeros(n, 2, s, s, s)
    x[:, :, 2:14, 2:14, 2:14] = 0.3 * torch.randn(n, 2, 12, 12, 12, generator=g) + 1.0
    y = torch.tensor([0, 1] * (n // 2))
    for i in range(1, n, 2):
        x[i, :, 5:10, 5:10, 5:10] += 4.0  # a bright blob
    m = MILResNet2D(depth=18, in_channels=2, num_classes=2, k=4, pooling="attention")
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(m(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert min(losses[-5:]) < losses[0] / 2, losses


def test_bag_sizes_are_checked_before_a_mil_run(tiny_cache, caplog):
    import logging

    from gliograde.data.slices import check_bag_sizes

    rows = np.arange(3)
    log = logging.getLogger("gliograde")
    with caplog.at_level("WARNING", logger="gliograde"):
        check_bag_sizes(tiny_cache, rows, [0, 1, 2, 3], 16, log)  # 16^3: at most 16 slices, fewer hold brain
    assert "fewer axial brain slices" in caplog.text and tiny_cache.ids[0] in caplog.text
    empty = type("C", (), {"ids": ["Brats18_X_1_1"], "volumes": np.zeros((1, 4, 8, 8, 8), np.float16)})()
    with pytest.raises(ValueError, match="Brats18_X_1_1 has no brain voxels"):
        check_bag_sizes(empty, [0], [0, 1, 2, 3], 4, log)


def test_slices_can_be_ranked_on_one_modality():
    from gliograde.networks.mil import select_slice_indices

    torch.manual_seed(0)
    x = torch.zeros(1, 2, 8, 8, 12)
    x[0, 0, :, :, 2:5] = torch.randn(8, 8, 3)  # channel 0 varies on slices 2-4
    x[0, 1, :, :, 7:10] = torch.randn(8, 8, 3)  # channel 1 on slices 7-9
    x[0, 0, :, :, 7:10] = 1.0  # constant where channel 1 varies: brain, no entropy in channel 0
    x[0, 1, :, :, 2:5] = 1.0
    assert select_slice_indices(x, 3, channel=0).tolist() == [[2, 3, 4]]
    assert select_slice_indices(x, 3, channel=1).tolist() == [[7, 8, 9]]
