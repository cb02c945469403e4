"""A user's own image folder, generated here (several classes, PNG and JPEG, an empty class folder, a corrupt file,
a truncated JPEG): the suite trains on exactly that data, records which data made each cache, run and result,
checks the files before any work, and takes class-balanced subsets."""

import json
import os
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import CLASSES, ROOT, TINY, make_folder, make_tokenizer, snapshot, tiny_args
from omegaconf import OmegaConf

from dit.cache import main as cache_main
from dit.config_checks import DIT_CHECKS
from dit.train import main as dit_main
from tokenizer import data_check
from tokenizer.common.config import load_config
from tokenizer.common.errors import UserError
from tokenizer.common.training import make_accelerator
from tokenizer.common.validation import check_config
from tokenizer.config_checks import SSDD_CHECKS
from tokenizer.data import FashionMNIST, ImageFolderDataset, build_dataset, take_subset
from tokenizer.data_check import select
from tokenizer.evaluation import reconstruct_split
from tokenizer.train import main as tok_main


def last_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    line = err.splitlines()[-1] if err else ""
    assert line.startswith("error:") and "Traceback" not in err, err
    return line


# ----------------------------------------------------------------------------- subsets


def test_limit_64_on_four_classes_gives_16_per_class(tmp_path):
    root = make_folder(tmp_path / "photos", train=20, val=40)
    spec = {"name": "imagefolder", "root": str(root), "im_size": 16, "limit": 64}
    val = build_dataset(spec, "val", train=False)
    assert np.bincount(val.targets).tolist() == [16, 16, 16, 16]
    assert val.samples == build_dataset(spec, "val", train=False).samples  # the same every run
    assert val.identity["subset"] == "balanced" and val.identity["selected"] == 64 and val.identity["files"] == 160
    # the old behaviour stays available: the first 64 files in sorted order cover the first classes only
    first = build_dataset({**spec, "subset": "first"}, "val", train=False)
    assert np.bincount(first.targets).tolist() == [40, 24]
    assert first.identity["fingerprint"] != val.identity["fingerprint"]  # other images, other data
    # train split (20 per class): 64 = 16 each, drawn from all of each class, not its first files
    train = build_dataset(spec, "train", train=True)
    assert np.bincount(train.targets).tolist() == [16] * 4
    assert max(int(os.path.basename(p)[:3]) for p, _ in train.samples) > 15


def test_balanced_selection_is_a_pure_function_and_fills_small_classes():
    targets = [0] * 3 + [1] * 30 + [2] * 30 + [3] * 30
    keep = select(targets, 64, "balanced", seed=0)
    counts = np.bincount([targets[i] for i in keep]).tolist()
    assert sum(counts) == 64 and counts[0] == 3 and max(counts) - min(counts[1:]) <= 1  # 3 + the rest shared
    assert keep == select(list(targets), 64, "balanced", seed=0) == sorted(keep)  # (file list, n, seed) decide
    assert keep != select(targets, 64, "balanced", seed=1)
    assert set(select(targets, 32, "balanced")) <= set(keep)  # a smaller subset lies inside a larger one
    assert select(targets, 200, "balanced") == list(range(len(targets)))
    assert select(targets, 5, "first") == [0, 1, 2, 3, 4]
    fm = FashionMNIST("val", limit=40)  # Fashion-MNIST's limit is balanced too
    assert np.bincount(fm.targets).tolist() == [4] * 10


def test_eval_images_reconstruct_a_balanced_subset(tmp_path):
    """training.eval_images: reconstruct_split evaluates a class-balanced subset, the same whatever the process
    count (it is chosen before accelerate shards the split)."""
    root = make_folder(tmp_path / "photos", train=2, val=10)
    dataset = build_dataset({"name": "imagefolder", "root": str(root), "im_size": 16}, "val", train=False)

    class Identity(torch.nn.Module):  # encode/decode that return the image: what is evaluated tells its class
        def encode(self, x):
            return SimpleNamespace(mode=lambda: x)

        def decode(self, z, steps=1, generator=None):
            return z

    seen = []
    cfg = OmegaConf.create({"eval": {"batch_size": 5, "lpips": False, "lpips_weights": None, "fid": False,
                                     "inception_weights": None}, "dataset": {"num_workers": 0, "subset": "balanced"},
                            "show_samples": 2})
    reconstruct_split(cfg, make_accelerator("no"), Identity(), dataset, 1, limit=8,
                      observers=[lambda x, rec: seen.extend(((x.mean((1, 2, 3)) + 1) * 127.5).round().tolist())])
    classes = [round((level - 40) / 50) for level in seen]
    assert sorted(classes) == [0, 0, 1, 1, 2, 2, 3, 3], seen
    assert take_subset(dataset, 8).indices == take_subset(dataset, 8).indices


# ----------------------------------------------------------------------------- a given root is read, or refused


def test_a_given_root_is_read_whatever_config_it_started_from(tmp_path, capsys):
    root = make_folder(tmp_path / "photos")
    cfg = check_config(load_config("ssdd.yaml", ["config=configs/fmnist.yaml", f"dataset.root={root}"]), SSDD_CHECKS)
    assert cfg.dataset.name == "imagefolder" and "holds an image folder" in capsys.readouterr().out
    ds = build_dataset(cfg.dataset, "train", train=True)
    assert isinstance(ds, ImageFolderDataset) and ds.classes == CLASSES and len(ds) == 32
    tok = make_tokenizer(tmp_path / "tok")
    cfg = check_config(load_config("dit.yaml", ["config=configs/dit_fmnist.yaml", f"dataset.root={root}",
                                                f"tokenizer.checkpoint={tok}"]), DIT_CHECKS)
    assert cfg.dataset.name == "imagefolder"
    # a root that is neither an image folder nor Fashion-MNIST's files, or no folder at all: refused
    (tmp_path / "nothing").mkdir()
    for bad in (tmp_path / "nothing", tmp_path / "missing"):
        with pytest.raises(UserError, match="holds neither an image folder .* nor Fashion-MNIST"):
            check_config(load_config("ssdd.yaml", ["config=configs/fmnist.yaml", f"dataset.root={bad}"]), SSDD_CHECKS)
    # the bundled subset only without a root
    cfg = check_config(load_config("ssdd.yaml", ["config=configs/fmnist.yaml"]), SSDD_CHECKS)
    assert isinstance(build_dataset(cfg.dataset, "train", train=True), FashionMNIST)


@pytest.mark.slow
def test_the_tokenizer_trains_on_the_given_folder_and_records_it(tmp_path, capsys):
    root = make_folder(tmp_path / "photos")
    os.chdir(ROOT)
    args = [*TINY, f"ckpt_dir={tmp_path / 'runs'}", f"dataset.root={root}", "run_name=mine", "training.max_steps=2",
            "training.eval_images=8", "ssdd.fm_sampler.steps=2"]
    assert tok_main(args) == 0
    out = capsys.readouterr().out
    assert f"data (train): imagefolder {root.resolve()}, split train: 32 images, 4 classes (cat, dog, fox, owl)" in out
    run = tmp_path / "runs" / "jobs" / "mine"
    data = json.load(open(run / "data.json"))
    assert data["train"]["kind"] == "imagefolder" and data["train"]["root"] == str(root.resolve())
    assert data["train"]["class_names"] == CLASSES and data["train"]["files"] == 32
    assert data["val"]["split"] == "val" and data["val"]["images"] == 64 and len(data["val"]["fingerprint"]) == 64
    (result,) = list((run / "results").glob("step*/eval_training.json"))
    assert json.load(open(result))["data"]["fingerprint"] == data["val"]["fingerprint"]
    # task=eval and task=z_stats record their data too
    ckpt = str(run / "checkpoints" / "last" / "model_ae_ema.safetensors")
    common = [*TINY, f"ckpt_dir={tmp_path / 'runs'}", f"dataset.root={root}", f"ssdd.checkpoint={ckpt}"]
    assert tok_main([*common, "task=eval", "eval.steps=1", "run_name=e"]) == 0
    assert tok_main([*common, "task=z_stats", "run_name=z"]) == 0
    folder = result.parent
    assert json.load(open(folder / "eval_1steps.json"))["data"]["root"] == str(root.resolve())
    assert json.load(open(folder / "z_stats.json"))["data"]["fingerprint"] == data["val"]["fingerprint"]
    # resuming the run on other data is refused, and changes nothing of it
    other = make_folder(tmp_path / "other", classes=["apple", "pear"])
    before = snapshot(run)
    assert tok_main([*args[:-3], f"dataset.root={other}", "run_name=mine", "training.max_steps=4"]) == 2
    line = last_error(capsys)
    assert "was trained on" in line and str(root.resolve()) in line and str(other.resolve()) in line
    assert "nothing was changed" in line and snapshot(run) == before


# ----------------------------------------------------------------------------- the data checked before work


def test_empty_class_folders_are_refused_unless_allowed(tmp_path, capsys):
    root = make_folder(tmp_path / "photos", empty="zz_empty")
    spec = {"name": "imagefolder", "root": str(root), "im_size": 16}
    with pytest.raises(UserError, match="1 of the 5 class folders .* holds no images: zz_empty.*"
                                        "dataset.allow_empty_classes=true"):
        build_dataset(spec, "train", train=True)
    os.chdir(ROOT)
    assert tok_main([*TINY, f"ckpt_dir={tmp_path / 'runs'}", f"dataset.root={root}", "run_name=e"]) == 2
    assert "zz_empty" in last_error(capsys)
    kept = build_dataset({**spec, "allow_empty_classes": True}, "train", train=True)
    assert kept.classes == [*CLASSES, "zz_empty"] and kept.identity["empty_classes"] == ["zz_empty"]
    assert "1 empty classes kept (zz_empty)" in data_check.banner(kept.identity)


@pytest.mark.slow
def test_unreadable_files_are_found_before_the_first_step(tmp_path, capsys):
    root = make_folder(tmp_path / "photos", corrupt="dog/zz_corrupt.png", truncated="fox/002.JPEG")
    os.chdir(ROOT)
    args = [*TINY, f"ckpt_dir={tmp_path / 'runs'}", f"dataset.root={root}", "training.max_steps=2",
            "training.eval_images=8", "ssdd.fm_sampler.steps=2"]
    assert tok_main([*args, "run_name=stops"]) == 2
    line = last_error(capsys)
    assert "zz_corrupt.png" in line and "(and 1 more)" in line and "python -m tokenizer.data_check" in line
    assert "dataset.skip_unreadable=true" in line
    assert not (tmp_path / "runs" / "jobs" / "stops" / "losses.jsonl").exists()  # no step was taken
    # the header check alone sees the truncated JPEG (its end marker is missing)
    ds = build_dataset({"name": "imagefolder", "root": str(root), "im_size": 16, "skip_unreadable": True}, "train",
                       train=True)
    assert ds.identity["skipped"] == 2 and len(ds) == 31 and ds.identity["files"] == 33
    assert sorted(u["file"] for u in ds.identity["unreadable"]) == ["train/dog/zz_corrupt.png", "train/fox/002.JPEG"]
    # skip_unreadable=true trains without them; the start line and data.json count them
    assert tok_main([*args, "run_name=skips", "dataset.skip_unreadable=true"]) == 0
    assert "2 unreadable skipped (dataset.skip_unreadable=true)" in capsys.readouterr().out
    data = json.load(open(tmp_path / "runs" / "jobs" / "skips" / "data.json"))
    assert data["train"]["skipped"] == 2 and data["train"]["images"] == 31
    # check_files=false leaves the check out; a file that fails while training is then replaced when skipping
    unchecked = ImageFolderDataset(root, "train", 16, train=True, check_files=False, skip_unreadable=True)
    bad = [p for p, _ in unchecked.samples].index(str(root / "train" / "fox" / "002.JPEG"))
    x, y = unchecked[bad]
    assert x.shape == (3, 16, 16) and y == unchecked.targets[bad + 1]


def test_the_check_command_lists_unreadable_files(tmp_path, capsys, monkeypatch):
    root = make_folder(tmp_path / "photos", empty="zz_empty", corrupt="dog/zz_corrupt.png",
                       truncated="fox/002.JPEG")
    assert data_check.main([str(root), "--workers", "0"]) == 1
    out = capsys.readouterr().out
    monkeypatch.setattr(data_check, "_PARALLEL_FROM", 1)  # the same findings from a pool of processes
    assert data_check.main([str(root), "--workers", "2"]) == 1
    assert re.sub(r"\(\d+\.\d s\)", "", capsys.readouterr().out) == re.sub(r"\(\d+\.\d s\)", "", out)
    assert "unreadable: train/dog/zz_corrupt.png: not an image" in out
    assert "unreadable: train/fox/002.JPEG: " in out and "runcated" in out.split("002.JPEG: ")[1].splitlines()[0]
    assert "empty class folders: zz_empty" in out and "train: 2 unreadable of 33" in out and "val: 0 unreadable" in out
    clean = make_folder(tmp_path / "clean")
    assert data_check.main([str(clean), "--split", "val", "--workers", "2"]) == 0
    assert "val: 0 unreadable of 64" in capsys.readouterr().out
    assert data_check.main([str(tmp_path / "missing")]) == 2
    assert "is not a folder" in last_error(capsys)


# ----------------------------------------------------------------------------- the latent cache knows its data


@pytest.mark.slow
def test_a_cache_of_other_data_is_never_used_nor_replaced(tmp_path, capsys):
    a = make_folder(tmp_path / "a")
    b = make_folder(tmp_path / "b", classes=["apple", "pear"], train=6)
    tok = make_tokenizer(tmp_path / "tok")
    os.chdir(ROOT)
    args = [*tiny_args(tok, tmp_path), "dataset.limit=null", "training.max_steps=1", "sample.grid_classes=[0]"]
    assert cache_main([*args, f"dataset.root={a}"]) == 0
    assert "data: imagefolder" in capsys.readouterr().out
    (cache_a,) = (tmp_path / "latents").iterdir()
    meta = json.load(open(cache_a / "cache.json"))
    assert meta["data"]["root"] == str(a.resolve()) and meta["data"]["images"] == 32
    assert cache_a.name == f"imagefolder-train-32px-{meta['data']['fingerprint'][:8]}-{meta['encoder_sha256'][:12]}"
    kept = snapshot(cache_a)
    # dit.train on B: no cache of B; the message names A's cache and the command that builds B's
    assert dit_main([*args, f"dataset.root={b}", "run_name=b"]) == 2
    line = last_error(capsys)
    assert "no latent cache of" in line and str(b.resolve()) in line and str(cache_a) in line
    assert str(a.resolve()) in line and "python -m dit.cache" in line
    # pointing cache.dir at A's cache: refused by the trainer and by the builder, which leaves it as it was
    assert dit_main([*args, f"dataset.root={b}", f"cache.dir={cache_a}", "run_name=b"]) == 2
    line = last_error(capsys)
    assert "was made from" in line and str(a.resolve()) in line and str(b.resolve()) in line
    assert cache_main([*args, f"dataset.root={b}", f"cache.dir={cache_a}"]) == 2
    assert "holds the latent cache of other data" in last_error(capsys) and snapshot(cache_a) == kept
    # B gets its own cache beside A's
    assert cache_main([*args, f"dataset.root={b}"]) == 0
    assert len(list((tmp_path / "latents").iterdir())) == 2 and snapshot(cache_a) == kept
    # each trains on its own data; the run records it
    assert dit_main([*args, f"dataset.root={a}", "run_name=a"]) == 0
    assert f"data (latent cache {cache_a}): imagefolder {a.resolve()}" in capsys.readouterr().out
    data = json.load(open(tmp_path / "jobs" / "a" / "data.json"))
    assert data["cache"] == str(cache_a) and data["train"]["class_names"] == CLASSES
    assert dit_main([*args, f"dataset.root={b}", "run_name=b"]) == 0
    assert json.load(open(tmp_path / "jobs" / "b" / "data.json"))["train"]["class_names"] == ["apple", "pear"]
