"""--compile: every transformer block of the method (encoder, decoder) is compiled, the step computes what the eager
step computes, and the flag reaches the engine from the command line. Cost: one inductor compile of a 1-block
model, ~30 s on 2 cores."""
import json

import pytest

from vitfast.config import build_config
from vitfast.engine import Trainer
from vitfast.nn.vit import Block
from vitfast.train import main

TINY = dict(embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0, patch_size=8, batch_size=16, decoder_dim=32,
            decoder_depth=1, decoder_heads=2, metrics="", progress=False)


def test_compiled_blocks_step_like_eager(tmp_path):
    losses = {}
    for compiled in (False, True):
        trainer = Trainer(build_config("mae", "quick", out=str(tmp_path / str(compiled)), compile=compiled, **TINY))
        blocks = [m for m in trainer.method.modules() if isinstance(m, Block)]
        assert len(blocks) == 2 and all((b._compiled_call_impl is not None) == compiled for b in blocks)
        batch = next(iter(trainer.loader))
        losses[compiled] = [trainer.train_step(*batch)["loss"] for _ in range(2)]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_compile_flag_reaches_the_config(capsys):
    assert main(["--method", "mae", "--compile", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{"):])["compile"] is True
    assert main(["--method", "mae", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{"):])["compile"] is False
