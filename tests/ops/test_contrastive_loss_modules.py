"""vitfast.nn.contrastive: NTXentLoss, InfoNCELoss and SupConLoss against the papers' formulas (written out in
test_contrastive_loss.py), and cached_contrastive_backward against the whole-batch backward (one process; the
2-rank case is in tests/test_contrastive_distributed.py). About 3 s on 2 cores."""
import pytest
import torch
import torch.nn.functional as F

from test_contrastive_loss import infonce_as_mocov3, ntxent_as_simclr, supcon_as_released
from vitfast import InfoNCELoss, NTXentLoss, SupConLoss
from vitfast.nn import cached_contrastive_backward

F64 = torch.float64


def grads_of(loss, leaves):
    return torch.autograd.grad(loss, leaves, retain_graph=True)


def test_defaults_are_the_peers():
    assert (NTXentLoss().temperature, NTXentLoss().gather_distributed) == (0.5, False)
    assert (InfoNCELoss().temperature, InfoNCELoss().scale, InfoNCELoss().gather_distributed) == (0.2, 1.0, False)
    assert (SupConLoss().temperature, SupConLoss().base_temperature, SupConLoss().gather_distributed) == (0.1, 0.07,
                                                                                                         False)


@pytest.mark.parametrize("n_views", [1, 2, 3])
@pytest.mark.parametrize("labelled", [True, False])
def test_supcon_module_is_the_released_loss(n_views, labelled):
    """features [B, V, D] normalised as the released code expects; labels=None is its SimCLR case (each image its
    own class). Values and gradients in fp64."""
    gen = torch.Generator().manual_seed(n_views)
    raw = torch.randn(7, n_views, 6, dtype=F64, generator=gen).requires_grad_()
    features = F.normalize(raw, dim=2)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 5]) if labelled else None
    got = SupConLoss(temperature=0.1, base_temperature=0.07)(features, labels)
    want = supcon_as_released(features, labels if labelled else torch.arange(7), 0.1, 0.07)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads_of(got, raw)[0], grads_of(want, raw)[0], rtol=1e-10, atol=1e-12)


def test_supcon_module_takes_one_view_rows():
    features = F.normalize(torch.randn(6, 5, dtype=F64), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 2, 3])
    torch.testing.assert_close(SupConLoss()(features, labels), supcon_as_released(features[:, None], labels, 0.1, 0.07))


def test_ntxent_module_is_simclr():
    z0, z1 = torch.randn(5, 8, dtype=F64).requires_grad_(), torch.randn(5, 8, dtype=F64).requires_grad_()
    got, want = NTXentLoss(temperature=0.5)(z0, z1), ntxent_as_simclr(z0, z1, 0.5)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads_of(got, (z0, z1)), grads_of(want, (z0, z1))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_infonce_module_is_mocov3():
    q, k = torch.randn(6, 4, dtype=F64).requires_grad_(), torch.randn(6, 4, dtype=F64).requires_grad_()
    got, want = InfoNCELoss(temperature=0.2, scale=0.4)(q, k), infonce_as_mocov3(q, k, 0.2)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads_of(got, (q, k)), grads_of(want, (q, k))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_supcon_module_rejects_other_ranks():
    message = r"SupConLoss: features must be \[B, D\] or \[B, n_views, D\], got \[2, 2, 2, 2\]"
    with pytest.raises(ValueError, match=message):
        SupConLoss()(torch.randn(2, 2, 2, 2), torch.arange(2))


# ---- cached_contrastive_backward: the whole batch as the pool, in micro-batches ----

def small_model(dropout=0.0):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(7, 9), torch.nn.ReLU(), torch.nn.Dropout(dropout),
                               torch.nn.Linear(9, 5)).double()


def two_view_batch():
    gen = torch.Generator().manual_seed(1)
    # Every label's other images sit in another micro-batch: a pool shrunk to the micro-batch loses them.
    return torch.randn(2, 9, 7, dtype=F64, generator=gen), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])


def supcon_of(labels):
    loss = SupConLoss()
    return lambda z0, z1: loss(torch.stack([z0, z1], dim=1), labels)


def parameter_grads(model):
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return grads


def test_cached_backward_equals_whole_batch():
    model = small_model()
    views, labels = two_view_batch()
    whole = supcon_of(labels)(model(views[0]), model(views[1]))
    whole.backward()
    want = parameter_grads(model)
    chunks = [views[:, 0:3], views[:, 3:6], views[:, 6:9]]
    loss = cached_contrastive_backward(lambda c: (model(c[0]), model(c[1])), chunks, supcon_of(labels))
    torch.testing.assert_close(loss, whole.detach())
    for got, expected in zip(parameter_grads(model), want):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    # The accumulation this replaces (each micro-batch its own pool) gives other gradients: the check can fail.
    for index, chunk in enumerate(chunks):
        supcon_of(labels[3 * index:3 * index + 3])(model(chunk[0]), model(chunk[1])).div(3).backward()
    assert max((a - b).abs().max().item() for a, b in zip(parameter_grads(model), want)) > 1e-3


def test_cached_backward_replays_dropout():
    """Both passes over a micro-batch draw the same dropout masks: the result is the backward of one graph over the
    micro-batches embedded in turn from the same random state, and the random state ends as after that pass."""
    model = small_model(dropout=0.5)
    views, labels = two_view_batch()
    chunks = [views[:, 0:4], views[:, 4:9]]
    embed = lambda c: (model(c[0]), model(c[1]))
    torch.manual_seed(7)
    parts = [embed(chunk) for chunk in chunks]
    whole = supcon_of(labels)(*(torch.cat(p) for p in zip(*parts)))
    whole.backward()
    want, after = parameter_grads(model), torch.rand(3)
    torch.manual_seed(7)
    loss = cached_contrastive_backward(embed, chunks, supcon_of(labels))
    torch.testing.assert_close(loss, whole.detach())
    for got, expected in zip(parameter_grads(model), want):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.rand(3), after)


def test_cached_backward_refuses_no_micro_batches():
    with pytest.raises(ValueError, match="micro_batches is empty"):
        cached_contrastive_backward(lambda c: c, [], lambda z: z.sum())
