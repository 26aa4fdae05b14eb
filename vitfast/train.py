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
import traceback
from typing import Dict, List

from .checkpoint import CheckpointError
from .config import (TrainConfig, UserError, build_config, config_from_dict, parse_value, stage_config,
                     with_total_epochs)
from .data.datasets import DatasetCorruptedError, DatasetNotFoundError
from .methods import METHODS

# Mistakes in what was asked for: one line on stderr and exit code 2 (--debug adds the traceback).
USER_ERRORS = (UserError, DatasetNotFoundError, DatasetCorruptedError, CheckpointError)


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
    parser.add_argument("--method", choices=sorted(METHODS), help="training method (default: mae; the list below)")
    presets = sorted({p for cls in METHODS.values() for p in cls.presets})
    parser.add_argument("--preset", choices=presets,
                        help="quick: minutes on a laptop CPU (default); paper: the paper's recipe")
    parser.add_argument("--stage", help="multi-stage methods: run only this stage")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset",
                      help="digits (embedded, default), shapes (procedural), cifar10, cifar100, svhn, stl10, "
                           "or imagefolder:/path/to/root")
    data.add_argument("--data-root", help="where torchvision datasets live (or are downloaded to)")
    data.add_argument("--download", action="store_true", help="allow downloading the dataset into --data-root")
    data.add_argument("--image-size", type=int, help="resize the images to this side (default: the dataset's)")
    data.add_argument("--val-fraction", type=float,
                      help="share of each class of the train split held out for validation (default 0.1); 0 trains "
                           "on the whole official train split and selects nothing on val")
    optim = parser.add_argument_group("optimisation (default: the preset's value)")
    optim.add_argument("--epochs", type=int, help="training epochs; multi-stage methods: the total of their stages "
                                                  "(split as the preset splits it; a baseline stage gets the total)")
    optim.add_argument("--batch-size", type=int, help="images per optimizer step over all processes (the global "
                                                      "batch; split evenly over ranks and --accum-steps)")
    optim.add_argument("--accum-steps", type=int, help="micro-batches per optimizer step (gradient accumulation; "
                                                       "methods whose loss couples the batch refuse it)")
    optim.add_argument("--lr", type=float, help="peak learning rate (default: base_lr x global batch / 256)")
    optim.add_argument("--weight-decay", type=float)
    model = parser.add_argument_group("model (default: the preset's value)")
    model.add_argument("--model", help="ViT size: tiny, small, base, small_data")
    model.add_argument("--patch-size", type=int)
    model.add_argument("--init", help="initialise the encoder from a run folder or checkpoint (fine-tuning)")
    run = parser.add_argument_group("run")
    run.add_argument("--out", help="run folder (default: runs/<method>-<dataset>-<time>); a folder that holds a run "
                                   "is never overwritten without --overwrite")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --out from its last checkpoint; only " + ", ".join(RESUMABLE_FLAGS)
                          + " may differ from the run's config (any other flag that disagrees is an error)")
    run.add_argument("--overwrite", action="store_true",
                     help="start over in an --out that holds a run (its run files are deleted once the new run "
                          "has started)")
    run.add_argument("--precision", choices=("fp32", "bf16", "fp16"), help="mixed precision (default fp32)")
    run.add_argument("--compile", action="store_true",
                     help="torch.compile every transformer block (first steps slower while it compiles; measured "
                          "per method in the README)")
    run.add_argument("--device", help="auto (default: cuda when present), cpu, cuda, cuda:1")
    run.add_argument("--seed", type=int)
    run.add_argument("--max-steps", type=int, help="stop after this many steps, with a checkpoint")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="any other config field, e.g. --set warmup_epochs=5 --set metrics=knn")
    run.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    run.add_argument("--debug", action="store_true", help="show the traceback of user errors too")
    own = parser.add_argument_group("method settings (default: the preset's value; also --set KEY=VALUE)")
    for name, text in _settings().items():
        own.add_argument("--" + name.replace("_", "-"), type=parse_value, metavar="VALUE", help=text)
    return parser


# Flags a resumed run may change: how far to go, where it runs and how it shows progress.
RESUMABLE_FLAGS = ("--epochs", "--max-steps", "--device", "--no-progress", "--stage")
_RESUMABLE_KEYS = ("epochs", "max_steps", "device", "progress", "stage")


def _overrides(args: argparse.Namespace) -> Dict:
    """The values the user gave (None = not given), flat keys, --set included."""
    overrides = {
        "stage": args.stage, "dataset": args.dataset, "data_root": args.data_root, "download": args.download or None,
        "image_size": args.image_size, "val_fraction": args.val_fraction, "accum_steps": args.accum_steps,
        "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.weight_decay,
        "model": args.model, "patch_size": args.patch_size, "init": args.init,
        "out": args.out, "precision": args.precision, "compile": args.compile or None, "device": args.device,
        "seed": args.seed, "max_steps": args.max_steps, "progress": False if args.no_progress else None,
        **{name: getattr(args, name) for name in _settings()},
    }
    for item in args.set:
        if "=" not in item:
            raise UserError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        overrides[key.strip()] = parse_value(value)
    return overrides


def _resume_config(args: argparse.Namespace, overrides: Dict) -> TrainConfig:
    """The stored config of the run in --out, with the few values a resume may change; any other flag that
    disagrees with the run is an error naming it."""
    if not args.out:
        raise UserError("--resume needs --out RUN_DIR (the run to continue)")
    stored = os.path.join(args.out, "config.json")
    if not os.path.isfile(stored):
        raise UserError(f"--resume: {stored} not found; is {args.out} a vitfast run folder?")
    with open(stored) as f:
        config = config_from_dict(json.load(f), source=stored)
    method = METHODS.get(config.method)
    if not method.stages or config.stage:
        checkpoint = os.path.join(args.out, "checkpoint-last.pt")
        if not os.path.isfile(checkpoint):
            raise UserError(f"--resume: {args.out} has config.json but no checkpoint-last.pt (the run stopped before "
                            f"its first checkpoint); start it again with --overwrite")
    given = {k: v for k, v in overrides.items() if v is not None and k not in _RESUMABLE_KEYS + ("out",)}
    given.update({k: v for k, v in (("method", args.method), ("preset", args.preset)) if v is not None})
    stored_values = {**config.flat(), "method": config.method}
    for key, value in given.items():
        if key not in stored_values:
            raise UserError(f"--resume: {key} is not a setting of the run's method {config.method!r}")
        if _normalised(value) != _normalised(stored_values[key]):
            raise UserError(f"--resume: {key} = {value!r} conflicts with the run's {key} = {stored_values[key]!r} "
                            f"({stored}); only {', '.join(RESUMABLE_FLAGS)} may change on resume")
    changes = {k: overrides[k] for k in _RESUMABLE_KEYS if overrides.get(k) is not None}
    if "epochs" in changes:  # a multi-stage run rescales its stages, as a new run would
        config = with_total_epochs(config, changes.pop("epochs"))
    return config.replace(**{"max_steps": None, **changes}, resume=True, out=args.out)


def _normalised(value):
    return list(value) if isinstance(value, tuple) else value


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    overrides = _overrides(args)
    if args.resume:
        if args.overwrite:
            raise UserError("--resume continues the run in --out and --overwrite starts it over: pass one of them")
        return _resume_config(args, overrides)
    return build_config(args.method or "mae", args.preset or "quick", **overrides)


def _report_user_error(error: BaseException, debug: bool) -> int:
    if debug:
        traceback.print_exception(error)
    message = " ".join(str(error).split()) or type(error).__name__  # one line, whatever the message held
    print(f"train.py: error: {message}", file=sys.stderr, flush=True)
    return 2


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
        if args.print_config:  # with --stage: the values that stage runs with
            print((stage_config(config, config.stage) if config.stage else config).to_json())
            return 0
        from .engine import Interrupted, run  # torch and the data stack load only when training
        try:
            run(config, overwrite=args.overwrite)
        except Interrupted as stop:
            if os.path.isfile(os.path.join(stop.out, "config.json")):
                print(f"interrupted at step {stop.step}; resume with: python train.py --resume --out {stop.out}",
                      file=sys.stderr, flush=True)
            else:
                print("interrupted before the first checkpoint; nothing was kept", file=sys.stderr, flush=True)
            return 128 + stop.signal
    except USER_ERRORS as error:
        return _report_user_error(error, args.debug)
    return 0


if __name__ == "__main__":
    sys.exit(main())
