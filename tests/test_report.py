"""`python -m vitfast.report`: which numbers of a run's summary go into which column, mean ± std, the README block,
and one real (one-epoch) run that a second call reuses instead of training again (~15 s)."""
import json
import os

import pytest

from vitfast import report

PROBE = {"test_accuracy": 0.5}


def test_single_stage_numbers_come_from_the_run_itself():
    summary = {"knn_accuracy": 0.9, "linear_probe": {"test_accuracy": 0.95},
               "random_init": {"knn_accuracy": 0.6, "linear_probe": PROBE}}
    assert report.run_numbers("mae", summary) == dict(knn=0.9, probe=0.95, random_knn=0.6, random_probe=0.5)
    supervised = {"knn_accuracy": 0.8, "test_accuracy": 0.93}  # a classifier run: its encoder and its classifier
    assert report.run_numbers("supervised", supervised) == dict(knn=0.8, classifier=0.93)


def test_multi_stage_numbers_pick_the_pretrained_encoder_the_classifier_and_the_baseline():
    dino = {"stages": {"dino": {"knn_accuracy": 0.6, "linear_probe": {"test_accuracy": 0.8},
                                "random_init": {"knn_accuracy": 0.4, "linear_probe": PROBE}},
                       "finetune": {"knn_accuracy": 0.99, "test_accuracy": 0.77},  # not the pre-trained encoder
                       "baseline": {"test_accuracy": 0.83}}}
    assert report.run_numbers("dino", dino) == dict(knn=0.6, probe=0.8, classifier=0.77, baseline=0.83,
                                                   random_knn=0.4, random_probe=0.5)
    mae_ct = {"stages": {"mae": {"knn_accuracy": 0.91, "random_init": {"knn_accuracy": 0.66}},
                         "head": {"final_train_loss": 1.0}, "ct": {"knn_accuracy": 0.96}}}
    assert report.run_numbers("mae-ct", mae_ct) == dict(knn=0.96, random_knn=0.66)  # the last stage's encoder


def test_mean_std_over_seeds():
    assert report.mean_std([0.9, 0.92, 0.94], scale=100) == "92.0 ± 2.0"
    assert report.mean_std([0.5], scale=100) == "50.0"
    assert report.mean_std([]) == "—"


def test_readme_block_is_replaced_between_the_markers_only(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.README_START}\nold table\n{report.README_END}\nrest\n")
    report.write_readme(str(readme), "| new |")
    assert readme.read_text() == f"intro\n{report.README_START}\n| new |\n{report.README_END}\nrest\n"
    (tmp_path / "plain.md").write_text("no markers")
    with pytest.raises(SystemExit, match="markers"):
        report.write_readme(str(tmp_path / "plain.md"), "x")


def test_a_finished_run_is_reused_and_an_unfinished_one_starts_over(tmp_path, capsys):
    out = tmp_path / "report"
    args = ["--methods", "supervised", "--seeds", "0", "--epochs", "1", "--out", str(out),
            "--set", "metrics=knn", "--set", "embed_dim=32", "--set", "depth=1", "--set", "num_heads=2"]
    assert report.main(args) == 0
    record_path = out / "runs" / "supervised-seed0" / "report-run.json"
    first = json.loads(record_path.read_text())
    assert set(first["numbers"]) == {"knn", "classifier"} and first["wall_seconds"] > 0
    table = (out / "results.md").read_text()
    assert "| `supervised` | 1 |" in table and " cores (" in table
    assert report.main(args) == 0  # nothing left to run: the record is reused as it is
    assert json.loads(record_path.read_text()) == first
    os.remove(record_path)  # as if the run had been interrupted before it finished
    assert report.main(args) == 0  # started over in the same folder (--overwrite), not refused
    assert json.loads(record_path.read_text())["wall_seconds"] != first["wall_seconds"]
    assert "FAILED" not in capsys.readouterr().out
