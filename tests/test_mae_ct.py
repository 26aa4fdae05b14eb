"""MAE-CT (vitfast/methods/mae_ct.py) and its NNCLR loss (vitfast/nn/nnclr.py).

NNCLRLoss against a dense formula written out here (stable sort, own ids removed, the same uniform draws replayed
from a copy of the generator, plain cross-entropy), the queue's FIFO contents and the start-up rule; the stages:
what learns in head and ct, the layer-wise lr scales, the EMA projector (keys, queue) and EMA encoder (evaluated),
the ct stage's init from the head stage, the mae stage being `--method mae` itself; the whole pipeline and
`--stage ct` through the CLI on a tiny model. Cost: ~50 s on 2 cores measured under heavy load (~28 s of it the CLI
test: 32-wide ViTs, 320 digits).
"""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from vitfast import checkpoint as ckpt
from vitfast.config import UserError, build_config
from vitfast.engine import CHECKPOINT, Trainer
from vitfast.methods import DataInfo, get_method
from vitfast.nn import NNCLRLoss
from vitfast.train import main

DATA = DataInfo(channels=1, image_size=16, num_classes=10, mean=(0.5,), std=(0.25,))
TINY = dict(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, patch_size=8, proj_hidden_dim=48, proj_dim=16,
            pred_hidden_dim=40, decoder_dim=16, decoder_depth=1, decoder_heads=2, queue_size=64)


def method(stage, **overrides):
    config = build_config("mae-ct", "quick", stage=stage, **{**TINY, **overrides})
    config = config.replace(**{k: v for k, v in config.stage_overrides.get(stage, {}).items() if k not in overrides})
    torch.manual_seed(0)
    return get_method("mae-ct")(config, DATA).train()


def cross_entropy_by_hand(logits):
    """Diagonal targets: -log softmax(logits)[i, i], mean over rows."""
    return (torch.logsumexp(logits, 1) - logits.diagonal()).mean()


def dense_nnclr(p0, p1, z0, z1, ids, support, support_ids, k, generator, tau):
    """docs/methods.md §6.2 written out: the neighbours drawn with the same generator (z1's draw first)."""
    def lookup(z):
        z = F.normalize(z.double(), dim=1)
        sims = z @ support.double().T
        sims = sims.masked_fill(support_ids[None, :] == ids[:, None], float("-inf"))
        order = torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :k]
        rank = torch.randint(k, (z.shape[0], 1), generator=generator) if k > 1 else torch.zeros(z.shape[0], 1).long()
        return support.double()[order.gather(1, rank)[:, 0]]
    nn1, nn0 = lookup(z1), lookup(z0)
    q0, q1 = F.normalize(p0.double(), dim=1), F.normalize(p1.double(), dim=1)
    return 0.5 * (cross_entropy_by_hand(nn1 @ q0.T / tau) + cross_entropy_by_hand(nn0 @ q1.T / tau))


def random_inputs(batch=6, dim=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    p0, p1, z0, z1 = (torch.randn(batch, dim, generator=g) for _ in range(4))
    return p0.requires_grad_(), p1.requires_grad_(), z0, z1


# --- NNCLRLoss ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 3])
def test_nnclr_loss_with_a_full_queue_is_the_dense_formula(k):
    p0, p1, z0, z1 = random_inputs()
    ids = torch.tensor([3, 7, 11, 12, 20, 21])
    criterion = NNCLRLoss(dim=5, queue_size=10, temperature=0.2, topk=k)
    g = torch.Generator().manual_seed(5)
    queue = F.normalize(torch.randn(10, 5, generator=g), dim=1)
    queue_ids = torch.tensor([3, 7, 100, 11, 101, 102, 12, 103, 3, 104])  # own ids (3 twice) must never be drawn
    queue[0], queue[8] = F.normalize(z1[0], dim=0), F.normalize(z0[0], dim=0)  # image 3's own views: the most similar
    criterion.queue.push(queue, queue_ids)
    assert len(criterion.queue) == 10
    expected = dense_nnclr(p0, p1, z0, z1, ids, queue, queue_ids, k, torch.Generator().manual_seed(9), 0.2)
    loss = criterion((p0, p1), (z0, z1), ids, torch.Generator().manual_seed(9))
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(loss, (p0, p1))
    want = torch.autograd.grad(expected, (p0, p1))
    for got, exp in zip(grads, want):
        torch.testing.assert_close(got.double(), exp.double(), rtol=1e-4, atol=1e-6)
    # Not excluding the own id gives another loss (image 3's own view would be its neighbour): the test can fail.
    unexcluded = dense_nnclr(p0, p1, z0, z1, ids + 1000, queue, queue_ids, k, torch.Generator().manual_seed(9), 0.2)
    assert not math.isclose(unexcluded.item(), expected.item(), rel_tol=1e-4)
    # FIFO after the lookup: view 0's normalised keys overwrote the 6 oldest rows, with their ids.
    features, stored_ids = criterion.queue.contents()
    torch.testing.assert_close(features[:6], F.normalize(z0, dim=1))
    torch.testing.assert_close(features[6:], queue[6:])
    assert stored_ids.tolist() == ids.tolist() + queue_ids[6:].tolist()
    assert int(criterion.queue.pointer) == 6


def test_nnclr_loss_while_the_queue_fills_searches_the_batch_too():
    """An empty queue: the support is this step's view-0 keys (own id out); a partly filled one: queue + batch."""
    p0, p1, z0, z1 = random_inputs(seed=1)
    ids = torch.arange(6)
    criterion = NNCLRLoss(dim=5, queue_size=16, temperature=0.3, topk=2)
    loss = criterion((p0, p1), (z0, z1), ids, torch.Generator().manual_seed(2))
    z0n = F.normalize(z0, dim=1)
    expected = dense_nnclr(p0, p1, z0, z1, ids, z0n, ids, 2, torch.Generator().manual_seed(2), 0.3)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    # Second step: 6 rows queued (not full) + the new batch's 6 keys; the queue then holds 12 rows in age order.
    q0, q1, y0, y1 = random_inputs(seed=3)
    new_ids = torch.arange(6, 12)
    loss = criterion((q0, q1), (y0, y1), new_ids, torch.Generator().manual_seed(4))
    support = torch.cat([z0n, F.normalize(y0, dim=1)])
    expected = dense_nnclr(q0, q1, y0, y1, new_ids, support, torch.arange(12), 2, torch.Generator().manual_seed(4), 0.3)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    features, stored = criterion.queue.contents()
    torch.testing.assert_close(features, support)
    assert stored.tolist() == list(range(12))


def test_nnclr_loss_arguments():
    with pytest.raises(ValueError, match="topk must be a positive int"):
        NNCLRLoss(topk=0)
    criterion = NNCLRLoss(dim=5, queue_size=8)
    p0, p1, z0, z1 = random_inputs()
    with pytest.raises(ValueError, match="ids must be int64"):
        criterion((p0, p1), (z0, z1), torch.arange(6).int())
    with pytest.raises(ValueError, match="two views"):
        criterion((p0,), (z0, z1), torch.arange(6))


# --- the stages -----------------------------------------------------------------------------------------------------

def batch(size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (size, 1, 16, 16), dtype=torch.uint8, generator=g), torch.zeros(size).long(), \
        torch.arange(size)


def learning(m):
    images, labels, ids = batch()
    loss, _ = m(images, labels, ids, torch.Generator().manual_seed(0))
    loss.backward()
    return {name for name, p in m.named_parameters() if p.grad is not None}


def test_head_stage_trains_only_the_heads():
    m = method("head", topk=1)
    assert m.criterion.topk == 1
    got = learning(m)
    assert got and all(name.split(".")[0] in ("projector", "predictor") for name in got)
    assert got == {n for n, p in m.named_parameters() if n.split(".")[0] in ("projector", "predictor")}
    assert not m.model.training  # the frozen encoder stays in eval mode
    assert m.encoder is m.model and not m.random_init_baseline


def test_ct_stage_freezes_the_lower_half_and_decays_the_lr_per_block():
    assert build_config("mae-ct", "quick").stage_overrides["ct"]["topk"] == 20
    assert build_config("mae-ct", "quick").stage_overrides["head"]["topk"] == 1
    m = method("ct", depth=4, topk=4)  # a batch of 8 has 7 other images
    assert m.criterion.topk == 4
    got = learning(m)
    frozen = ("model.patch_embed.", "model.cls_token", "model.pos_embed", "model.blocks.0.", "model.blocks.1.")
    assert not [n for n in got if n.startswith(frozen)]
    assert not [n for n in got if n.startswith(("ema.", "target."))]  # the EMA copies get no gradient
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert got == trainable
    assert {n.split(".")[0] + "." + n.split(".")[1] for n in got if n.startswith("model.")} == \
        {"model.blocks", "model.norm"}
    assert any(n.startswith("model.blocks.2.") for n in got) and any(n.startswith("model.blocks.3.") for n in got)
    scale = {id(p): g["lr_scale"] for g in m.param_groups() for p in g["params"]}
    named = dict(m.named_parameters())
    assert set(scale) == {id(p) for p in named.values() if p.requires_grad}
    for name, param in named.items():
        if name.startswith("model.blocks.2."):
            assert scale[id(param)] == pytest.approx(0.65 ** 2), name
        elif name.startswith("model.blocks.3."):
            assert scale[id(param)] == pytest.approx(0.65), name  # the top block is decayed too
        elif param.requires_grad:
            assert scale[id(param)] == 1.0, name  # final norm and heads
    decays = {id(p): g["weight_decay"] for g in m.param_groups() for p in g["params"]}
    assert decays[id(m.projector[0].weight)] == 1e-5 and decays[id(m.model.blocks[3].mlp.fc1.weight)] == 0.05
    assert decays[id(m.model.norm.weight)] == 0.0


def test_ct_keys_come_from_the_ema_projector_and_the_emas_follow_after_each_step():
    m = method("ct", projector_momentum=0.9, encoder_momentum=0.8, topk=4)
    with torch.no_grad():  # a key projector that differs from the online one
        for p in m.target.parameters():
            p.add_(0.1 * torch.randn_like(p))
    views = [torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    m.train_views = lambda images, generator: [v.clone() for v in views]
    images, labels, ids = batch()
    m(images, labels, ids, torch.Generator().manual_seed(0))
    with torch.no_grad():
        pooled = m.model.forward_head(m.model.forward_features(views[0]), pre_logits=True)
        keys = F.normalize(m.target["projector"](pooled), dim=1)
        online = F.normalize(m.projector(pooled), dim=1)
    queued, _ = m.criterion.queue.contents()
    torch.testing.assert_close(queued, keys, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(queued, online, atol=1e-3)
    old = {k: v.clone() for k, v in m.state_dict().items()}
    optimizer = torch.optim.SGD(m.param_groups(), lr=0.5)
    loss, _ = m(images, labels, ids, torch.Generator().manual_seed(0))
    loss.backward()
    optimizer.step()
    m.after_step(1, 10)
    for prefix, part, momentum in (("target.projector.", "projector.", 0.9), ("ema.encoder.", "model.", 0.8)):
        moved = 0
        for name, value in m.named_parameters():
            if name.startswith(prefix):
                student = m.get_parameter(part + name[len(prefix):])
                torch.testing.assert_close(value, momentum * old[name] + (1 - momentum) * student,
                                           rtol=1e-6, atol=1e-7)
                moved += not torch.equal(value, old[name])
        assert moved, prefix
    assert m.encoder is m.ema["encoder"]  # the EMA encoder is what is evaluated


def test_ct_starts_from_the_head_stage_encoder_heads_and_queue():
    head = method("head")
    images, labels, ids = batch()
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.01 * torch.randn_like(p))
    head(images, labels, ids, torch.Generator().manual_seed(0))  # fills part of the queue
    state = {"method": head.state_dict(), "encoder": head.encoder_state_dict()}
    ct = method("ct", topk=4)
    report = ct.init_from(state, "head")
    assert report["heads_skipped"] == []
    for name, value in head.state_dict().items():
        assert torch.equal(ct.state_dict()[name], value), name
    for a, b in ((ct.target["projector"], head.projector), (ct.ema["encoder"], head.model)):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), name
    assert len(ct.criterion.queue) == 8


def test_mae_stage_is_the_mae_method():
    config = build_config("mae-ct", "quick", stage="mae", **TINY)
    torch.manual_seed(0)
    mae_ct = get_method("mae-ct")(config, DATA)
    torch.manual_seed(0)
    plain = get_method("mae")(build_config("mae", "quick", **{k: v for k, v in TINY.items() if k in (
        "embed_dim", "depth", "num_heads", "mlp_ratio", "patch_size", "decoder_dim", "decoder_depth",
        "decoder_heads")}), DATA)
    assert mae_ct.mae.state_dict().keys() == plain.state_dict().keys()
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in mae_ct.mae.state_dict().items())
    images, labels, ids = batch()
    a, _ = mae_ct(images, labels, ids, torch.Generator().manual_seed(3))
    b, _ = plain(images, labels, ids, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and mae_ct.encoder is mae_ct.mae.model and mae_ct.random_init_baseline
    layout = [([id(p) for p in g["params"]], g["weight_decay"]) for g in mae_ct.param_groups()]
    plain_ids = {id(p): id(q) for p, q in zip(plain.parameters(), mae_ct.mae.parameters())}
    want = [([plain_ids[id(p)] for p in g["params"]], g["weight_decay"]) for g in plain.param_groups()]
    assert layout == want  # MAE's own optimizer groups (its weight-decay rules), not the base class's


def test_head_and_ct_refuse_gradient_accumulation():
    from types import SimpleNamespace
    fake = SimpleNamespace(config=SimpleNamespace(batch_size=64, accum_steps=2, method="mae-ct"),
                           dist=SimpleNamespace(world_size=1))
    for stage in ("head", "ct"):
        with pytest.raises(UserError, match="depends on the whole batch"):
            Trainer._rank_batch(fake, method(stage, accum_steps=2))
    # MAE's loss is a mean per image: its stage may accumulate.
    assert Trainer._rank_batch(fake, method("mae", accum_steps=2)) == 64


# --- the pipeline through the CLI -----------------------------------------------------------------------------------

def test_three_stages_then_one_stage_through_the_cli(tmp_path, small_digits):
    values = {**TINY, "batch_size": 32, "image_size": 16, "device": "cpu", "metrics": "knn"}
    flags = ["--no-progress"] + [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]
    root = str(tmp_path / "run")
    assert main(["--method", "mae-ct", "--out", root, "--epochs", "3", *flags]) == 0  # one epoch per stage
    with open(os.path.join(root, "summary.json")) as f:
        stages = json.load(f)["stages"]
    assert list(stages) == ["mae", "head", "ct"]
    assert "random_init_knn_accuracy" in stages["mae"] and "knn_accuracy" in stages["mae"]
    assert "random_init" not in stages["head"] and "random_init" not in stages["ct"]
    assert 0.0 <= stages["ct"]["knn_accuracy"] <= 1.0
    head = ckpt.load(os.path.join(root, "head", CHECKPOINT))
    ct = ckpt.load(os.path.join(root, "ct", CHECKPOINT))
    mae = ckpt.load(os.path.join(root, "mae", CHECKPOINT))
    for name, value in mae["encoder"].items():  # the head stage never changed the encoder
        assert torch.equal(head["encoder"][name], value), name
    assert int(ct["method"]["criterion.queue.filled"]) == 64  # the head stage's full queue, kept full
    assert any(k.startswith("ema.encoder.") for k in ct["method"])
    for name, value in ct["encoder"].items():  # the checkpoint's encoder is the EMA one
        assert torch.equal(ct["method"]["ema.encoder." + name], value), name
    # --stage ct alone, from the sibling head folder: the same run as the pipeline's ct stage.
    again = os.path.join(root, "ct_again")
    assert main(["--method", "mae-ct", "--stage", "ct", "--out", again, "--epochs", "1", *flags]) == 0
    redo = ckpt.load(os.path.join(again, CHECKPOINT))
    for name, value in ct["method"].items():
        assert torch.equal(redo["method"][name], value), name
