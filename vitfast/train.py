"""The training command.

    python train.py --method mae                      # quick preset on the embedded digits data
    python train.py --method supervised --dataset cifar10 --data-root ~/data --download --preset paper
    torchrun --nproc_per_node=2 train.py --method mae # data-parallel (NCCL on GPU, gloo on CPU)
    python train.py --method mae --out runs/x --resume # continue an interrupted run exactly

Every run writes a folder (--out, default runs/<method>-<dataset>-<time>) with config.json,
metrics.csv, checkpoint-last.pt, summary.json and PNG curves.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Dict, List

from .config import TrainConfig, build_config, config_from_dict, parse_value
from .methods import METHODS


def _method_help() -> str:
    lines = []
    for name, cls in sorted(METHODS.items()):
        about = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        extra = f" (stages: {', '.join(cls.stages)})" if cls.stages else ""
        lines.append(f"{name:12s}{about}{extra}")
    return "\n  ".join(lines)


def _settings() -> Dict[str, str]:
    """Every method setting: name -> its help text (per method where the methods differ)."""
    found: Dict[str, Dict[str, List[str]]] = {}
    for name, cls in sorted(METHODS.items()):
        for f in dataclasses.fields(cls.Config):
            text = f"{f.metadata.get('help', '')} (default {f.default})"
            found.setdefault(f.name, {}).setdefault(text, []).append(name)
    return {setting: "; ".join(f"{', '.join(methods)}: {text}" for text, methods in texts.items())
            for setting, texts in found.items()}


def build_parser() -> argparse.ArgumentParser:
    from .data.datasets import dataset_help
    parser = argparse.ArgumentParser(
        prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="methods:\n  " + _method_help() + "\n\ndatasets:\n  " + dataset_help().replace("\n", "\n  "))
    parser.add_argument("--method", default="mae", choices=sorted(METHODS),
                        help="training method (default: mae; the list below)")
    presets = sorted({p for cls in METHODS.values() for p in cls.presets})
    parser.add_argument("--preset", default="quick", choices=presets,
                        help="quick: minutes on a laptop CPU (default); paper: the paper's recipe")
    parser.add_argument("--stage", help="multi-stage methods: run only this stage")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default="digits",
                      help="digits (embedded, default), shapes (procedural), cifar10, cifar100, svhn, stl10, "
                           "or imagefolder:/path/to/root")
    data.add_argument("--data-root", help="where torchvision datasets live (or are downloaded to)")
    data.add_argument("--download", action="store_true", help="allow downloading the dataset into --data-root")
    data.add_argument("--image-size", type=int, help="resize the images to this side (default: the dataset's)")
    optim = parser.add_argument_group("optimisation (default: the preset's value)")
    optim.add_argument("--epochs", type=int)
    optim.add_argument("--batch-size", type=int, help="images per process")
    optim.add_argument("--lr", type=float, help="peak learning rate (default: base_lr x global batch / 256)")
    optim.add_argument("--weight-decay", type=float)
    model = parser.add_argument_group("model (default: the preset's value)")
    model.add_argument("--model", help="ViT size: tiny, small, base, small_data")
    model.add_argument("--patch-size", type=int)
    model.add_argument("--init", help="initialise the encoder from a run folder or checkpoint (fine-tuning)")
    run = parser.add_argument_group("run")
    run.add_argument("--out", help="run folder (default: runs/<method>-<dataset>-<time>)")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    run.add_argument("--precision", choices=("fp32", "bf16", "fp16"), help="mixed precision (default fp32)")
    run.add_argument("--device", help="auto (default: cuda when present), cpu, cuda, cuda:1")
    run.add_argument("--seed", type=int)
    run.add_argument("--max-steps", type=int, help="stop after this many steps, with a checkpoint")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="any other config field, e.g. --set warmup_epochs=5 --set metrics=knn")
    run.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    own = parser.add_argument_group("method settings (default: the preset's value; also --set KEY=VALUE)")
    for name, text in _settings().items():
        own.add_argument("--" + name.replace("_", "-"), type=parse_value, metavar="VALUE", help=text)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    overrides = {
        "stage": args.stage, "dataset": args.dataset, "data_root": args.data_root, "download": args.download or None,
        "image_size": args.image_size,
        "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.weight_decay,
        "model": args.model, "patch_size": args.patch_size, "init": args.init,
        "out": args.out, "resume": args.resume or None, "precision": args.precision, "device": args.device,
        "seed": args.seed, "max_steps": args.max_steps, "progress": False if args.no_progress else None,
        **{name: getattr(args, name) for name in _settings()},
    }
    for item in args.set:
        if "=" not in item:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        overrides[key.strip()] = parse_value(value)
    if args.resume:
        if not args.out:
            raise SystemExit("--resume needs --out RUN_DIR (the run to continue)")
        stored = os.path.join(args.out, "config.json")
        if not os.path.isfile(stored):
            raise SystemExit(f"--resume: {stored} not found; is {args.out} a vitfast run folder?")
        with open(stored) as f:
            saved = json.load(f)
        try:
            config = config_from_dict(saved, source=stored)
        except ValueError as error:
            raise SystemExit(f"--resume: {error}")
        # The stored run defines the config; only how far to go, where the folder now is and how to show it change.
        changeable = ("epochs", "progress", "device", "resume", "stage")
        changes = {k: overrides[k] for k in changeable if overrides.get(k) is not None}
        return config.replace(**changes, max_steps=overrides.get("max_steps"), out=args.out)
    try:
        return build_config(args.method, args.preset, **overrides)
    except ValueError as error:
        raise SystemExit(str(error))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    if args.print_config:
        print(config.to_json())
        return 0
    from .engine import run  # torch and the data stack load only when training
    run(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
