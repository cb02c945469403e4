"""Experiment tracking: log_with=tensorboard|wandb|all through accelerate's trackers, W&B in its offline mode."""

import glob
import os
import sys

import pytest

from tokenizer.common.config import load_config
from tokenizer.common.errors import UserError
from tokenizer.common.tracking import check_log_with
from tokenizer.common.validation import check_config
from tokenizer.config_checks import SSDD_CHECKS

pytest.importorskip("wandb", reason="the wandb extra: pip install '.[wandb]'")

TINY = ["config=configs/fmnist.yaml", "ssdd.encoder_base_channels=32", "dataset.batch_size=16",
        "training.eval_images=32", "training.log_freq=2", "eval.batch_size=32", "losses.lpips=0", "losses.repa=0"]


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    for key, value in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"), ("WANDB_PROJECT", "ssdd-tests"),
                       ("WANDB_CONFIG_DIR", tmp_path / "wandb-config"), ("WANDB_CACHE_DIR", tmp_path / "wandb-cache"),
                       ("WANDB_DATA_DIR", tmp_path / "wandb-data")):
        monkeypatch.setenv(key, str(value))
    return tmp_path


@pytest.mark.slow
def test_log_with_all_writes_tensorboard_and_an_offline_wandb_run(wandb_offline):
    from tokenizer.train import main

    tmp = wandb_offline
    args = [*TINY, f"ckpt_dir={tmp}", "run_name=tracked", "training.max_steps=4", "training.sample_every=2",
            "training.eval_freq=1000", "log_with=all"]
    assert main(args) == 0
    run = tmp / "jobs" / "tracked"
    assert glob.glob(str(run / "tensorboard" / "events.out.tfevents.*"))
    offline = glob.glob(str(run / "wandb" / "offline-run-*"))
    assert len(offline) == 1, os.listdir(run)
    assert glob.glob(os.path.join(offline[0], "run-*.wandb"))
    images = glob.glob(os.path.join(offline[0], "files", "media", "images", "*.png"))
    assert images, "the sample grids reach W&B too"


def test_log_with_is_checked_with_the_config():
    cfg = load_config("ssdd.yaml", [*TINY, "log_with=mlflow"])
    with pytest.raises(UserError, match="unknown log_with 'mlflow': choose one of tensorboard, wandb, all"):
        check_config(cfg, SSDD_CHECKS)
    for value in ("tensorboard", "wandb", "all"):
        assert check_config(load_config("ssdd.yaml", [*TINY, f"log_with={value}"]), SSDD_CHECKS).log_with == value
    assert load_config("dit.yaml", []).log_with == "tensorboard"


def test_wandb_missing_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what an install without the extra gives: ImportError
    with pytest.raises(UserError, match=r"log_with=all needs wandb: pip install '\.\[wandb\]'"):
        check_log_with("all")
    assert check_log_with("tensorboard") == "tensorboard"


@pytest.mark.slow
def test_dit_trainer_logs_to_wandb_only(wandb_offline):
    from helpers import ROOT, make_tokenizer, tiny_args

    from dit.cache import main as cache_main
    from dit.train import main as train_main

    tmp = wandb_offline
    os.chdir(ROOT)
    args = tiny_args(make_tokenizer(tmp / "tok"), tmp, images=16)
    assert cache_main(args) == 0
    assert train_main([*args, "run_name=dit_wandb", "training.max_steps=2", "training.sample_every=2",
                       "log_with=wandb"]) == 0
    run = tmp / "jobs" / "dit_wandb"
    offline = glob.glob(str(run / "wandb" / "offline-run-*"))
    assert len(offline) == 1 and not (run / "tensorboard").exists()
    assert glob.glob(os.path.join(offline[0], "files", "media", "images", "*.png"))
