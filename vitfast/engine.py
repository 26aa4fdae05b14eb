"""The shared training engine: one loop for every method.

It owns the device, the data, the optimizer and its schedule, mixed precision, DDP, the run folder
(config, metrics CSV, atomic checkpoints with exact resume, summary JSON, plots) and the final
evaluation. A method (vitfast.methods) only defines its model, views and loss.

Run folder:
    config.json          the resolved configuration
    metrics.csv          one row per epoch
    checkpoint-last.pt   model, optimizer, scaler, step, data position, every RNG state (atomic write)
    summary.json         final metrics (and the random-init baseline for self-supervised methods)
    loss.png, accuracy.png
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from typing import Dict, List, Optional

import torch
from torch.nn.parallel import DistributedDataParallel

from . import checkpoint as ckpt
from .config import TrainConfig, UserError, stage_config
from .data import augment, load_splits
from .data.loader import BatchLoader
from .distributed import DistInfo, barrier, init_distributed, mean_over_ranks, shutdown
from .machine import cpu_bf16_hardware, cpu_model
from .methods import DataInfo, Method, get_method
from .nn.vit import Block

CHECKPOINT = "checkpoint-last.pt"
FORMAT = 2  # 2: the method's encoder_state_dict() under "encoder" (format 1 had none; checkpoint.py reads both)
RUN_FILES = ("config.json", CHECKPOINT, "summary.json", "metrics.csv")  # a folder with one of these holds a run
PLOTS = ("loss.png", "accuracy.png")


class Interrupted(Exception):
    """SIGINT / SIGTERM stopped the run; the checkpoint of step ``step`` in ``out`` continues it."""

    def __init__(self, signal_number: int, step: int, out: str):
        super().__init__(f"interrupted by signal {signal_number} at step {step}")
        self.signal, self.step, self.out = signal_number, step, out


def default_run_dir(config: TrainConfig) -> str:
    dataset = config.dataset.replace(":", "_").replace("/", "_")
    base = os.path.join("runs", f"{config.method}-{dataset}-{time.strftime('%Y%m%d-%H%M%S')}")
    path, n = base, 1
    while os.path.exists(path):  # two runs started in the same second
        path, n = f"{base}-{n}", n + 1
    return path


def _run_file_in(folder: str) -> Optional[str]:
    """The first run file in ``folder`` or one of its stage subfolders (None: it holds no run)."""
    if not os.path.isdir(folder):
        return None
    subfolders = [os.path.join(folder, entry) for entry in sorted(os.listdir(folder))]
    for where in [folder] + [sub for sub in subfolders if os.path.isdir(sub)]:
        for name in RUN_FILES:
            if os.path.isfile(os.path.join(where, name)):
                return os.path.join(where, name)
    return None


def _clear_run(folder: str) -> None:
    """--overwrite: delete the run files of ``folder`` and of its stage subfolders (nothing else)."""
    subfolders = [os.path.join(folder, e) for e in sorted(os.listdir(folder))] if os.path.isdir(folder) else []
    for where in [folder] + [d for d in subfolders if os.path.isdir(d) and _run_file_in(d)]:
        for name in RUN_FILES + PLOTS:
            if os.path.isfile(os.path.join(where, name)):
                os.remove(os.path.join(where, name))
        if where != folder and not os.listdir(where):
            os.rmdir(where)


def run(config: TrainConfig, overwrite: bool = False) -> Dict:
    """Train a method: one Trainer, or for multi-stage methods one per stage in ``<out>/<stage>``.

    A stage listed in the method's ``stage_init`` starts from the encoder of that earlier stage; ``--init``
    applies to the first stage only (a baseline stage such as RelViT's ``scratch`` always starts from
    random weights). With ``resume``, finished stages (summary.json present) are skipped and an
    interrupted one continues.

    Run folders are never overwritten: an ``out`` that holds a run is refused unless ``resume`` (continue it) or
    ``overwrite`` (its run files are deleted once the new run has set up: data, device and model). Nothing is
    written before that setup succeeds, so a run that fails to start leaves no folder behind.
    """
    method = get_method(config.method)
    out = config.out or default_run_dir(config)
    config = dataclasses.replace(config, out=out)
    existing = _run_file_in(out)
    if existing and not config.resume and not overwrite:
        raise UserError(f"{out} already holds a run ({os.path.basename(existing)}); continue it with --resume, "
                        f"choose another --out, or start over with --overwrite")
    clear = (lambda: _clear_run(out)) if existing and overwrite else (lambda: None)
    try:
        return _run_stages(config, method, clear)
    except Interrupted as stop:
        raise Interrupted(stop.signal, stop.step, out) from None  # resume the whole run, not one stage


def _run_stages(config: TrainConfig, method, clear) -> Dict:
    if config.stage:  # one stage, in --out itself; its init defaults to the sibling folder of its source stage
        source = method.stage_init.get(config.stage)
        init = config.init
        if source and not init:
            init = os.path.join(os.path.dirname(os.path.abspath(config.out)), source)
            if not os.path.isfile(os.path.join(init, CHECKPOINT)):
                raise UserError(f"stage {config.stage} starts from the {source} stage: pass --init RUN_DIR "
                                f"(looked for {init})")
        trainer = Trainer(stage_config(config, config.stage, init=init, resume=config.resume))
        clear()
        return trainer.fit()
    if not method.stages:
        trainer = Trainer(config)
        clear()
        return trainer.fit()
    root = config.out
    for stage in method.stages:  # every stage's values are valid before anything starts
        stage_config(config, stage)
    is_main = int(os.environ.get("RANK", "0")) == 0
    summaries = {}
    for stage in method.stages:
        out = os.path.join(root, stage)
        done = os.path.join(out, "summary.json")
        if config.resume and os.path.isfile(done):
            with open(done) as f:
                summaries[stage] = json.load(f)
            continue
        source = method.stage_init.get(stage)
        init = os.path.join(root, source) if source else (config.init if stage == method.stages[0] else None)
        resume = config.resume and os.path.isfile(os.path.join(out, CHECKPOINT))
        trainer = Trainer(stage_config(config, stage, stage=stage, out=out, init=init, resume=resume))
        if not config.resume and is_main and not os.path.isfile(os.path.join(root, "config.json")):
            clear()  # the first stage has set up: now the folder may change
            os.makedirs(root, exist_ok=True)
            with open(os.path.join(root, "config.json"), "w") as f:
                f.write(config.to_json())
        summaries[stage] = trainer.fit()
        if "stopped_at_step" in summaries[stage]:
            return summaries[stage]
    summary = {"method": config.method, "dataset": config.dataset, "run_dir": root, "stages": summaries}
    if is_main:
        with open(os.path.join(root, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2, default=float)
        lines = [f"  {stage}: " + ", ".join(f"{k}={v:.4f}" for k, v in s.items() if k.endswith("accuracy")
                                             and isinstance(v, float)) for stage, s in summaries.items()]
        print("[vitfast] stages:\n" + "\n".join(lines), flush=True)
    return summary


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for, but no CUDA GPU is visible (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    return device


def _progress(iterable, enabled: bool, **kwargs):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, **kwargs)


def plot_series(history: List[Dict]) -> Dict[str, List[str]]:
    """The curves of a run's plots: every logged metric named ``loss`` / ``*_loss`` (loss.png) and ``accuracy`` /
    ``*_accuracy`` (accuracy.png: train accuracy, k-NN when evaluated, a stage's extra task accuracies)."""
    logged = [k for row in history for k in row]
    logged = sorted(set(logged), key=logged.index)
    series = {name: [k for k in logged if k == name or k.endswith("_" + name)] for name in ("loss", "accuracy")}
    return {name: keys for name, keys in series.items() if keys}


class Trainer:
    def __init__(self, config: TrainConfig):
        self.config = c = config
        self.device = resolve_device(c.device)
        self.dist: DistInfo = init_distributed(self.device.type)
        if self.device.type == "cuda" and self.dist.enabled:
            self.device = torch.device("cuda", self.dist.local_rank)
        if c.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {c.precision!r}")
        self.out = c.out or default_run_dir(c)
        self.splits = load_splits(c.dataset, root=c.data_root, download=c.download, seed=c.seed,
                                  image_size=c.image_size, val_fraction=c.val_fraction)
        train = self.splits["train"]
        self.data_info = DataInfo(channels=train.images.shape[1], image_size=train.images.shape[-1],
                                  num_classes=train.num_classes, mean=tuple(train.mean), std=tuple(train.std))
        if str(self.data_info.image_size) in c.patch_size_by_image_size:  # the recipe's patch for this image side
            self.config = c = c.replace(patch_size=c.patch_size_by_image_size[str(self.data_info.image_size)])
        self._check_model_fits_data()
        method = get_method(c.method)
        torch.manual_seed(c.seed)  # identical initial weights on every rank
        self.method = method(c, self.data_info).to(self.device)
        self.rank_batch = self._rank_batch(self.method)  # the method (or its stage) says whether it accumulates
        if c.compile:  # block by block: the methods' augmentation and fused ops stay outside the compiled graphs
            for block in (m for m in self.method.modules() if isinstance(m, Block)):
                block.compile()
        if c.init:
            self._load_init(c.init)
        self.model = (DistributedDataParallel(self.method, device_ids=[self.device.index] if self.device.type == "cuda"
                                              else None) if self.dist.enabled else self.method)
        self.loader = BatchLoader(train, self.rank_batch, shuffle=True, drop_last=True, seed=c.seed, device=self.device,
                                  repeats=getattr(c.method_config, "repeated_augmentation", 1),
                                  rank=self.dist.rank, world_size=self.dist.world_size)
        self.generator = torch.Generator(self.device).manual_seed(c.seed * 1_000_003 + self.dist.rank)
        self.peak_lr = c.lr if c.lr is not None else c.base_lr * c.batch_size / 256  # batch_size is global
        # fused: one kernel over all parameters (CPU and CUDA). On the 2-core EPYC the default per-parameter loop took
        # 17.7 ms per optimizer step for MAE's B256 model (144 tensors, 3.1 M values), the fused step 4.0 ms; the MAE
        # quick preset's whole step went from 56.4 to 51.7 ms (interleaved). Same update rule and state dict keys, so
        # checkpoints of either resume.
        self.optimizer = torch.optim.AdamW(self.method.param_groups(), lr=self.peak_lr, betas=tuple(c.betas),
                                           fused=self.device.type in ("cpu", "cuda"))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=c.precision == "fp16")
        self.steps_per_epoch = len(self.loader)
        self.method.steps_per_epoch = self.steps_per_epoch  # for the method's per-epoch schedules
        self.total_steps = c.epochs * self.steps_per_epoch
        self.step = 0
        self.history: List[Dict] = []
        self.baseline: Dict = {}
        self.epoch_sums: Dict[str, float] = {}  # running metric sums of the current epoch (saved: exact resume)
        self.epoch_count = 0
        self.epoch_seconds = 0.0
        self.eval_transform = augment.eval_transform(self.data_info.image_size, self.data_info.mean, self.data_info.std)
        # Progress bars on a terminal only; a log file gets one line per epoch.
        self.show_progress = c.progress and self.dist.is_main and sys.stderr.isatty()
        self.stop_signal: Optional[int] = None
        self._in_loop = False
        self._warn_about_settings(len(train))

    def _rank_batch(self, method: "Method") -> int:
        """Images per rank per optimizer step: the global batch split over ranks (and then over accum_steps
        micro-batches); a split that is not exact, or accumulation in a method whose loss couples the batch, is a
        one-line error."""
        c, world = self.config, self.dist.world_size
        if c.accum_steps > 1 and not method.accumulates:
            raise UserError(f"{c.method}'s loss depends on the whole batch (in-batch negatives, BatchNorm or a "
                            f"batch statistic): --accum-steps {c.accum_steps} would change it, not just split it; "
                            f"use a smaller --batch-size instead")
        if c.batch_size % (world * c.accum_steps):
            raise UserError(f"batch_size {c.batch_size} (the global batch) must be divisible by the number of "
                            f"processes ({world}) x accum_steps ({c.accum_steps})")
        return c.batch_size // world

    def _check_model_fits_data(self) -> None:
        from .nn.vit import vit_config  # noqa: PLC0415
        c, size = self.config, self.data_info.image_size
        table = vit_config(c.model)
        patch = c.patch_size or table["patch_size"]
        if size % patch:
            raise UserError(f"patch_size {patch} does not divide the image size {size} ({c.dataset}"
                            f"{', --image-size' if c.image_size else ''}); choose a divisor of {size}")
        dim, heads = c.embed_dim or table["embed_dim"], c.num_heads or table["num_heads"]
        if dim % heads:
            raise UserError(f"embed_dim {dim} is not divisible by num_heads {heads}")

    def _warn_about_settings(self, train_images: int) -> None:
        c = self.config
        if c.warmup_epochs >= c.epochs:
            self._log(f"warning: the warm-up ({c.warmup_epochs:g} epochs) is as long as the run ({c.epochs} epochs): "
                      f"the learning rate never decays")
        if c.precision == "bf16" and self.device.type == "cpu" and cpu_bf16_hardware() is None:
            self._log(f"warning: --precision bf16 on a CPU without bf16 instructions ({cpu_model()}: no AVX-512 BF16 or "
                      f"AMX) is emulated and slow (measured on a 2-core AMD EPYC with AVX2: bf16 matmuls at 1.3 GFLOP/s, "
                      f"fp32 at 100); use fp32 on this machine")
        if c.precision == "fp16" and self.device.type == "cpu":
            self._log("warning: --precision fp16 on CPU is slow (measured ~7x slower than fp32 on this project's "
                      "machines); use fp32 or bf16")
        dropped = train_images - self.steps_per_epoch * c.batch_size
        if dropped * 4 > train_images:
            self._log(f"warning: batch_size {c.batch_size} leaves {dropped} of {train_images} training images out of "
                      f"every epoch (only full batches are used)")

    # ----------------------------------------------------------------------------- schedule
    def lr_at(self, step: int) -> float:
        """Per step: a linear warm-up, then ``lr_schedule``: "cosine" decays to min_lr over the steps after the
        warm-up; "quarter-cosine" (RelViT's release) is lr - (lr - min_lr)(1 - cos(pi/2 * step / total_steps)),
        with the step counted from the start of the run."""
        c = self.config
        warmup = c.warmup_epochs * self.steps_per_epoch
        if step < warmup:
            return self.peak_lr * (step + 1) / warmup
        if c.lr_schedule == "quarter-cosine":
            return self.peak_lr - (self.peak_lr - c.min_lr) * (1 - math.cos(0.5 * math.pi * step / self.total_steps))
        progress = (step - warmup) / max(1, self.total_steps - warmup)
        return c.min_lr + (self.peak_lr - c.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    # ----------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> Dict:
        return {
            "format": FORMAT, "config": self.config.to_dict(), "method": self.method.state_dict(),
            "encoder": self.method.encoder_state_dict(),  # shares storage with "method": saved once
            "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(), "step": self.step,
            "loader": self.loader.state_dict(), "rng": ckpt.rng_state({"augment": self.generator}),
            "history": self.history, "baseline": self.baseline,
            "epoch_progress": {"sums": self.epoch_sums, "count": self.epoch_count, "seconds": self.epoch_seconds},
        }

    def save_checkpoint(self) -> None:
        if self.dist.is_main:
            ckpt.atomic_save(self.state_dict(), os.path.join(self.out, CHECKPOINT))

    def load_checkpoint(self, path: str) -> None:
        state = ckpt.load(path, map_location=self.device, newest_format=FORMAT)
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        self.loader.load_state_dict(state["loader"])
        ckpt.set_rng_state(state["rng"], {"augment": self.generator})
        self.history, self.baseline = state["history"], state["baseline"]
        progress = state["epoch_progress"]
        self.epoch_sums, self.epoch_count, self.epoch_seconds = progress["sums"], progress["count"], progress["seconds"]

    def _load_init(self, path: str) -> None:
        """Initialise the encoder from another run (fine-tuning): a run folder or a checkpoint file."""
        if os.path.isdir(path):
            path = os.path.join(path, CHECKPOINT)
        self.init_report = self.method.init_from(ckpt.load(path, newest_format=FORMAT), source=path)

    # ----------------------------------------------------------------------------- loop
    def autocast(self):
        if self.config.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.config.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def train_step(self, images, labels, indices) -> Dict[str, float]:
        lr = self.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # a method's group may scale it (layer-wise decay)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        parts = self.config.accum_steps
        total, sums = 0.0, {}
        for i, (x, y, ids) in enumerate(zip(images.chunk(parts), labels.chunk(parts), indices.chunk(parts))):
            # DDP all-reduces the gradients on the last micro-batch only.
            last = i == parts - 1
            sync = self.model.no_sync() if self.dist.enabled and not last else contextlib.nullcontext()
            with sync:
                with self.autocast():
                    loss, metrics = self.model(x, y, ids, self.generator)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss.item()} at step {self.step}; last checkpoint: "
                                             f"{os.path.join(self.out, CHECKPOINT)} (try a lower --lr or --precision "
                                             f"fp32)")
                self.scaler.scale(loss / parts).backward()  # the mean over the micro-batches: the batch's mean
            total += loss.item() / parts
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v / parts
        if self.config.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.method.parameters(), self.config.grad_clip)
        self.method.before_optimizer_step(self.optimizer, self.step, self.total_steps)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        self.method.after_step(self.step, self.total_steps)
        return {"loss": total, "lr": lr, **sums}

    def fit(self) -> Dict:
        """Train to the end (or --max-steps), evaluate, write the summary. SIGINT / SIGTERM stop the loop after the
        current step with a checkpoint (Interrupted); outside the loop (k-NN baseline, final evaluation) they stop
        at once, and the last checkpoint stands. A run stopped before its first checkpoint leaves no folder."""
        path = os.path.join(self.out, CHECKPOINT)
        with self._stop_requests():
            try:
                return self._fit(path)
            except Interrupted:
                if not self.config.resume and not os.path.isfile(path) and self.dist.is_main:
                    _clear_run(self.out)
                    with contextlib.suppress(OSError):
                        os.rmdir(self.out)  # only if nothing else is in it
                raise

    @contextlib.contextmanager
    def _stop_requests(self):
        """Route SIGINT / SIGTERM to this run while it trains (main thread only); the previous handlers return after,
        and a second signal acts as it would have without us."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {}

        def request_stop(number, frame):
            signal.signal(number, previous[number])
            if not self._in_loop:
                raise Interrupted(number, self.step, self.out)
            self.stop_signal = number
            self._log(f"stopping after step {self.step + 1} with a checkpoint (again to stop at once)")

        for number in (signal.SIGINT, signal.SIGTERM):
            previous[number] = signal.signal(number, request_stop)
        try:
            yield
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)

    def _stop_requested(self) -> Optional[int]:
        """The signal that asked to stop, on any rank (every rank stops at the same step)."""
        number = self.stop_signal or 0
        if self.dist.enabled:
            flag = torch.tensor([number], device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            number = int(flag.item())
        return number or None

    def _fit(self, path: str) -> Dict:
        c = self.config
        if c.resume:
            self.load_checkpoint(path)
            self._log(f"resumed {path} at step {self.step} (epoch {self.loader.epoch}, batch {self.loader.batch})")
        else:
            if self.dist.is_main:
                os.makedirs(self.out, exist_ok=True)
                with open(os.path.join(self.out, "config.json"), "w") as f:
                    f.write(c.to_json())
            self.baseline = self._baseline_metrics()
        stopped, interrupted = False, None
        while self.loader.epoch < c.epochs and not stopped:
            epoch = self.loader.epoch
            started = time.perf_counter()
            batches = _progress(self.loader, self.show_progress, desc=f"epoch {epoch + 1}/{c.epochs}",
                                total=len(self.loader), initial=self.loader.batch, leave=False)
            self._in_loop = True
            for images, labels, indices in batches:
                metrics = self.train_step(images, labels, indices)
                for k, v in metrics.items():
                    self.epoch_sums[k] = self.epoch_sums.get(k, 0.0) + v
                self.epoch_count += 1
                if hasattr(batches, "set_postfix"):
                    batches.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
                interrupted = self._stop_requested()
                if interrupted or (c.max_steps is not None and self.step >= c.max_steps):
                    stopped = True
                    break
                if c.checkpoint_every and self.step % c.checkpoint_every == 0:
                    self.save_checkpoint()
            self._in_loop = False
            self.epoch_seconds += time.perf_counter() - started
            if stopped and self.loader.epoch == epoch:
                break  # mid-epoch stop: the checkpoint below resumes at the next batch
            self._end_epoch(epoch)
        self.save_checkpoint()
        barrier(self.dist)
        if interrupted:
            raise Interrupted(interrupted, self.step, self.out)
        if stopped:
            self._log(f"stopped at step {self.step} (--max-steps); resume with --resume --out {self.out}")
            return {"stopped_at_step": self.step}
        summary = self._final_evaluation()
        shutdown(self.dist)
        return summary

    def _end_epoch(self, epoch: int) -> None:
        count, seconds = max(1, self.epoch_count), self.epoch_seconds
        row = mean_over_ranks({k: v / count for k, v in self.epoch_sums.items()}, self.dist)
        row = {"epoch": epoch + 1, "step": self.step, **row, "seconds": seconds,
               "images_per_second": self.epoch_count * self.config.batch_size / max(seconds, 1e-9)}
        self.epoch_sums, self.epoch_count, self.epoch_seconds = {}, 0, 0.0
        if self.dist.is_main:
            row.update(self.method.epoch_metrics(self.splits, self.eval_transform, self.device))
        if self.config.eval_every and (epoch + 1) % self.config.eval_every == 0 and self.dist.is_main:
            row["knn_accuracy"] = self._knn()
        self.history.append(row)
        self.save_checkpoint()
        if self.dist.is_main:
            self._write_metrics()
            self._log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))

    # ----------------------------------------------------------------------------- evaluation
    def _knn(self) -> float:
        from .eval import evaluate_representation
        result = evaluate_representation(self.method.features, self.splits, transform=self.eval_transform,
                                         device=self.device, knn_k=self.config.knn_k, which=("knn",))
        return result["knn_accuracy"]

    def _baseline_metrics(self) -> Dict:
        """The run's representation metrics (k-NN, linear probe, clustering: those configured) of the encoder at its
        random initialisation, the yardstick of a self-supervised method: ``random_init`` holds them all, and
        ``random_init_knn_accuracy`` the k-NN accuracy, printed beside the trained encoder's."""
        if not self.method.random_init_baseline or not self.dist.is_main or not self._metrics():
            return {}
        from .eval import evaluate_representation
        self.method.eval()
        result = evaluate_representation(self.method.features, self.splits, transform=self.eval_transform,
                                         device=self.device, knn_k=self.config.knn_k,
                                         probe_epochs=self.config.probe_epochs, progress=self.show_progress,
                                         which=self._metrics())
        if isinstance(result.get("linear_probe"), dict):
            result["linear_probe"].pop("history", None)
        baseline = {"random_init": result}
        if "knn_accuracy" in result:
            baseline["random_init_knn_accuracy"] = result["knn_accuracy"]
        return baseline

    def _metrics(self):
        return tuple(m.strip() for m in self.config.metrics.split(",") if m.strip())

    def _final_evaluation(self) -> Dict:
        summary = {"method": self.config.method, "dataset": self.config.dataset, "preset": self.config.preset,
                   "steps": self.step, "epochs": self.config.epochs, "run_dir": self.out, **self.baseline}
        if self.history:
            summary["final_train_loss"] = self.history[-1]["loss"]
            summary["train_seconds"] = sum(r["seconds"] for r in self.history)
        if self.dist.is_main:
            self.method.eval()
            summary.update(self.method.evaluate(self.splits, self.eval_transform, self.device, self.show_progress))
            if self._metrics():
                from .eval import evaluate_representation
                summary.update(evaluate_representation(
                    self.method.features, self.splits, transform=self.eval_transform, device=self.device,
                    knn_k=self.config.knn_k, probe_epochs=self.config.probe_epochs, progress=self.show_progress,
                    which=self._metrics()))
            probe = summary.get("linear_probe")
            if isinstance(probe, dict):
                probe.pop("history", None)  # per-lr curves: too long for a summary
            with open(os.path.join(self.out, "summary.json"), "w") as f:
                json.dump(summary, f, indent=2, default=float)
            self._plot()
            self._log("final evaluation:\n" + json.dumps(summary, indent=2, default=float))
        return summary

    # ----------------------------------------------------------------------------- outputs
    def _write_metrics(self) -> None:
        columns: List[str] = []
        for row in self.history:
            columns += [k for k in row if k not in columns]
        tmp = os.path.join(self.out, ".metrics.csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.history)
        os.replace(tmp, os.path.join(self.out, "metrics.csv"))

    def _plot(self) -> None:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            self._log("matplotlib is not installed: no plots")
            return
        for name, present in plot_series(self.history).items():
            fig, ax = plt.subplots(figsize=(6, 4))
            for key in present:
                points = [(r["epoch"], r[key]) for r in self.history if key in r]
                ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, label=key)
            ax.set_xlabel("epoch")
            ax.set_ylabel(name)
            stage = f", stage {self.config.stage}" if self.config.stage else ""
            ax.set_title(f"{self.config.method}{stage} on {self.config.dataset}")
            ax.legend()
            ax.grid(alpha=0.3)
            fig.tight_layout()
            fig.savefig(os.path.join(self.out, f"{name}.png"), dpi=100)
            plt.close(fig)

    def _log(self, message: str) -> None:
        if self.dist.is_main:
            print(f"[vitfast] {message}", flush=True)
