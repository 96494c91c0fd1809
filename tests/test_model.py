"""UNet shapes, skip settings, parameter counts, padding and test-time lesions."""

from __future__ import annotations

import pytest
import torch

from unetseg.model import UNet


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("skips", [True, False, [True, False, True], [False, True, False]])
@pytest.mark.parametrize("merge", ["concat", "add"])
def test_output_shape_every_skip_setting(spatial_dims, skips, merge):
    torch.manual_seed(0)
    model = UNet(spatial_dims, in_channels=2, out_channels=4, channels=(4, 8, 8, 16) if merge == "concat" else (4, 8, 16, 32), skips=skips, merge=merge)
    shape = (2, 2, *([16] * spatial_dims))
    assert model(torch.randn(shape)).shape == (2, 4, *shape[2:])


@pytest.mark.parametrize("size", [(31, 45), (17, 64), (1, 9)])
def test_odd_sizes_are_padded_and_cropped_back(size):
    model = UNet(2, 1, 3, channels=(4, 8, 16, 32)).eval()
    x = torch.randn(1, 1, *size)
    assert model(x).shape == (1, 3, *size)


def test_odd_size_3d():
    model = UNet(3, 1, 2, channels=(2, 4, 8)).eval()
    assert model(torch.randn(1, 1, 7, 10, 13)).shape == (1, 2, 7, 10, 13)


def test_padding_is_equivalent_to_explicit_zero_padding():
    torch.manual_seed(0)
    model = UNet(2, 1, 2, channels=(4, 8, 16)).eval()
    x = torch.randn(1, 1, 13, 10)
    padded = torch.nn.functional.pad(x, (0, 2, 0, 3))
    assert torch.allclose(model(x), model(padded)[..., :13, :10], atol=1e-6)


def test_without_padding_odd_size_raises_with_required_multiple():
    model = UNet(2, 1, 2, channels=(4, 8, 16, 32), pad_to_multiple=False)
    with pytest.raises(ValueError, match="multiple of 8"):
        model(torch.randn(1, 1, 30, 32))


def test_wrong_number_of_skip_flags_raises():
    with pytest.raises(ValueError, match="one flag per decoder level"):
        UNet(2, 1, 2, channels=(4, 8, 16), skips=[True])


def test_add_merge_needs_matching_channels():
    with pytest.raises(ValueError, match="merge='add'"):
        from unetseg.model.blocks import UpBlock

        UpBlock(2, in_channels=8, skip_channels=3, out_channels=4, merge="add")


def test_parameter_counts_match_docstring():
    """The figures quoted in the UNet docstring (default config)."""
    assert n_params(UNet(2, 1, 3)) == 482_483
    assert n_params(UNet(2, 1, 3, skips=False)) == 434_099
    assert n_params(UNet(3, 1, 3)) == 1_401_299
    assert n_params(UNet(3, 1, 3, skips=False)) == 1_256_147


def test_no_skip_level_reserves_no_channels():
    with_skip = UNet(2, 1, 3, channels=(8, 16, 32), skips=[True, True])
    without_first = UNet(2, 1, 3, channels=(8, 16, 32), skips=[False, True])
    # decoder level 0's first conv takes 8 (skip) + 8 (upsampled) channels with the skip, 8 without.
    assert with_skip.decoder[0].block.conv1.in_channels == 16
    assert without_first.decoder[0].block.conv1.in_channels == 8
    assert n_params(with_skip) - n_params(without_first) == 8 * 8 * 3 * 3
    assert without_first.skip_levels() == [1]


def test_skip_lesion_changes_output_and_restores():
    torch.manual_seed(0)
    model = UNet(2, 1, 3, channels=(4, 8, 16)).eval()
    x = torch.randn(1, 1, 16, 16)
    reference = model(x)
    model.lesion_skips([0])
    lesioned = model(x)
    assert not torch.allclose(reference, lesioned)
    model.lesion_skips([])
    assert torch.allclose(reference, model(x))


def test_skip_lesion_equals_zeroed_encoder_tensor():
    """Lesioning level 1 equals feeding zeros instead of the encoder tensor at that level."""
    torch.manual_seed(0)
    model = UNet(2, 1, 3, channels=(4, 8, 16)).eval()
    x = torch.randn(1, 1, 16, 16)
    model.lesion_skips([1])
    lesioned = model(x)
    model.lesion_skips([])
    e0 = model.encoder[0](x)
    e1 = model.encoder[1](model.pool(e0))
    e2 = model.encoder[2](model.pool(e1))
    d1 = model.decoder[1](e2, torch.zeros_like(e1))
    manual = model.head(model.decoder[0](d1, e0))
    assert torch.allclose(lesioned, manual, atol=1e-6)


def test_lesion_of_missing_skip_raises():
    model = UNet(2, 1, 3, channels=(4, 8, 16), skips=[False, True])
    with pytest.raises(ValueError, match="has no long skip"):
        model.lesion_skips([0])


def test_residual_blocks_and_their_lesion():
    torch.manual_seed(0)
    model = UNet(2, 1, 3, channels=(4, 8, 16), residual=True).eval()
    names = sorted(model.residual_blocks())
    assert names == ["decoder.0", "decoder.1", "encoder.0", "encoder.1", "encoder.2"]
    x = torch.randn(1, 1, 16, 16)
    reference = model(x)
    model.lesion_residuals(["encoder.1"])
    assert not torch.allclose(reference, model(x))
    model.lesion_residuals([])
    assert torch.allclose(reference, model(x))
    assert UNet(2, 1, 3, channels=(4, 8)).residual_blocks() == {}


def test_gradients_reach_first_layer_with_and_without_skips():
    for skips in (True, False):
        model = UNet(2, 1, 3, channels=(4, 8, 16), skips=skips)
        model(torch.randn(2, 1, 16, 16)).sum().backward()
        assert model.encoder[0].conv1.weight.grad.abs().sum() > 0


def test_leaky_relu_passes_gradient_where_relu_is_off_and_relu_stays_the_constructor_default():
    torch.manual_seed(0)
    relu, leaky = UNet(channels=(4, 8)), UNet(channels=(4, 8), act="leaky_relu")
    leaky.load_state_dict(relu.state_dict())  # same weights: activation has no parameters
    x = torch.randn(2, 1, 16, 16)
    assert not torch.allclose(relu(x), leaky(x))
    block = leaky.encoder[0]
    y = block.act(torch.tensor([-1.0, 2.0]))
    assert y.tolist() == pytest.approx([-0.01, 2.0])
    with pytest.raises(ValueError, match="act"):
        UNet(act="gelu")


@pytest.mark.parametrize("norm", ["instance", "batch", "group"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (8, 8, 8), (3, 5, 2)])
def test_tiny_inputs_keep_more_than_one_voxel_at_the_coarsest_level(norm, shape):
    """A volume no bigger than the network's multiple (1 voxel at the bottom) is padded once more, so instance norm
    (which cannot normalise one value) works; the output keeps the input's shape."""
    model = UNet(3, 1, 3, (4, 8, 16, 32), norm=norm).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, *shape)).shape == (1, 3, *shape)


def test_stage_blocks_add_same_width_blocks_that_a_lesion_deletes_exactly():
    """stage_blocks > 1: each encoder level holds stage_blocks - 1 more blocks at its width; with residual blocks
    their shortcuts are identities, so deleting one (Veit et al. 2016) is the network without that block."""
    plain = UNet(channels=(8, 16, 32))
    deep = UNet(channels=(8, 16, 32), stage_blocks=3, residual=True, norm="none")
    per_block = [2 * (9 * c * c + c) for c in (8, 16, 32)]  # two 3x3 convolutions with bias, no norm, c -> c
    bias_free = UNet(channels=(8, 16, 32), residual=True, norm="none")
    assert sum(p.numel() for p in deep.parameters()) == sum(p.numel() for p in bias_free.parameters()) + 2 * sum(per_block)
    assert set(plain.state_dict()) == set(UNet(channels=(8, 16, 32), stage_blocks=1).state_dict())  # no new keys at 1
    assert [n for n in deep.residual_blocks() if n.startswith("stages")] == [
        f"stages.{i}.{j}" for i in range(3) for j in range(2)]
    deep.eval()
    block = deep.stages[1][0]
    x = torch.relu(torch.randn(2, 16, 8, 8))  # a stage's input is a block's output: after a ReLU
    deep.lesion_residuals(["stages.1.0"])
    assert torch.equal(block(x), x)
    image = torch.randn(1, 1, 32, 32)
    lesioned = deep(image)
    deep.lesion_residuals([])
    deep.stages[1] = deep.stages[1][1:]  # the same network with the block taken out
    assert torch.allclose(deep(image), lesioned, atol=1e-6)
    with pytest.raises(ValueError, match="stage_blocks must be at least 1"):
        UNet(stage_blocks=0)
