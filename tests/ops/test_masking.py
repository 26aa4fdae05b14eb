"""vitfast.ops.masking: MAE's random_masking (exact against the official construction) and DILEMMA's
corrupt_positions (never a visible position; the paper's slot rule; the corrupted token carries the wrong pos-embed)."""
import pytest
import torch

from vitfast.ops import corrupt_positions, masked_patch_embed, random_masking


def mae_official_masking(noise, mask_ratio):
    """The index logic of MAE's random_masking (models_mae.py), restated for the test."""
    batch, length = noise.shape
    len_keep = int(length * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    mask = torch.ones([batch, length])
    mask[:, :len_keep] = 0
    return ids_keep, ids_restore, torch.gather(mask, dim=1, index=ids_restore)


def test_random_masking_is_mae_exact():
    keep_idx, ids_restore, mask = random_masking(5, 64, 0.75, generator=torch.Generator().manual_seed(3))
    noise = torch.rand(5, 64, generator=torch.Generator().manual_seed(3))
    for ours, theirs in zip((keep_idx, ids_restore, mask), mae_official_masking(noise, 0.75)):
        assert torch.equal(ours, theirs)
    assert keep_idx.shape == (5, 16) and (mask.sum(1) == 48).all()
    assert (torch.gather(mask, 1, keep_idx) == 0).all()
    with pytest.raises(ValueError, match="mask_ratio"):
        random_masking(2, 64, 1.0)


@pytest.mark.parametrize("num_patches,num_keep", [(64, 16), (64, 32), (64, 48), (16, 16), (9, 5)])
def test_corrupt_positions_never_hits_a_visible_position(num_patches, num_keep):
    gen = torch.Generator().manual_seed(0)
    ids_shuffle = torch.stack([torch.randperm(num_patches, generator=gen) for _ in range(300)])
    pos_idx, corrupted = corrupt_positions(ids_shuffle, num_keep, probability=0.2, generator=gen)
    own = ids_shuffle[:, :num_keep]
    hit = corrupted.bool()
    assert torch.equal(pos_idx[~hit], own[~hit])
    assert (pos_idx[hit] != own[hit]).all()
    if num_keep < num_patches:
        visible_any = (pos_idx.unsqueeze(-1) == own.unsqueeze(1)).any(-1)  # [B, K]: equals some visible position
        assert not visible_any[hit].any()
    if num_keep * 2 <= num_patches:  # the paper's rule: π[N − K + k]
        slot = torch.arange(num_patches - num_keep, num_patches)
        assert torch.equal(pos_idx[hit], ids_shuffle[:, slot][hit])
    rate = corrupted.mean().item()
    assert 0.15 < rate < 0.25, rate


def test_corrupted_tokens_carry_the_wrong_pos_embed():
    """DILEMMA's point: a corrupted token's embedding is its patch plus the pos-embed of another position."""
    gen = torch.Generator().manual_seed(1)
    images, weight, bias = torch.randn(4, 3, 16, 16), torch.randn(8, 3, 4, 4), torch.randn(8)
    pos_embed = torch.randn(16, 8)
    keep_idx, _, _, ids_shuffle = random_masking(4, 16, 0.5, generator=gen, return_shuffle=True)
    pos_idx, corrupted = corrupt_positions(ids_shuffle, keep_idx.shape[1], probability=0.5, generator=gen)
    assert corrupted.sum() > 0
    tokens = masked_patch_embed(images, weight, bias, pos_embed, keep_idx, pos_idx, backend="cpu")
    content = masked_patch_embed(images, weight, bias, None, keep_idx, backend="cpu")
    added = tokens - content  # [B, K, D]: the positional embedding each token received
    hit = corrupted.bool()
    torch.testing.assert_close(added[hit], pos_embed[pos_idx[hit]])
    assert not torch.allclose(added[hit], pos_embed[keep_idx[hit]])
    torch.testing.assert_close(added[~hit], pos_embed[keep_idx[~hit]])
