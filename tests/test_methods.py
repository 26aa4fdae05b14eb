"""Method building blocks: MAE's decoder unshuffle, weight-decay groups, one step of every registered method."""
import dataclasses

import pytest
import torch

from vitfast.config import build_config
from vitfast.methods import MAE, DataInfo, Supervised
from vitfast.nn.mae_decoder import MAEDecoder
from vitfast.ops import random_masking

DATA = DataInfo(channels=1, image_size=32, num_classes=10, mean=(0.5,), std=(0.25,))


def test_mae_decoder_puts_every_token_back_in_its_cell():
    """With no decoder blocks, output n is pred(norm(embed(token of n) or mask_token, + pos[n]))."""
    torch.manual_seed(0)
    decoder = MAEDecoder(num_patches=16, patch_size=4, in_chans=1, encoder_dim=8, decoder_dim=8, depth=0, num_heads=2)
    keep_idx, ids_restore, mask = random_masking(3, 16, 0.75)
    tokens = torch.randn(3, 1 + keep_idx.shape[1], 8)
    out = decoder(tokens, ids_restore)
    head = lambda x: decoder.decoder_pred(decoder.decoder_norm(x))
    pos = decoder.decoder_pos_embed[0, 1:]
    for b in range(3):
        for slot, n in enumerate(keep_idx[b].tolist()):
            torch.testing.assert_close(out[b, n], head(decoder.decoder_embed(tokens[b, 1 + slot]) + pos[n]))
        for n in torch.nonzero(mask[b]).flatten().tolist():
            torch.testing.assert_close(out[b, n], head(decoder.mask_token[0, 0] + pos[n]))


def test_mae_step_and_no_decay_groups():
    config = build_config("mae", "quick", embed_dim=32, depth=1, num_heads=2, decoder_dim=32, decoder_depth=1)
    method = MAE(config, DATA)
    images = torch.randint(0, 256, (4, 1, 32, 32), dtype=torch.uint8)
    loss, _ = method(images, torch.zeros(4, dtype=torch.int64), torch.arange(4), torch.Generator().manual_seed(0))
    loss.backward()
    assert loss.item() > 0 and method.model.patch_embed.proj.weight.grad is not None
    decay, no_decay = method.param_groups()
    decay_ids = {id(p) for p in decay["params"]}
    # The presets decay the tokens, as MAE's release does (tests/test_recipes.py); without decay_tokens they are not.
    assert id(method.decoder.mask_token) in decay_ids and id(method.model.cls_token) in decay_ids
    assert id(method.model.blocks[0].attn.qkv.weight) in decay_ids
    assert all(p.requires_grad for g in (decay, no_decay) for p in g["params"])  # frozen sin-cos tables excluded
    shared_rule = MAE(config.replace(decay_tokens=False), DATA)
    _, shared_no_decay = shared_rule.param_groups()
    kept = {id(p) for p in shared_no_decay["params"]}
    assert id(shared_rule.decoder.mask_token) in kept and id(shared_rule.model.cls_token) in kept


def test_supervised_step_reports_accuracy():
    config = build_config("supervised", "quick", embed_dim=32, depth=1, num_heads=2)
    method = Supervised(config, DATA)
    images = torch.randint(0, 256, (4, 1, 32, 32), dtype=torch.uint8)
    loss, metrics = method(images, torch.arange(4), torch.arange(4), torch.Generator().manual_seed(0))
    assert loss.item() > 0 and 0.0 <= metrics["train_accuracy"] <= 1.0



def _cases():
    """Every registered method, every stage it runs (new methods are covered without a new test)."""
    from vitfast.methods import METHODS
    return [(name, stage) for name, cls in sorted(METHODS.items()) for stage in (cls.stages or (None,))]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("method,stage", _cases())
def test_every_registered_method_takes_a_step(method, stage, precision):
    """One step of a 32-wide, 1-block model on random uint8 images: a finite loss, float metrics, gradients for
    every parameter the optimizer gets, and parameter groups that hold each trainable parameter exactly once. Under
    bf16 autocast (--precision bf16) the loss, the weights and their gradients stay fp32."""
    from vitfast.methods import get_method
    cls = get_method(method)
    own = {f.name for f in dataclasses.fields(cls.Config)}
    small = {k: v for k, v in dict(decoder_dim=32, decoder_depth=1, decoder_heads=2).items() if k in own}
    config = build_config(method, "quick", stage=stage, embed_dim=36, depth=1, num_heads=2, patch_size=8, **small)
    torch.manual_seed(0)
    model = cls(config, DATA)
    images = torch.randint(0, 256, (4, 1, 32, 32), dtype=torch.uint8)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss, metrics = model(images, torch.arange(4) % 10, torch.arange(4), torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.dtype == torch.float32
    assert all(isinstance(v, float) for v in metrics.values())
    loss.backward()
    grouped = [p for group in model.param_groups() for p in group["params"]]
    assert len({id(p) for p in grouped}) == len(grouped)
    assert {id(p) for p in grouped} == {id(p) for p in model.parameters() if p.requires_grad}
    assert any(p.grad is not None for p in grouped)
    assert all(p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32) for p in grouped)
    assert model.features(torch.randn(2, 1, 32, 32)).shape[0] == 2
