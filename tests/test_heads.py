"""vitfast.nn.heads: the projector / predictor recipes against hand-written twins of the official layouts."""
import pytest
import torch
from torch import nn

from vitfast.nn import MLPHead, prediction_head, projection_head
from vitfast.nn.heads import PREDICTORS, PROJECTORS


def copy_and_compare(head, twin, in_dim, train=True):
    """Load the head's weights into the twin (same parameter order) and compare outputs and gradients."""
    twin.load_state_dict(head.state_dict())
    head.train(train), twin.train(train)
    x = torch.randn(6, in_dim, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    torch.testing.assert_close(head(x), twin(x2))
    head(x).square().sum().backward()
    twin(x2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


def test_mocov3_projector_and_predictor_layouts():
    """MoCo v3 (ViT): Linear(no bias)-BN-ReLU ×2, Linear(no bias)-BN(no affine); predictor 2 layers, same last BN."""
    torch.manual_seed(0)
    proj = projection_head(8, "mocov3", hidden_dim=16)
    twin = nn.Sequential(nn.Linear(8, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU(),
                         nn.Linear(16, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU(),
                         nn.Linear(16, 256, bias=False), nn.BatchNorm1d(256, affine=False))
    copy_and_compare(proj, twin, 8)
    assert not list(proj[-1].parameters())  # the last BN has no affine parameters
    pred = prediction_head(256, "mocov3", hidden_dim=32)
    twin = nn.Sequential(nn.Linear(256, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU(),
                         nn.Linear(32, 256, bias=False), nn.BatchNorm1d(256, affine=False))
    copy_and_compare(pred, twin, 256, train=False)


def test_simclr_byol_and_maect_layouts():
    torch.manual_seed(0)
    simclr = projection_head(12, "simclr")  # hidden = the encoder width, out 128, biases, no BN
    copy_and_compare(simclr, nn.Sequential(nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 128)), 12)
    byol = prediction_head(10, "byol", hidden_dim=20)
    copy_and_compare(byol, nn.Sequential(nn.Linear(10, 20), nn.BatchNorm1d(20), nn.ReLU(), nn.Linear(20, 10)), 10)
    maect = prediction_head(16, "mae-ct", hidden_dim=24)  # no last BN, no bias anywhere
    copy_and_compare(maect, nn.Sequential(nn.Linear(16, 24, bias=False), nn.BatchNorm1d(24), nn.ReLU(),
                                          nn.Linear(24, 16, bias=False)), 16)
    proj = projection_head(16, "mae-ct", hidden_dim=24, out_dim=8)
    assert isinstance(proj[-1], nn.BatchNorm1d) and proj[-1].affine and proj[-2].bias is None
    assert proj(torch.randn(4, 16)).shape == (4, 8)


def test_every_recipe_builds_and_overrides_win():
    for recipe in PROJECTORS:
        head = projection_head(8, recipe, hidden_dim=16, out_dim=4)
        assert head(torch.randn(3, 8)).shape == (3, 4) and head.out_dim == 4
    for recipe in PREDICTORS:
        assert prediction_head(8, recipe, hidden_dim=16)(torch.randn(3, 8)).shape == (3, 8)
    gelu = MLPHead(4, 8, 2, num_layers=3, batch_norm=False, activation="gelu")
    assert [type(m) for m in gelu] == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]
    assert [type(m) for m in MLPHead(4, 8, 2, num_layers=1)] == [nn.Linear]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="num_layers must be a positive int, got 0"):
        MLPHead(4, 8, 2, num_layers=0)
    with pytest.raises(ValueError, match="activation must be one of"):
        MLPHead(4, 8, 2, activation="tanh")
    with pytest.raises(ValueError, match="recipe must be one of .* got 'swav'"):
        projection_head(4, "swav")
