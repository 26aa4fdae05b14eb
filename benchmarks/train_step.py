"""Whole training steps side by side in one run: vitfast vs the same model as users write it (timm + the papers'
formulas), images/s, peak memory and achieved GFLOP/s beside the machine's GEMM peak.

    python benchmarks/train_step.py                 # MAE (B256, 32 px) and RelViT upstream (B64, N64 and N196)
    python benchmarks/train_step.py --methods       # also one quick-preset step of every method, eager vs --compile
    python benchmarks/train_step.py --smoke --compile-backend eager   # tiny shapes: checks that every row runs
    python benchmarks/train_step.py --interleaved   # fp32 vitfast / vitfast with SDPA attention / timm, alternating

A step is forward, backward and the AdamW step. Rows:
- ``vitfast fp32``, ``vitfast fp32 + compile`` (every transformer block compiled, as ``train.py --compile``),
  ``vitfast bf16`` (autocast, as ``--precision bf16``), ``vitfast bf16 + compile``: the vitfast method itself, with
  its fused ops and its on-device augmentation inside the step;
- ``vitfast fp32, SDPA attention``: the same with ``attn_impl="sdpa"`` instead of the default ``"auto"`` (which on a
  CPU takes the fused ``vitfast.ops.self_attention``): what the fused attention contributes to the step;
- ``timm + formulas fp32`` and ``timm + formulas bf16 autocast``: timm's ViT blocks and patch embedding with the
  papers' formulas written out in PyTorch (MAE: random masking by argsort of noise, decoder with mask tokens,
  patchify + per-patch normalisation + MSE over the masked patches; RelViT: the [B, 9, N, N] relation logits
  materialised + cross-entropy, absolute positions), on images already augmented (a data loader's work, not timed:
  this favours the timm rows).
bf16 rows run where the hardware multiplies bf16 (a CUDA GPU, or a CPU with AMX or AVX-512 BF16); on other CPUs they
are listed as skipped with the bf16 GEMM rate measured in the same run, which says why.
``--interleaved`` times the three fp32 steps round by round in alternating order instead of row after row, so that the
slow drift of a shared machine (seen here: the GEMM rate moving by 20 % between runs minutes apart) hits all three
alike; vs_vitfast_fp32 is then the median of the per-round ratios.
GFLOP/s: the FLOPs of one eager step counted by torch.utils.flop_counter (matmuls, convolutions, attention; the fused
ops' own FLOPs are not counted), over the median step time; the GEMM rows give the machine's peak per dtype.
"""
import argparse
import contextlib
import csv
import dataclasses
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing

from vitfast.config import build_config, stage_config  # noqa: E402
from vitfast.gpu_check import measure  # noqa: E402
from vitfast.machine import cpu_bf16_hardware, describe  # noqa: E402
from vitfast.methods import DataInfo, get_method  # noqa: E402
from vitfast.nn.vit import Attention, Block  # noqa: E402
from vitfast.ops.relation_loss import DIRECTION_CLASSES, relation_logits, relation_targets  # noqa: E402

DATA = dict(channels=3, num_classes=10, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))  # CIFAR-10
SMALL_DATA_VIT = dict(embed_dim=192, depth=9, num_heads=12, mlp_ratio=2.0, patch_size=4)  # Gani et al.
SMOKE_VIT = dict(embed_dim=36, depth=1, num_heads=3, mlp_ratio=2.0, patch_size=4)
COLUMNS = ["step", "shape", "implementation", "precision", "min_ms", "median_ms", "rounds", "images_per_s",
           "vs_vitfast_fp32", "peak_mib", "gflop_per_step", "gflops", "gemm_peak_gflops", "skipped", "machine",
           "torch_threads", "date_utc"]


def bf16_is_fast(device: torch.device) -> bool:
    return device.type == "cuda" or cpu_bf16_hardware() is not None


def timm_missing() -> str:
    try:
        import timm  # noqa: F401
    except ImportError:
        return "timm is not installed (pip install timm)"
    return ""


def compile_blocks(module: nn.Module, backend: str) -> None:
    """What ``train.py --compile`` does: every transformer block (vitfast's or timm's) compiled on its own."""
    kinds = (Block,) if timm_missing() else (Block, __import__("timm").models.vision_transformer.Block)
    for block in (m for m in module.modules() if isinstance(m, kinds)):
        block.compile(backend=backend)


# ----------------------------------------------------------------------------- the usual way: timm + formulas
class TimmViT(nn.Module):
    """timm's patch embedding and blocks, a CLS token, learned positions (``pos=False``: none, RelViT upstream)."""

    def __init__(self, image_size, embed_dim, depth, num_heads, mlp_ratio, patch_size, pos=True):
        super().__init__()
        from timm.layers import PatchEmbed
        from timm.models.vision_transformer import Block as TimmBlock
        self.patch_embed = PatchEmbed(image_size, patch_size, 3, embed_dim)
        self.grid, self.patch = image_size // patch_size, patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.randn(1, self.grid ** 2 + 1, embed_dim) * 0.02) if pos else None
        self.blocks = nn.Sequential(*[TimmBlock(embed_dim, num_heads, mlp_ratio, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim)


class TimmMAE(nn.Module):
    """MAE as its paper writes it, on timm blocks: returns the masked-patch MSE of normalised pixels."""

    def __init__(self, image_size, vit, decoder_dim, decoder_depth, decoder_heads, mask_ratio):
        super().__init__()
        from timm.models.vision_transformer import Block as TimmBlock
        self.encoder = TimmViT(image_size, **vit)
        n = self.encoder.grid ** 2
        self.keep = int(n * (1 - mask_ratio))
        self.decoder_embed = nn.Linear(vit["embed_dim"], decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos = nn.Parameter(torch.randn(1, n + 1, decoder_dim) * 0.02)
        self.decoder_blocks = nn.Sequential(*[TimmBlock(decoder_dim, decoder_heads, 4.0, qkv_bias=True)
                                              for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, vit["patch_size"] ** 2 * 3)

    def forward(self, images):
        e, b = self.encoder, images.shape[0]
        x = e.patch_embed(images) + e.pos_embed[:, 1:]
        n = x.shape[1]
        order = torch.argsort(torch.rand(b, n, device=x.device), dim=1)  # random masking: keep the first K
        restore = torch.argsort(order, dim=1)
        x = torch.gather(x, 1, order[:, :self.keep, None].expand(-1, -1, x.shape[-1]))
        mask = torch.ones(b, n, device=x.device)
        mask[:, :self.keep] = 0
        mask = torch.gather(mask, 1, restore)
        x = torch.cat([(e.cls_token + e.pos_embed[:, :1]).expand(b, -1, -1), x], 1)
        x = self.decoder_embed(e.norm(e.blocks(x)))
        y = torch.cat([x[:, 1:], self.mask_token.expand(b, n - self.keep, -1)], 1)
        y = torch.gather(y, 1, restore[..., None].expand(-1, -1, y.shape[-1]))
        y = self.decoder_blocks(torch.cat([x[:, :1], y], 1) + self.decoder_pos)
        pred = self.decoder_pred(self.decoder_norm(y))[:, 1:]
        p, g = e.patch, e.grid
        target = images.reshape(b, 3, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(b, n, p * p * 3)
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
        loss = ((pred.float() - target) ** 2).mean(-1)
        return (loss * mask).sum() / mask.sum()


class TimmRelViT(nn.Module):
    """RelViT upstream on timm blocks: no positions, relation logits [B, 9, N, N] materialised, absolute CE."""

    def __init__(self, image_size, vit):
        super().__init__()
        self.encoder = TimmViT(image_size, **vit, pos=False)
        d, self.head_dim = vit["embed_dim"], vit["embed_dim"] // DIRECTION_CLASSES
        self.q_proj = nn.Linear(d, DIRECTION_CLASSES * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, DIRECTION_CLASSES * self.head_dim, bias=False)
        self.absolute = nn.Linear(d, self.encoder.grid ** 2)

    def forward(self, images):
        e, b = self.encoder, images.shape[0]
        x = e.patch_embed(images)
        z = e.norm(e.blocks(torch.cat([e.cls_token.expand(b, -1, -1), x], 1)))[:, 1:]
        n = z.shape[1]
        q = self.q_proj(z).view(b, n, DIRECTION_CLASSES, self.head_dim)
        k = self.k_proj(z).view(b, n, DIRECTION_CLASSES, self.head_dim)
        cells = torch.arange(n, device=z.device).expand(b, -1)
        relation = F.cross_entropy(relation_logits(q, k).float(), relation_targets(cells, e.grid))
        return relation + F.cross_entropy(self.absolute(z).flatten(0, 1).float(), cells.flatten())


# ----------------------------------------------------------------------------- steps
def _adamw_step(module: nn.Module, loss_of, precision: str, device: torch.device, params=None):
    optimizer = torch.optim.AdamW(params if params is not None else module.parameters(), lr=1e-4)
    dtype = torch.bfloat16 if precision == "bf16" else None

    def step():
        with torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext():
            loss = loss_of()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def vitfast_step(method_name: str, stage: str, image_size: int, batch: int, vit: dict, precision: str,
                 compile_backend, device, attn_impl: str = "auto", **settings):
    config = build_config(method_name, "paper", batch_size=batch, accum_steps=1, metrics="", stage=stage or None,
                          **vit, **settings)
    config = stage_config(config, stage) if stage else config  # the stage's own values, as train.py runs it
    torch.manual_seed(0)
    method = get_method(method_name)(config, DataInfo(image_size=image_size, **DATA)).to(device).train()
    for module in method.modules():
        if isinstance(module, Attention):
            module.set_attn_impl(attn_impl)
    if compile_backend:
        compile_blocks(method, compile_backend)
    gen = torch.Generator(device=device).manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, image_size, image_size), dtype=torch.uint8, device=device, generator=gen)
    labels, indices = torch.zeros(batch, dtype=torch.int64, device=device), torch.arange(batch, device=device)
    return _adamw_step(method, lambda: method(images, labels, indices, gen)[0], precision, device,
                       method.param_groups())


def timm_step(model: nn.Module, image_size: int, batch: int, precision: str, compile_backend, device):
    torch.manual_seed(0)
    model = model.to(device).train()
    if compile_backend:
        compile_blocks(model, compile_backend)
    images = torch.randn(batch, 3, image_size, image_size, device=device)
    return _adamw_step(model, lambda: model(images), precision, device)


def _count_cpu_sdpa_flops() -> None:
    """torch.utils.flop_counter counts SDPA's GPU kernels but not its CPU flash kernel (0 FLOPs): count it by the same
    formulas, so that a CPU step through SDPA and one through vitfast.ops.self_attention (which registers them) count
    the same attention FLOPs."""
    from torch.utils import flop_counter as fc
    aten = torch.ops.aten
    if aten._scaled_dot_product_flash_attention_for_cpu in fc.flop_registry:
        return

    @fc.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
    def _forward(query_shape, key_shape, value_shape, *args, **kwargs):
        return fc.sdpa_flop_count(query_shape, key_shape, value_shape)

    @fc.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def _backward(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs):
        return fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def step_flops(step) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    _count_cpu_sdpa_flops()
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def gemm_gflops(dtype: torch.dtype, size: int, device: torch.device, rounds: int) -> float:
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    stats = measure.summary(measure.time_ms(lambda: torch.mm(a, b), device, rounds, warmup=1))
    return 2 * size ** 3 / stats["median_ms"] / 1e6


# ----------------------------------------------------------------------------- the run
def cases(smoke: bool):
    """(step name, shape, image size, batch, vitfast builder kwargs, timm model factory)"""
    vit = SMOKE_VIT if smoke else SMALL_DATA_VIT
    mae_batch, rel_batch = (8, 4) if smoke else (256, 64)
    mae = dict(mask_ratio=0.75, decoder_dim=128 if not smoke else 24, decoder_depth=2 if not smoke else 1,
               decoder_heads=4 if not smoke else 2)
    name = "small-data ViT 192x9x12h mlp2 p4" if not smoke else "smoke ViT 36x1x3h p4"
    yield ("MAE", f"B{mae_batch} 32px N64 keep 16, {name}, decoder {mae['decoder_dim']}x{mae['decoder_depth']}",
           32, mae_batch, dict(method_name="mae", stage="", vit=vit, **mae),
           lambda: TimmMAE(32, vit, mae["decoder_dim"], mae["decoder_depth"], mae["decoder_heads"], 0.75))
    for size in (32, 56):
        n = (size // vit["patch_size"]) ** 2
        yield ("RelViT upstream", f"B{rel_batch} {size}px N{n}, {name}", size, rel_batch,
               dict(method_name="relvit", stage="upstream", vit=vit, drop_path=0.0),  # timm's blocks: no drop-path
               lambda size=size: TimmRelViT(size, vit))


def run(args) -> list:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rounds, warmup = (1, 1) if args.smoke else (args.rounds, 2)
    gemm_size = 256 if args.smoke else 2048
    peaks = {"fp32": gemm_gflops(torch.float32, gemm_size, device, 3 if args.smoke else 10)}
    # Without bf16 hardware a bf16 GEMM is emulated and very slow: a small one says so in seconds.
    bf16_size = gemm_size if bf16_is_fast(device) else min(gemm_size, 512)
    peaks["bf16"] = gemm_gflops(torch.bfloat16, bf16_size, device, 3)
    rows = []
    for step_name, shape, size, batch, vitfast_kwargs, timm_model in cases(args.smoke):
        flops = {}
        variants = [("vitfast", "fp32", None, "auto"), ("vitfast", "fp32", args.compile_backend, "auto"),
                    ("vitfast", "bf16", None, "auto"), ("vitfast", "bf16", args.compile_backend, "auto"),
                    ("timm + formulas", "fp32", None, None), ("timm + formulas", "bf16", None, None),
                    ("vitfast", "fp32", None, "sdpa")]
        base = None
        for who, precision, backend, attn_impl in variants:
            label = f"{who} {precision}" + (" autocast" if who != "vitfast" and precision == "bf16" else "") + \
                (" + compile" if backend else "") + (", SDPA attention" if attn_impl == "sdpa" else "")
            row = dict(step=step_name, shape=shape, implementation=label, precision=precision,
                       gemm_peak_gflops=round(peaks[precision], 1))
            if who != "vitfast" and timm_missing():
                rows.append({**row, "skipped": timm_missing()})
                continue
            if precision == "bf16" and not bf16_is_fast(device):
                rows.append({**row, "skipped": f"no bf16 hardware on this CPU (bf16 GEMM {bf16_size}^3 measured at "
                                               f"{peaks['bf16']:.1f} GFLOP/s vs fp32 {peaks['fp32']:.1f})"})
                continue
            if who == "vitfast":
                step = vitfast_step(**vitfast_kwargs, image_size=size, batch=batch, precision=precision,
                                    compile_backend=backend, device=device, attn_impl=attn_impl)
            else:
                step = timm_step(timm_model(), size, batch, precision, backend, device)
            if backend is None:
                flops[who] = step_flops(step)
            samples = measure.time_ms(step, device, rounds, warmup=warmup + (2 if backend else 0))
            stats = measure.summary(samples)
            base = base or stats["median_ms"]
            count = flops.get(who, 0)
            rows.append({**row, **{k: round(v, 2) if isinstance(v, float) else v for k, v in stats.items()},
                         "images_per_s": round(batch / stats["median_ms"] * 1e3, 1),
                         "vs_vitfast_fp32": round(stats["median_ms"] / base, 2),
                         "peak_mib": round(measure.peak_bytes(step, device) / 2 ** 20, 1),
                         "gflop_per_step": round(count / 1e9, 2),
                         "gflops": round(count / stats["median_ms"] / 1e6, 1)})
            print(markdown(rows[-1:], header=len(rows) == 1), flush=True)
    return rows


def interleaved_rows(args) -> list:
    """fp32 vitfast, vitfast with SDPA attention and timm + formulas, one step of each per round, in alternating
    order: per implementation min and median, and the median over rounds of its time / vitfast's."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for step_name, shape, size, batch, vitfast_kwargs, timm_model in cases(args.smoke):
        steps = {"vitfast fp32": vitfast_step(**vitfast_kwargs, image_size=size, batch=batch, precision="fp32",
                                              compile_backend=None, device=device),
                 "vitfast fp32, SDPA attention": vitfast_step(**vitfast_kwargs, image_size=size, batch=batch,
                                                              precision="fp32", compile_backend=None, device=device,
                                                              attn_impl="sdpa")}
        if not timm_missing():
            steps["timm + formulas fp32"] = timm_step(timm_model(), size, batch, "fp32", None, device)
        for step in steps.values():
            measure.time_ms(step, device, 1, warmup=0 if args.smoke else 2)
        times = {name: [] for name in steps}
        for r in range(1 if args.smoke else args.rounds):
            for name in (steps if r % 2 == 0 else reversed(steps)):
                times[name] += measure.time_ms(steps[name], device, 1, warmup=0)
        base = times["vitfast fp32"]
        for name, samples in times.items():
            ratio = statistics.median(t / b for t, b in zip(samples, base))
            stats = measure.summary(samples)
            rows.append(dict(step=step_name, shape=shape, implementation=name + " (interleaved)", precision="fp32",
                             **{k: round(v, 2) if isinstance(v, float) else v for k, v in stats.items()},
                             images_per_s=round(batch / stats["median_ms"] * 1e3, 1),
                             vs_vitfast_fp32=round(ratio, 2)))
            print(markdown(rows[-1:], header=len(rows) == 1), flush=True)
    return rows


def smoke_settings(cls) -> dict:
    own = {f.name for f in dataclasses.fields(cls.Config)}
    return {**SMOKE_VIT, **{k: v for k, v in dict(decoder_dim=24, decoder_depth=1, decoder_heads=2).items() if k in own}}


PRETRAIN_STAGE = {"mae-ct": "ct"}  # the stage a multi-stage method is timed in (default: its first)


def method_rows(args) -> list:
    """One optimizer step of every method's quick preset on digits through the engine (Trainer.train_step), eager
    vs --compile: where compiling helps and where it does not."""
    import tempfile
    from vitfast.engine import Trainer
    from vitfast.methods import METHODS
    rows = []
    chosen = sorted(METHODS) if args.methods == "all" else args.methods.split(",")
    for name in chosen:
        cls = METHODS[name]
        stage = PRETRAIN_STAGE.get(name, cls.stages[0] if cls.stages else None)
        base = None
        for compiled in (False, True):
            with tempfile.TemporaryDirectory() as out:
                config = build_config(name, "quick", stage=stage, metrics="", progress=False, out=out,
                                      compile=compiled, **(smoke_settings(cls) if args.smoke else {}))
                trainer = Trainer(stage_config(config, stage) if stage else config)
                batch = next(iter(trainer.loader))
                warmup = (1 if args.smoke else 2) + (2 if compiled else 0)
                stats = measure.summary(measure.time_ms(lambda: trainer.train_step(*batch), trainer.device,
                                                        1 if args.smoke else args.rounds, warmup=warmup))
            base = base or stats["median_ms"]
            rows.append(dict(step=f"{name} quick" + (f" ({stage})" if stage else ""),
                             shape=f"B{batch[0].shape[0]} {batch[0].shape[-1]}px", precision="fp32",
                             implementation="vitfast fp32" + (" + compile" if compiled else ""),
                             **{k: round(v, 2) if isinstance(v, float) else v for k, v in stats.items()},
                             images_per_s=round(batch[0].shape[0] / stats["median_ms"] * 1e3, 1),
                             vs_vitfast_fp32=round(stats["median_ms"] / base, 2)))
            print(markdown(rows[-1:], header=len(rows) == 1), flush=True)
    return rows


def markdown(rows: list, header: bool = True) -> str:
    cells = ("step", "shape", "implementation", "median_ms", "images_per_s", "vs_vitfast_fp32", "peak_mib", "gflops",
             "gemm_peak_gflops")
    lines = ["| " + " | ".join(cells) + " |", "|" + "---|" * len(cells)] if header else []
    for row in rows:
        if row.get("skipped"):
            lines.append(f"| {row['step']} | {row['shape']} | {row['implementation']} | skipped: {row['skipped']} |")
        else:
            lines.append("| " + " | ".join(str(row.get(c, "")) for c in cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per row (after warm-up)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one round: checks that every row runs")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compile rows")
    parser.add_argument("--methods", nargs="?", const="all", default="", help="also one quick-preset step of every "
                        "method (or of these, comma-separated), eager vs compiled blocks")
    parser.add_argument("--out", default=None, help="path prefix of the .csv and .json files")
    parser.add_argument("--interleaved", action="store_true", help="only the fp32 vitfast, vitfast with SDPA "
                        "attention and timm steps, alternating round by round (--rounds rounds)")
    args = parser.parse_args(argv)
    rows = interleaved_rows(args) if args.interleaved else run(args)
    rows += method_rows(args) if args.methods else []
    stamp, machine = time.strftime("%Y-%m-%d %H:%M", time.gmtime()), describe()
    for row in rows:
        row.update(machine=machine, torch_threads=torch.get_num_threads(), date_utc=stamp)
    out = args.out or os.path.join(HERE, "results", time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-train-step")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(rows, f, indent=2)
    with open(out + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    print(f"\n{markdown(rows)}\n\nmachine: {machine}, torch threads {torch.get_num_threads()}; rows in {out}.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
