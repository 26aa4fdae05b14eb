"""RelationHead and the RelViT method: losses against a dense re-computation, stages end to end."""
import json

import torch
import torch.nn.functional as F

from vitfast import RelationHead
from vitfast.config import build_config
from vitfast.engine import run
from vitfast.ops import relation_logits, relation_targets


def test_relation_head_matches_dense_computation():
    torch.manual_seed(0)
    head = RelationHead(embed_dim=36, grid_size=4)
    tokens = torch.randn(2, 16, 36)
    positions = torch.stack([torch.randperm(16), torch.arange(16)])  # shuffled tokens keep their cells
    out = head(tokens, positions)
    q = head.q_proj(tokens).view(2, 16, 9, 4)
    k = head.k_proj(tokens).view(2, 16, 9, 4)
    relation = F.cross_entropy(relation_logits(q, k), relation_targets(positions, 4))
    absolute = F.cross_entropy(head.abs_pos(tokens).flatten(0, 1), positions.reshape(-1))
    torch.testing.assert_close(out["relation_loss"], relation)
    torch.testing.assert_close(out["absolute_loss"], absolute)
    torch.testing.assert_close(out["loss"], relation + absolute)
    out["loss"].backward()
    assert head.q_proj.weight.grad.abs().sum() > 0


def test_relation_head_subset_needs_positions():
    head = RelationHead(embed_dim=18, grid_size=4)
    try:
        head(torch.randn(1, 5, 18))
    except ValueError as error:
        assert "positions" in str(error)
    else:
        raise AssertionError("a 5-token subset without positions must be refused")


def test_relvit_stages_run_in_one_command(tmp_path):
    tiny = dict(embed_dim=36, depth=1, num_heads=2, patch_size=8, batch_size=32, progress=False, epochs=1,
                max_steps=None)
    config = build_config("relvit", "quick", out=str(tmp_path), **tiny)
    # The user's epochs are the pipeline's budget: a stage gets at least one, the scratch baseline their sum.
    assert config.stage_overrides["upstream"] == {"metrics": "knn", "epochs": 1}
    assert (config.stage_overrides["finetune"]["epochs"], config.stage_overrides["scratch"]["epochs"]) == (1, 2)
    summary = run(config)
    assert set(summary["stages"]) == {"upstream", "finetune", "scratch"}
    stored = json.loads((tmp_path / "summary.json").read_text())
    for stage in ("finetune", "scratch"):
        assert 0.0 <= stored["stages"][stage]["test_accuracy"] <= 1.0
    assert "knn_accuracy" in stored["stages"]["upstream"]
    finetune = torch.load(tmp_path / "finetune" / "checkpoint-last.pt", weights_only=False)
    upstream = torch.load(tmp_path / "upstream" / "checkpoint-last.pt", weights_only=False)
    assert "model.pos_embed" in finetune["method"] and "model.pos_embed" not in upstream["method"]
    # Resuming a finished multi-stage run re-trains nothing.
    resumed = run(build_config("relvit", "quick", out=str(tmp_path), resume=True, **tiny))
    assert resumed["stages"] == summary["stages"]


def test_relation_head_mlp_kind_matches_dense_computation():
    """kind="mlp": out(i, j) = W gelu(A z_i + B z_j + b) + c, for the direction classes and the DRLoc offsets."""
    torch.manual_seed(0)
    tokens = torch.randn(2, 16, 12)
    positions = torch.stack([torch.randperm(16), torch.arange(16)])
    rows, cols = positions // 4, positions % 4
    offsets = torch.stack((rows[:, :, None] - rows[:, None, :], cols[:, :, None] - cols[:, None, :]), -1) / 3.0
    for task in ("direction", "offset"):
        head = RelationHead(embed_dim=12, grid_size=4, kind="mlp", task=task, hidden_dim=10)
        out = head(tokens, positions)
        pre = head.u_proj(tokens)[:, :, None] + head.v_proj(tokens)[:, None, :]  # [B, N, N, H]
        pair_out = head.out_proj(F.gelu(pre))                                    # [B, N, N, C_out]
        if task == "direction":
            relation = F.cross_entropy(pair_out.permute(0, 3, 1, 2), relation_targets(positions, 4))
            accuracy = (pair_out.argmax(-1) == relation_targets(positions, 4)).float().mean()
            torch.testing.assert_close(out["relation_accuracy"], accuracy)
        else:
            relation = F.mse_loss(pair_out, offsets)
            assert "relation_accuracy" not in out
        absolute = F.cross_entropy(head.abs_pos(tokens).flatten(0, 1), positions.reshape(-1))
        torch.testing.assert_close(out["relation_loss"], relation)
        torch.testing.assert_close(out["loss"], relation + absolute)
        out["loss"].backward()
        for layer in (head.u_proj, head.v_proj, head.out_proj):
            assert layer.weight.grad.abs().sum() > 0
        assert head.v_proj.bias.grad.abs().sum() > 0 and head.out_proj.bias.grad.abs().sum() > 0
    assert RelationHead(embed_dim=12, grid_size=4, kind="mlp").hidden_dim == 12  # H defaults to D


def test_relation_head_rejects_unknown_kind_and_task():
    for kwargs, message in ((dict(kind="conv"), "kind must be"), (dict(task="offset"), "task must be one of"),
                            (dict(kind="mlp", task="angle"), "task must be one of"),
                            (dict(kind="mlp", activation="tanh"), "activation must be one of")):
        try:
            RelationHead(embed_dim=18, grid_size=4, **kwargs)
        except ValueError as error:
            assert message in str(error)
        else:
            raise AssertionError(f"{kwargs} must be refused")
