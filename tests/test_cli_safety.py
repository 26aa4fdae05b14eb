"""train.py as a user meets it: run folders are never overwritten, every mistake is one line with exit code 2,
Ctrl-C / SIGTERM keep a checkpoint that resumes exactly, --resume refuses flags that disagree with the run, and the
warnings a user needs are printed.

Most cases call train.py's main() in this process (the ``train`` fixture: its stdout and stderr at the file-descriptor
level, its exit code, a traceback for any other exception, and the warnings Python would print), which spares ~5 s of
Python + torch start-up per call. The real command (``train_command``, a subprocess) runs where only a process can
show it: Ctrl-C / SIGTERM, the resume of the interrupted run and its uninterrupted twin, and a failed download (offline
through a dead proxy; also the case that shows the real command's one-line error, exit code 2 and no folder left).
Cost: ~50 s on 2 loaded cores, most of it the 6 subprocesses.
"""
import hashlib
import os
import signal
import subprocess
import sys
import time
import traceback
import warnings

import pytest
import torch

from vitfast.train import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train.py")
# A model small enough that an epoch on digits (22 steps) takes a fraction of a second.
TINY = ["--method", "supervised", "--no-progress", "--set", "embed_dim=16", "--set", "depth=1", "--set", "num_heads=2",
        "--set", "metrics=", "--set", "warmup_epochs=1"]
# Categories a Python process does not print by default (its default warning filters).
_SILENT = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


def train_command(*args, cwd, timeout=300):
    """The real command: ``python train.py ARGS`` in a subprocess."""
    return subprocess.run([sys.executable, TRAIN, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def train(capfd, monkeypatch):
    """``train(*args, cwd=...)``: train.py's main(args) run in this process from the folder cwd, as a
    CompletedProcess: the exit code (SystemExit's too), what it wrote on stdout / stderr (file descriptors 1 and 2,
    so C++ and tqdm output count), a traceback and code 1 for any other exception as Python prints it, and the
    warnings it raised as Python would print them (pytest would otherwise keep them off stderr)."""
    def run(*args, cwd):
        monkeypatch.chdir(cwd)
        capfd.readouterr()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                code = main(list(args))
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
                if isinstance(stop.code, str):
                    print(stop.code, file=sys.stderr)
            except Exception:  # noqa: BLE001 (a bug: the traceback, as the real command shows it)
                traceback.print_exc()
                code = 1
        out, err = capfd.readouterr()
        err += "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno)
                       for w in caught if not issubclass(w.category, _SILENT))
        return subprocess.CompletedProcess(["train.py", *args], code, out, err)
    return run


def assert_one_line_error(result, *needles):
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("train.py: error: "), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def digest(folder):
    return {name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(folder))}


def test_a_folder_holding_a_run_is_never_overwritten(tmp_path, train):
    assert train(*TINY, "--epochs", "1", "--out", "run", cwd=tmp_path).returncode == 0
    before = digest(tmp_path / "run")
    refused = train(*TINY, "--epochs", "1", "--out", "run", cwd=tmp_path)
    assert_one_line_error(refused, "already holds a run", "--resume", "--overwrite")
    assert digest(tmp_path / "run") == before
    # A start that fails (a bad value found only once the data is known) with --overwrite keeps the old run too.
    failed = train(*TINY, "--epochs", "1", "--out", "run", "--overwrite", "--patch-size", "5", cwd=tmp_path)
    assert_one_line_error(failed, "patch_size 5 does not divide the image size 32")
    assert digest(tmp_path / "run") == before
    again = train(*TINY, "--epochs", "1", "--out", "run", "--overwrite", "--seed", "3", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert digest(tmp_path / "run") != before and '"seed": 3' in (tmp_path / "run" / "config.json").read_text()


@pytest.mark.parametrize("args, needle", [
    (["--mask-ratio", "1.5", "--method", "mae"], "mask_ratio must be in [0, 1), got 1.5"),
    (["--batch-size", "0"], "batch_size must be in [1, inf), got 0"),
    (["--batch-size", "5000"], "fewer than one global batch of 5000"),
    (["--patch-size", "5"], "patch_size 5 does not divide the image size 32"),
    (["--dataset", "nope"], "unknown dataset 'nope'"),
    (["--dataset", "cifar10", "--data-root", "nodata"], "--download"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "--device cuda"),
    (["--set", "lr=abc"], "lr must be a number, got 'abc'"),
    (["--set", "mixup=true"], "mixup must be a number, got True"),
    (["--set", "betas=[0.9]"], "betas must be a list of 2 values"),
    (["--set", "no_such_key=1"], "unknown config keys ['no_such_key']"),
    (["--precision", "fp16", "--set", "precision=fp8"], "precision must be one of fp32, bf16, fp16"),
])
def test_every_user_mistake_is_one_line_and_leaves_no_folder(tmp_path, train, args, needle):
    result = train(*TINY, "--epochs", "1", "--out", "run", *args, cwd=tmp_path)
    assert_one_line_error(result, needle)
    assert not (tmp_path / "run").exists()


def test_debug_shows_the_traceback_of_a_user_error(tmp_path, train):
    result = train(*TINY, "--batch-size", "0", "--debug", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" in result.stderr and "UserError" in result.stderr


def test_a_corrupt_checkpoint_and_a_half_made_folder_say_what_is_wrong(tmp_path, train):
    assert train(*TINY, "--epochs", "1", "--out", "run", "--max-steps", "2", cwd=tmp_path).returncode == 0
    (tmp_path / "run" / "checkpoint-last.pt").write_bytes(b"not a checkpoint")
    assert_one_line_error(train(*TINY, "--resume", "--out", "run", cwd=tmp_path), "unreadable or corrupt")
    (tmp_path / "run" / "checkpoint-last.pt").unlink()
    assert_one_line_error(train(*TINY, "--resume", "--out", "run", cwd=tmp_path),
                          "has config.json but no checkpoint-last.pt", "--overwrite")


def test_resume_refuses_flags_that_disagree_with_the_run(tmp_path, train):
    assert train(*TINY, "--epochs", "2", "--out", "run", "--max-steps", "3", cwd=tmp_path).returncode == 0
    for args, needle in ((["--batch-size", "32"], "batch_size = 32 conflicts with the run's batch_size = 64"),
                         (["--method", "mae"], "method = 'mae' conflicts"),
                         (["--dataset", "shapes"], "dataset = 'shapes' conflicts"),
                         (["--overwrite"], "pass one of them")):
        assert_one_line_error(train(*TINY, "--resume", "--out", "run", *args, cwd=tmp_path), needle)
    # The flags that may change, and flags equal to the run's values, are accepted.
    resumed = train(*TINY, "--resume", "--out", "run", "--epochs", "2", "--max-steps", "5", "--batch-size", "64",
                    cwd=tmp_path)
    assert resumed.returncode == 0 and "resumed" in resumed.stdout, resumed.stderr[-2000:]
    assert "--max-steps" in train("--help", cwd=tmp_path).stdout.split("--resume", 1)[1][:400]


def _final_weights(folder):
    return torch.load(os.path.join(folder, "checkpoint-last.pt"), map_location="cpu", weights_only=False)["method"]


INTERRUPTED = [*TINY, "--epochs", "6", "--set", "eval_every=0"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The final weights of the run the interrupted ones must end with, through the real command. It starts at once
    in the background (the other core trains it while a test's run is cut) and is waited for on first use."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    process = subprocess.Popen([sys.executable, TRAIN, *INTERRUPTED, "--out", "whole"], cwd=folder, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    weights = {}

    def wait():
        if not weights:
            _, err = process.communicate(timeout=300)
            assert process.returncode == 0, err[-2000:]
            weights.update(_final_weights(folder / "whole"))
        return weights
    yield wait
    if process.poll() is None:
        process.kill()
        process.communicate()


@pytest.mark.parametrize("signal_number, exit_code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, uninterrupted, signal_number,
                                                                          exit_code):
    process = subprocess.Popen([sys.executable, "-u", TRAIN, *INTERRUPTED, "--out", "cut"], cwd=tmp_path, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    for line in process.stdout:  # wait until it trains (the first epoch line), then interrupt it
        if "epoch=1 " in line or time.time() > deadline:
            break
    process.send_signal(signal_number)
    _, err = process.communicate(timeout=240)
    assert process.returncode == exit_code, err[-2000:]
    message = [line for line in err.splitlines() if line.startswith("interrupted at step")]
    assert len(message) == 1 and message[0].endswith("resume with: python train.py --resume --out cut"), err[-2000:]
    step = int(message[0].split()[3].rstrip(";"))
    assert 0 < step < 6 * 22 and torch.load(tmp_path / "cut" / "checkpoint-last.pt", weights_only=False)["step"] == step
    resumed = train_command("--resume", "--out", "cut", "--no-progress", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    cut, whole = _final_weights(tmp_path / "cut"), uninterrupted()
    assert cut.keys() == whole.keys() and all(torch.equal(cut[k], whole[k]) for k in cut)


def test_warnings_a_user_needs(tmp_path, train):
    result = train(*TINY, "--epochs", "1", "--set", "warmup_epochs=3", "--precision", "fp16", "--max-steps", "1",
                   "--out", "run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "the learning rate never decays" in result.stdout
    if not torch.cuda.is_available():
        assert "--precision fp16 on CPU is slow" in result.stdout


def test_epochs_of_a_multi_stage_method_keep_the_baseline_budget_equal(tmp_path, train):
    """--epochs N is the pipeline's total: RelViT's upstream/finetune split 40:60 as in the preset, scratch gets N."""
    import json
    for epochs, split in ((None, (40, 60, 100)), (10, (4, 6, 10)), (3, (1, 2, 3))):
        args = ["--method", "relvit", "--print-config"] + ([] if epochs is None else ["--epochs", str(epochs)])
        result = train(*args, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
        config = json.loads(result.stdout)
        stages = config["stage_overrides"]
        assert (stages["upstream"]["epochs"], stages["finetune"]["epochs"], stages["scratch"]["epochs"]) == split
        assert config["epochs"] == split[2]  # the top-level value is the pipeline's total, not an unused number


def test_plots_show_every_loss_and_accuracy_a_run_logs():
    from vitfast.engine import plot_series
    mae = [{"epoch": 1, "loss": 1.0, "lr": 1e-3}, {"epoch": 2, "loss": 0.9, "lr": 1e-3, "knn_accuracy": 0.5}]
    assert plot_series(mae) == {"loss": ["loss"], "accuracy": ["knn_accuracy"]}
    relvit = [{"epoch": 1, "loss": 3.0, "relation_loss": 2.0, "position_loss": 1.0, "relation_accuracy": 0.3,
               "train_accuracy": 0.2, "lr": 1e-3, "seconds": 1.0}]
    assert plot_series(relvit) == {"loss": ["loss", "relation_loss", "position_loss"],
                                   "accuracy": ["relation_accuracy", "train_accuracy"]}
    assert plot_series([{"epoch": 1, "lr": 0.1}]) == {}


def test_a_failed_download_names_the_url_and_the_folder(tmp_path, monkeypatch):
    """No network in the tests: torchvision's downloader is replaced by one that fails as an offline machine does."""
    import urllib.error

    import torchvision.datasets

    from vitfast.data import datasets

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "__init__", offline)
    with pytest.raises(datasets.DatasetNotFoundError) as error:
        datasets.load_splits("cifar10", root=str(tmp_path), download=True)
    message = str(error.value)
    assert "downloading cifar10 failed (URLError" in message
    assert torchvision.datasets.CIFAR10.url in message and str(tmp_path / "cifar-10-batches-py") in message


def test_an_unknown_stage_is_one_line(tmp_path, train):
    assert_one_line_error(train("--method", "relvit", "--stage", "nope", cwd=tmp_path),
                          "relvit stage must be one of upstream, finetune, scratch, joint, got 'nope'")
    assert_one_line_error(train("--method", "mae", "--stage", "x", cwd=tmp_path), "mae has no stages")


def test_print_config_says_nothing_false(tmp_path, train):
    """The model's real sizes (from its table entry when the preset leaves them open), and no base_lr beside an
    explicit lr (it would not be used)."""
    import json
    mae_paper = json.loads(train("--method", "mae", "--preset", "paper", "--print-config", cwd=tmp_path).stdout)
    assert (mae_paper["model"], mae_paper["embed_dim"], mae_paper["depth"], mae_paper["num_heads"],
            mae_paper["patch_size"]) == ("small_data", 192, 9, 12, 4)
    assert (mae_paper["lr"], mae_paper["base_lr"]) == (None, 1.5e-4)
    explicit = json.loads(train("--method", "mae", "--preset", "paper", "--lr", "1e-3", "--print-config",
                                cwd=tmp_path).stdout)
    assert (explicit["lr"], explicit["base_lr"]) == (1e-3, None)


def test_no_progress_bars_without_a_terminal(tmp_path, train):
    """Progress is on by default, but a log file (no terminal) gets one line per epoch and no bar redraws."""
    args = [a for a in TINY if a != "--no-progress"]
    result = train(*args, "--epochs", "1", "--out", "run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "\r" not in result.stderr and "it/s" not in result.stderr
    assert sum(line.startswith("[vitfast] epoch=1 ") for line in result.stdout.splitlines()) == 1


def test_a_failed_download_through_the_command(tmp_path):
    """The real command, offline: a proxy on a closed local port makes every download fail at once. Also the case
    that shows a one-line error of the real command (start-up warnings included), as the in-process cases do."""
    env = {**os.environ, "https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9",
           "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "no_proxy": "", "NO_PROXY": ""}
    result = subprocess.run([sys.executable, TRAIN, *TINY, "--dataset", "cifar10", "--download", "--data-root", "data",
                             "--out", "run"], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert_one_line_error(result, "downloading cifar10 failed", "cifar-10-python.tar.gz",
                          "into data/cifar-10-batches-py")
    assert not (tmp_path / "run").exists()
