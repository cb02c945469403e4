"""The catalogue of bad inputs: each case goes through a real command-line entry point (its `main`) and must end
with a non-zero exit, a one-line `error:` message and no traceback, and leave every file of the existing runs, the
latent cache and the bundles as it was (same size, time stamp and inode).

Cases cover every config knob kind (types, ranges, choices, paths), resumes that do not fit, damaged weights, and
the scripts' arguments (counts, steps, sizes, seeds, guidance scales, devices, output places, memory limits).
"""

import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from helpers import ROOT, TINY, make_folder, make_tokenizer, snapshot, tiny_args
from PIL import Image

import tokenizer.common.devices as devices
from dit.cache import main as cache_main
from dit.export import main as export_main
from dit.pipeline import BUNDLE_DIR, DECODER_FILE, DIT_FILE, INFO_FILE
from dit.train import main as dit_main
from sample import generate, reconstruct, sample_ddp
from tokenizer import SSDD
from tokenizer.common.checkpoint import file_record, read_weights, save_weights
from tokenizer.train import main as tok_main

ENTRIES = {"tokenizer.train": tok_main, "dit.train": dit_main, "dit.cache": cache_main, "dit.export": export_main,
           "generate": generate.main, "reconstruct": reconstruct.main, "sample_ddp": sample_ddp.main}


def garble(path, offset_from_data=64, count=256):
    """Overwrite bytes inside the tensor data of a safetensors file (the size stays)."""
    with open(path, "r+b") as f:
        header = int.from_bytes(f.read(8), "little")
        f.seek(8 + header + offset_from_data)
        f.write(os.urandom(count))


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    """An existing tokenizer run and DiT run (with its latent cache), bundles (damaged ones too), a tiny whole
    tokenizer file and a decoder-only file of another encoder."""
    root = tmp_path_factory.mktemp("bad")
    os.chdir(ROOT)
    c = SimpleNamespace(root=root, out=root / "outputs", a_file=root / "plain_file")
    c.out.mkdir()
    c.a_file.write_text("not a folder")
    c.tok_args = [*TINY, f"ckpt_dir={root / 'tok'}", "run_name=existing", "training.max_steps=2",
                  "training.eval_images=8", "ssdd.fm_sampler.steps=2"]
    assert tok_main(c.tok_args) == 0
    c.tokenizer = make_tokenizer(root / "tokfile")
    c.dit_args = [*tiny_args(c.tokenizer, root / "dit"), "run_name=existing", "training.max_steps=2"]
    assert cache_main(c.dit_args) == 0
    assert dit_main(c.dit_args) == 0
    c.dit_ema = str(root / "dit" / "jobs" / "existing" / "checkpoints" / "last" / "model_dit_ema.safetensors")
    (c.dit_cache,) = (root / "dit" / "latents").iterdir()
    # a user's image folders: a good one (other data than the runs above), one with an empty class folder, one with
    # a corrupt file, and a folder that is neither an image folder nor Fashion-MNIST
    c.photos = make_folder(root / "photos")
    c.photos_empty = make_folder(root / "photos_empty", empty="zz_empty")
    c.photos_corrupt = make_folder(root / "photos_corrupt", corrupt="dog/zz_corrupt.png")
    c.nothing = root / "nothing"
    c.nothing.mkdir()
    # the same DiT run copied, with a byte-damaged weights file
    shutil.copytree(root / "dit" / "jobs" / "existing", root / "dit" / "jobs" / "damaged")
    garble(root / "dit" / "jobs" / "damaged" / "checkpoints" / "last" / "model_dit.safetensors")
    # bundles: the embedded one with garbled DiT bytes, with a garbled decoder, and one whose weights are NaN but
    # whose bundle.json describes them (consistent files that still generate non-finite images)
    for name in ("garbled_dit", "garbled_decoder", "nan"):
        shutil.copytree(BUNDLE_DIR, root / name)
    garble(root / "garbled_dit" / DIT_FILE)
    garble(root / "garbled_decoder" / DECODER_FILE)
    state, meta = read_weights(str(root / "nan" / DIT_FILE))
    save_weights({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state.items()},
                 str(root / "nan" / DIT_FILE), meta)
    info = json.load(open(root / "nan" / INFO_FILE))
    info["files"][DIT_FILE] = file_record(str(root / "nan" / DIT_FILE))
    json.dump(info, open(root / "nan" / INFO_FILE, "w"))
    other = SSDD.from_checkpoint(make_tokenizer(root / "other", seed=3))
    c.other_decoder = str(root / "other" / "decoder_only.safetensors")
    other.save_decoder(c.other_decoder, dtype=torch.float16)  # records the other encoder's sha256
    return c


def tok(c, *extra):
    return "tokenizer.train", [*c.tok_args, *extra]


def dit(c, *extra, entry="dit.train"):
    return entry, [*c.dit_args, *extra]


def gen(c, *extra):
    return "generate", ["--class", "sneaker", "--num", "1", "--out", str(c.out / "g"), *extra]


def rec(c, *extra):
    return "reconstruct", ["--ckpt", c.tokenizer, "--image", "chelsea", "--size", "64", "--steps", "1",
                           "--out", str(c.out / "r.png"), *extra]


def ddp(c, *extra):
    return "sample_ddp", ["--num-fid-samples", "20", "--out", str(c.out / "fid" / "s"), *extra]


# (case id, arguments from the context, text the one-line message must contain)
CASES = [
    # tokenizer.train: config values of every kind, checked before any work
    ("tok-lr-text", lambda c: tok(c, "training.lr=abc"), "training.lr='abc'"),
    ("tok-lr-nan", lambda c: tok(c, "training.lr=nan"), "training.lr"),
    ("tok-lr-inf", lambda c: tok(c, "training.lr=.inf"), "training.lr"),
    ("tok-lr-zero", lambda c: tok(c, "training.lr=0"), "> 0"),
    ("tok-batch-zero", lambda c: tok(c, "dataset.batch_size=0"), "dataset.batch_size=0"),
    ("tok-max-steps-negative", lambda c: tok(c, "training.max_steps=-5"), "training.max_steps=-5"),
    ("tok-max-steps-text", lambda c: tok(c, "training.max_steps=abc"), "training.max_steps"),
    ("tok-epochs-zero", lambda c: tok(c, "training.epochs=0"), "training.epochs"),
    ("tok-bool-text", lambda c: tok(c, "ssdd.encoder_train=maybe"), "true or false"),
    ("tok-im-size", lambda c: tok(c, "dataset.im_size=30"), "multiple of 8"),
    ("tok-im-size-zero", lambda c: tok(c, "dataset.im_size=0"), "dataset.im_size"),
    ("tok-sampler-steps", lambda c: tok(c, "ssdd.fm_sampler.steps=0"), "ssdd.fm_sampler.steps"),
    ("tok-sampler-steps-huge", lambda c: tok(c, "ssdd.fm_sampler.steps=100000"), "<= 1000"),
    ("tok-seed", lambda c: tok(c, "seed=-1"), "seed"),
    ("tok-optimizer", lambda c: tok(c, "training.optimizer=sgd"), "unknown training.optimizer"),
    ("tok-loss-weight", lambda c: tok(c, "losses.diffusion=-1"), "losses.diffusion"),
    ("tok-ema-decay", lambda c: tok(c, "ssdd.ema.decay=2"), "ssdd.ema.decay"),
    ("tok-grad-clip", lambda c: tok(c, "training.grad_clip=-0.1"), "training.grad_clip"),
    ("tok-eval-batch", lambda c: tok(c, "eval.batch_size=0"), "eval.batch_size"),
    ("tok-workers", lambda c: tok(c, "dataset.num_workers=-1"), "dataset.num_workers"),
    ("tok-save-on-best", lambda c: tok(c, "training.save_on_best=fid"), "unknown training.save_on_best"),
    ("tok-decoder", lambda c: tok(c, "ssdd.decoder=Q"), "unknown ssdd.decoder"),
    ("tok-encoder", lambda c: tok(c, "ssdd.encoder=f7c4"), "ssdd.encoder"),
    ("tok-base-channels", lambda c: tok(c, "ssdd.encoder_base_channels=20"), "multiple of 32"),
    ("tok-ckpt-dir-under-file", lambda c: tok(c, f"ckpt_dir={c.a_file}/runs"), "is a file"),
    ("tok-run-name-escapes", lambda c: tok(c, "run_name=../elsewhere"), "run_name"),
    ("tok-missing-checkpoint", lambda c: tok(c, "task=eval", "ssdd.checkpoint=no_such_run"), "no_such_run"),
    ("tok-missing-weights-file", lambda c: tok(c, f"aux_losses.lpips_weights={c.root}/none.pth"), "an existing file"),
    ("tok-missing-dataset-root", lambda c: tok(c, "dataset.name=imagefolder", f"dataset.root={c.root}/nowhere"),
     "nowhere"),
    ("tok-resume-other-architecture", lambda c: tok(c, "ssdd.decoder=S"), "nothing was changed"),
    ("tok-resume-other-optimizer", lambda c: tok(c, "training.optimizer=adamw"), "nothing was changed"),
    # a user's data: refused before any work, in one line that names the file, folder or key
    ("tok-empty-class-folder", lambda c: tok(c, f"dataset.root={c.photos_empty}"), "zz_empty"),
    ("tok-unreadable-image", lambda c: tok(c, f"dataset.root={c.photos_corrupt}"), "zz_corrupt.png"),
    ("tok-resume-other-data", lambda c: tok(c, f"dataset.root={c.photos}"), "was trained on"),
    ("tok-root-neither-folder-nor-fmnist", lambda c: tok(c, f"dataset.root={c.nothing}"), "holds neither"),
    ("dit-no-cache-of-this-data", lambda c: dit(c, f"dataset.root={c.photos}"), "no latent cache of"),
    ("dit-cache-of-other-data", lambda c: dit(c, f"dataset.root={c.photos}", f"cache.dir={c.dit_cache}"),
     "was made from"),
    ("cache-dir-of-other-data", lambda c: dit(c, f"dataset.root={c.photos}", f"cache.dir={c.dit_cache}",
                                              entry="dit.cache"), "holds the latent cache of other data"),
    ("cache-empty-class-folder", lambda c: dit(c, f"dataset.root={c.photos_empty}", entry="dit.cache"), "zz_empty"),
    ("cache-unreadable-image", lambda c: dit(c, f"dataset.root={c.photos_corrupt}", entry="dit.cache"),
     "zz_corrupt.png"),
    # dit.cache and dit.train
    ("dit-batch-zero", lambda c: dit(c, "training.batch_size=0"), "training.batch_size=0"),
    ("dit-model-name", lambda c: dit(c, "model.name=DiT-Q/2"), "unknown model.name"),
    ("dit-cfg-nan", lambda c: dit(c, "sample.cfg_scale=nan"), "sample.cfg_scale"),
    ("dit-cfg-inf", lambda c: dit(c, "sample.cfg_scale=.inf"), "sample.cfg_scale"),
    ("dit-guidance-interval", lambda c: dit(c, "sample.guidance_interval=[0.8,0.2]"), "lo <= hi"),
    ("dit-dropout", lambda c: dit(c, "model.class_dropout_prob=1.5"), "model.class_dropout_prob"),
    ("dit-t-kind", lambda c: dit(c, "flow.t_kind=xx"), "unknown flow.t_kind"),
    ("dit-lr-text", lambda c: dit(c, "training.lr=abc"), "training.lr"),
    ("dit-grad-accumulate", lambda c: dit(c, "training.grad_accumulate=2"), "one batch per optimiser step"),
    ("dit-sample-steps", lambda c: dit(c, "sample.steps=100000"), "sample.steps"),
    ("dit-max-steps", lambda c: dit(c, "training.max_steps=-5"), "training.max_steps"),
    ("dit-grid-classes", lambda c: dit(c, "sample.grid_classes=[-1]"), "sample.grid_classes"),
    ("dit-missing-tokenizer", lambda c: dit(c, "tokenizer.checkpoint=no_such_run"), "no_such_run"),
    ("dit-resume-other-architecture", lambda c: dit(c, "model.name=DiT-Ti/2"), "nothing was changed"),
    ("dit-resume-damaged-weights", lambda c: dit(c, "run_name=damaged"), "model_dit.safetensors is damaged"),
    ("cache-dtype", lambda c: dit(c, "cache.dtype=int8", entry="dit.cache"), "unknown cache.dtype"),
    ("cache-batch-zero", lambda c: dit(c, "cache.batch_size=0", entry="dit.cache"), "cache.batch_size"),
    ("cache-shard-zero", lambda c: dit(c, "cache.shard_size=0", entry="dit.cache"), "cache.shard_size"),
    # dit.export
    ("export-decoder-of-another-encoder", lambda c: ("dit.export", [
        "--dit", c.dit_ema, "--decoder", c.other_decoder, "--out", str(c.out / "b")]), "another encoder"),
    ("export-cfg-nan", lambda c: ("dit.export", ["--dit", c.dit_ema, "--cfg", "nan", "--out", str(c.out / "b")]),
     "--cfg"),
    ("export-steps-zero", lambda c: ("dit.export", ["--dit", c.dit_ema, "--steps", "0", "--out", str(c.out / "b")]),
     "--steps"),
    # sample/generate.py (the embedded bundle unless --ckpt says otherwise)
    ("gen-num-zero", lambda c: gen(c, "--num", "0"), "--num"),
    ("gen-num-negative", lambda c: gen(c, "--num", "-3"), "--num"),
    ("gen-num-beyond-memory", lambda c: ("generate", ["--num", "100000", "--out", str(c.out / "g")]), "GiB"),
    ("gen-steps-huge", lambda c: gen(c, "--steps", "100000"), "--steps"),
    ("gen-steps-zero", lambda c: gen(c, "--steps", "0"), "--steps"),
    ("gen-decoder-steps-zero", lambda c: gen(c, "--decoder-steps", "0"), "--decoder-steps"),
    ("gen-cfg-nan", lambda c: gen(c, "--cfg", "nan"), "--cfg"),
    ("gen-cfg-inf", lambda c: gen(c, "--cfg", "inf"), "--cfg"),
    ("gen-cfg-negative", lambda c: gen(c, "--cfg", "-1"), "--cfg"),
    ("gen-scale-beyond-memory", lambda c: gen(c, "--scale", "2000"), "smaller --scale"),
    ("gen-scale-zero", lambda c: gen(c, "--scale", "0"), "--scale"),
    ("gen-seed-negative", lambda c: gen(c, "--seed", "-1"), "--seed"),
    ("gen-device-absent", lambda c: gen(c, "--device", "cuda:99"), "--device cuda:99"),
    ("gen-device-nonsense", lambda c: gen(c, "--device", "banana"), "--device"),
    ("gen-out-under-file", lambda c: ("generate", ["--class", "1", "--out", f"{c.a_file}/g"]), "is a file"),
    ("gen-class-out-of-range", lambda c: gen(c, "--class", "10"), "class 10 is outside"),
    ("gen-garbled-dit", lambda c: gen(c, "--ckpt", str(c.root / "garbled_dit")), "dit_ema.safetensors is damaged"),
    ("gen-garbled-decoder", lambda c: gen(c, "--ckpt", str(c.root / "garbled_decoder")),
     "decoder.safetensors is damaged"),
    ("gen-non-finite-images", lambda c: gen(c, "--ckpt", str(c.root / "nan"), "--out", str(c.out / "nan")),
     "non-finite"),
    ("gen-decoder-of-another-encoder", lambda c: gen(c, "--decoder", c.other_decoder), "another encoder"),
    # sample/sample_ddp.py: refused before a model is loaded or a sample written
    ("ddp-cfg-nan", lambda c: ddp(c, "--cfg", "nan"), "--cfg"),
    ("ddp-num-zero", lambda c: ddp(c, "--num-fid-samples", "0"), "--num-fid-samples"),
    ("ddp-batch-zero", lambda c: ddp(c, "--per-proc-batch-size", "0"), "--per-proc-batch-size"),
    ("ddp-steps-huge", lambda c: ddp(c, "--steps", "100000"), "--steps"),
    ("ddp-out-under-file", lambda c: ("sample_ddp", ["--out", f"{c.a_file}/s"]), "is a file"),
    # sample/reconstruct.py
    ("rec-size-zero", lambda c: rec(c, "--size", "0"), "--size"),
    ("rec-size-not-multiple", lambda c: rec(c, "--size", "100"), "multiple of 8"),
    ("rec-size-beyond-memory", lambda c: rec(c, "--size", "100000"), "smaller --size"),
    ("rec-steps-zero", lambda c: rec(c, "--steps", "0"), "--steps"),
    ("rec-steps-huge", lambda c: rec(c, "--steps", "100000"), "--steps"),
    ("rec-seed-negative", lambda c: rec(c, "--seed", "-1"), "--seed"),
    ("rec-out-under-file", lambda c: rec(c, "--out", f"{c.a_file}/r.png"), "is a file"),
    ("rec-out-not-an-image", lambda c: rec(c, "--out", str(c.out / "r.txt")), "image file name"),
    ("rec-missing-image", lambda c: rec(c, "--image", str(c.root / "none.png")), "none.png"),
]


def run_case(c, entry, args, capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        rc = ENTRIES[entry](args)
    except SystemExit as e:  # argparse's own refusals
        rc = e.code
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_bad_input_is_refused_in_one_line_and_changes_nothing(ctx, case, capsys, monkeypatch):
    name, make, needle = case
    # memory limits depend on the machine: pretend every machine has 16 GiB free, so each case is decided alike
    monkeypatch.setattr(devices, "available_memory", lambda device="cpu": 16 * 2**30)
    entry, args = make(ctx)
    kept = [*(ctx.root / name for name in ("tok", "dit", "garbled_dit", "nan", "other")), BUNDLE_DIR]
    before = snapshot(*kept)
    rc, err = run_case(ctx, entry, args, capsys)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert rc not in (0, None), (name, err)
    assert "Traceback" not in err, (name, err)
    assert lines and lines[-1].startswith("error:") and needle in lines[-1], (name, err)
    assert snapshot(*kept) == before, f"{name} changed files of an existing run or bundle"
    if name == "gen-non-finite-images":
        assert not (ctx.out / "nan").exists() or not os.listdir(ctx.out / "nan")  # nothing written
    if name.startswith("ddp-"):
        assert not (ctx.out / "fid").exists()  # refused before the sample folder is made


def test_the_catalogue_covers_the_reported_defects():
    ids = {case[0] for case in CASES}
    reported = {"tok-resume-other-architecture", "gen-garbled-dit", "gen-cfg-nan", "gen-cfg-inf",
                "export-decoder-of-another-encoder", "gen-out-under-file", "gen-device-absent", "rec-size-zero",
                "rec-steps-zero", "tok-lr-text", "tok-batch-zero", "tok-max-steps-negative", "gen-num-beyond-memory",
                "gen-steps-huge", "gen-scale-beyond-memory", "gen-non-finite-images", "tok-empty-class-folder",
                "tok-unreadable-image", "dit-no-cache-of-this-data", "cache-dir-of-other-data"}
    assert reported <= ids and len(CASES) >= 80


def test_config_errors_come_before_any_work(ctx, capsys):
    """A bad value stops the run before its directory, data or model is touched: no run folder appears."""
    rc, err = run_case(ctx, *tok(ctx, "run_name=fresh", "training.lr=abc"), capsys)
    assert rc == 2 and not (ctx.root / "tok" / "jobs" / "fresh").exists()
    rc, err = run_case(ctx, *dit(ctx, "run_name=fresh", "training.batch_size=0"), capsys)
    assert rc == 2 and not (ctx.root / "dit" / "jobs" / "fresh").exists()


def test_full_output_disk_is_one_line(ctx, capsys, monkeypatch):
    """A full disk while writing the images (generate.py, reconstruct.py): one line, no traceback."""
    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", disk_full)
    for entry, args in (gen(ctx, "--steps", "1", "--decoder-steps", "1", "--device", "cpu"), rec(ctx)):
        rc, err = run_case(ctx, entry, args, capsys)
        last = err.strip().splitlines()[-1]
        assert rc == 2 and "Traceback" not in err and last.startswith("error:") and "No space left" in last, err


def test_generation_shows_progress(ctx, capsys, tmp_path):
    rc, err = run_case(ctx, "generate", ["--class", "bag", "--num", "2", "--steps", "1", "--decoder-steps", "1",
                                         "--device", "cpu", "--out", str(tmp_path / "g")], capsys)
    # the DiT counts its sampler steps (1), the decoder its images (2)
    assert rc == 0 and "DiT: 100%" in err and "1/1 [" in err and "SSDD-XS 1-step (distilled): 100%" in err, err
    assert "2/2 [" in err and "step/s]" in err and "img/s]" in err, err


def test_every_config_key_has_a_rule():
    """The tables check every knob of their config file, and name no key the file lacks."""
    from omegaconf import OmegaConf

    from dit.config_checks import DIT_CHECKS
    from tokenizer.config_checks import SSDD_CHECKS

    def leaves(node, prefix=""):
        for k, v in node.items():
            if isinstance(v, dict):
                yield from leaves(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}"

    for file, checks in (("ssdd.yaml", SSDD_CHECKS), ("dit.yaml", DIT_CHECKS)):
        keys = set(leaves(OmegaConf.to_container(OmegaConf.load(os.path.join(ROOT, "configs", file)))))
        assert keys == set(checks.rules), (file, keys ^ set(checks.rules))
