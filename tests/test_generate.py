"""sample/generate.py and the generator API: a tiny bundle end to end, class names, repeatability, error paths."""

import json
import os

import numpy as np
import pytest
import torch
from helpers import make_dit, make_kl_decoder, make_tokenizer
from PIL import Image

from dit.export import main as export_main
from dit.pipeline import BUNDLE_DIR, Generator, load_generator
from sample import generate
from tokenizer import UserError


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A random DiT + random tokenizer exported as a bundle (fp16), as python -m dit.export writes it."""
    tmp = tmp_path_factory.mktemp("gen")
    tok = make_tokenizer(tmp / "tok")
    dit = make_dit(tmp / "dit.safetensors", tok)
    out = tmp / "bundle"
    # the DiT must come from this tokenizer's encoder: give it the real hash
    from tokenizer import SSDD
    from tokenizer.common.checkpoint import read_weights, save_weights

    state, meta = read_weights(dit)
    meta["encoder_sha256"] = SSDD.from_checkpoint(tok).encoder_sha256()
    save_weights(state, dit, meta)
    assert export_main(["--dit", dit, "--out", str(out), "--steps", "2", "--cfg", "3"]) == 0
    return out, tok, dit


def test_export_writes_fp16_bundle(bundle):
    out, tok, dit = bundle
    info = json.load(open(out / "bundle.json"))
    assert sorted(os.listdir(out)) == ["bundle.json", "decoder.safetensors", "dit_ema.safetensors"]
    assert info["sample"]["steps"] == 2 and info["sample"]["cfg_scale"] == 3.0 and info["sample"]["method"] == "euler"
    assert info["dit"]["class_names"][7] == "sneaker" and info["latent_shape"] == [4, 4, 4]
    assert info["decoder"]["single_step"] is False and info["decoder"]["default_steps"] == 8
    from safetensors.torch import load_file

    assert all(v.dtype == torch.float16 for v in load_file(out / "dit_ema.safetensors").values())
    dec = load_file(out / "decoder.safetensors")
    assert all(k.startswith("decoder.") and v.dtype == torch.float16 for k, v in dec.items())


def test_export_extra_decoders(bundle, tmp_path, capsys):
    out, tok, dit = bundle
    kl_path = make_kl_decoder(tmp_path, encoder_from=tok)  # the KL-VAE baseline on the same encoder
    dest = tmp_path / "b"
    assert export_main(["--dit", dit, "--out", str(dest), "--decoder-steps", "1", "--extra-decoder",
                        f"SSDD-XS 4-step (teacher)={tok}:4", "--extra-decoder", f"KL-VAE={kl_path}"]) == 0
    assert "plus 2 extra decoder(s)" in capsys.readouterr().out
    info = json.load(open(dest / "bundle.json"))
    listed = [(d["name"], d["file"], d["steps"]) for d in info["decoders"]]
    assert listed == [("SSDD-XS 1-step", "decoder.safetensors", 1),
                      ("SSDD-XS 4-step (teacher)", "decoder_ssdd_xs_4_step_teacher.safetensors", 4),
                      ("KL-VAE", "decoder_kl_vae.safetensors", 1)]
    from safetensors.torch import load_file

    from tokenizer.common.checkpoint import sha256_file

    for d in info["decoders"]:
        assert d["sha256"] == sha256_file(str(dest / d["file"])) == info["files"][d["file"]]["sha256"]
        assert all(v.dtype == torch.float16 for v in load_file(dest / d["file"]).values())
        assert "matches" in d["encoder_check"]
    gen = load_generator(str(dest), device="cpu")
    assert gen.decoder_names == [n for n, _, _ in listed] and gen.decoders["SSDD-XS 4-step (teacher)"][1] == 4
    images, t = gen.compare([7], num=1, seed=0, steps=1)
    assert len(images) == 3 and t["decoders"]["KL-VAE"]["decoder_steps"] == 1
    # the extra decoders' re-export from the bundle's own decoder-only files is checked by their recorded hash
    assert export_main(["--dit", dit, "--out", str(tmp_path / "c"), "--extra-decoder",
                        f"again={dest / 'decoder_kl_vae.safetensors'}"]) == 0
    other = make_tokenizer(tmp_path / "other", seed=3)
    assert export_main(["--dit", dit, "--out", str(tmp_path / "d"), "--extra-decoder", f"x={other}"]) == 2
    assert "another encoder" in capsys.readouterr().err
    assert export_main(["--dit", dit, "--out", str(tmp_path / "d"), "--extra-decoder", "no-equals-sign"]) == 2
    assert "NAME=CKPT" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "d")  # refused before anything is written


def test_export_refuses_decoder_of_another_encoder(bundle, tmp_path, capsys):
    out, tok, dit = bundle
    other = make_tokenizer(tmp_path / "other", seed=3)
    assert export_main(["--dit", dit, "--decoder", other, "--out", str(tmp_path / "b")]) == 2
    assert "another encoder" in capsys.readouterr().err


def test_generate_end_to_end(bundle, tmp_path, capsys):
    out, _, _ = bundle
    dest = tmp_path / "png"
    rc = generate.main(["--ckpt", str(out), "--class", "Sneaker", "9", "--num", "2", "--seed", "1", "--out", str(dest),
                        "--scale", "1"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "DiT" in printed and "decoder SSDD-XS 8-step: " in printed
    assert " s for 4 latents (euler, 2 steps, cfg 3)" in printed
    assert "(8 steps)" in printed  # the multi-step decoder's default when the bundle does not set decoder steps
    singles = sorted(p for p in os.listdir(dest) if p != "grid.png")
    assert singles == ["0007_sneaker_0.png", "0007_sneaker_1.png", "0009_ankle-boot_0.png", "0009_ankle-boot_1.png"]
    assert Image.open(dest / "grid.png").size == (2 + 2 * 34, 2 + 2 * 34)  # 2 columns x 2 rows of 32 px, 2-px gaps
    assert Image.open(dest / "0007_sneaker_0.png").size == (32, 32)


def test_generator_api_repeats_with_seed(bundle):
    out, _, _ = bundle
    gen = load_generator(str(out), device="cpu")
    assert isinstance(gen, Generator) and gen.class_names[0] == "t-shirt/top" and gen.num_classes == 10
    assert gen.resolve_classes(["ANKLE BOOT", 3, "7"]) == [9, 3, 7]
    a, t = gen.generate([7, 9], num=2, seed=5, steps=2, decoder_steps=1)
    b, _ = gen.generate([7, 9], num=2, seed=5, steps=2, decoder_steps=1)
    c, _ = gen.generate([7, 9], num=2, seed=6, steps=2, decoder_steps=1)
    assert a.shape == (4, 3, 32, 32) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert t["decoder_steps"] == 1 and t["dit_s"] > 0 and t["decoder_s"] > 0
    # the class changes the DiT's output (so the labels reach the model)
    d, _ = gen.generate([8, 9], num=2, seed=5, steps=2, decoder_steps=1)
    assert not torch.equal(a[:2], d[:2]) and torch.equal(a[2:], d[2:])


def test_imagenet_names_for_1000_class_models(tmp_path):
    tok = make_tokenizer(tmp_path / "tok")
    dit = make_dit(tmp_path / "d.safetensors", tok, num_classes=1000,
                   class_names=[f"n{i:08d}" for i in range(1000)])
    gen = load_generator(dit, device="cpu")  # decoder from the tokenizer named in the metadata
    assert gen.resolve_classes(["golden retriever", "Tabby", 0]) == [207, 281, 0]
    assert gen.class_name(207) == "golden retriever"


def _one_line_error(capsys):
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err, err
    return err


def test_errors_are_one_line_with_choices(bundle, tmp_path, capsys):
    out, _, _ = bundle
    base = ["--ckpt", str(out), "--out", str(tmp_path / "o"), "--steps", "1", "--decoder-steps", "1"]
    assert generate.main([*base, "--class", "10"]) == 2
    err = _one_line_error(capsys)
    assert "class 10 is outside" in err and "0..9" in err and "'sneaker'" in err
    assert generate.main([*base, "--class", "snekaer"]) == 2
    err = _one_line_error(capsys)
    assert "unknown class name 'snekaer'" in err and "did you mean 'sneaker'" in err and "(10 classes)" in err
    assert generate.main([*base, "--class", "sneaker", "--num", "0"]) == 2
    _one_line_error(capsys)
    assert generate.main(["--ckpt", str(tmp_path / "nowhere"), "--class", "1"]) == 2
    assert "not found" in _one_line_error(capsys)
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(os.urandom(300))
    assert generate.main(["--ckpt", str(bad), "--class", "1"]) == 2
    assert "cannot read" in _one_line_error(capsys)
    assert not os.path.exists(tmp_path / "o")  # nothing written on error


def test_unknown_imagenet_name_lists_a_short_list_and_count(tmp_path):
    from tokenizer.common.errors import UserError

    tok = make_tokenizer(tmp_path / "tok")
    gen = load_generator(make_dit(tmp_path / "d.safetensors", tok, num_classes=1000, class_names=[]), device="cpu")
    with pytest.raises(UserError) as e:
        gen.resolve_classes(["golden retreiver"])
    msg = str(e.value)
    assert "did you mean 'golden retriever'" in msg and "(1000 classes in all)" in msg and len(msg) < 600


def test_generation_eval_writes_report(bundle, tmp_path):
    """eval/generation.py end to end with a random classifier (the numbers are meaningless, the plumbing is not)."""
    import eval.generation as generation
    import eval.lib.fmnist_classifier as fc  # a plain import: a moved module must fail here, not skip
    from tokenizer.common.checkpoint import save_weights

    torch.manual_seed(0)
    clf = tmp_path / "clf.safetensors"
    save_weights(fc.FMNISTClassifier(), str(clf))
    out, _, _ = bundle
    dest = str(tmp_path / "report" / "gen")
    assert generation.main(["--ckpt", str(out), "--per-class", "3", "--cfg", "1", "2", "--steps", "1",
                            "--decoder-steps", "1", "--classifier", str(clf), "--real-images", "300",
                            "--out", dest]) == 0
    r = json.load(open(dest + ".json"))
    assert [s["cfg_scale"] for s in r["scales"]] == [1.0, 2.0] and r["per_class"] == 3
    assert r["real"]["n_test"] == 300 and r["real"]["n_reference"] == 30 and 0 <= r["real"]["test_accuracy"] <= 1
    for s in r["scales"]:
        assert len(s["per_class"]) == 10 and 0 <= s["accuracy"] <= 1 and s["fd"] >= 0
        assert s["accuracy"] == pytest.approx(sum(s["per_class"]) / 10)  # 3 samples of every class
    assert r["best_fd_cfg"] in (1.0, 2.0) and r["decoder_steps"] == 1 and r["dit_model"] == "DiT-Ti/1"
    md = open(dest + ".md").read()
    assert "| 2 " in md and "ankle boot" in md and "gen.png" in md
    assert Image.open(dest + ".png").size == (3 * 33 + 1, 10 * 33 + 1)  # 3 per class, one row per class


def test_embedded_bundle_works_out_of_the_box(tmp_path, capsys):
    info = json.load(open(BUNDLE_DIR / "bundle.json"))
    default = sum(os.path.getsize(BUNDLE_DIR / name) for name in ("dit_ema.safetensors", "decoder.safetensors"))
    assert default <= 25 * 10**6, default  # the repository's size limit for the embedded default
    assert sorted(os.listdir(BUNDLE_DIR)) == sorted(["bundle.json", *info["files"]])  # extra decoders are listed
    from tokenizer.common.checkpoint import sha256_file

    for name, entry in info["files"].items():  # the committed files are the ones bundle.json describes
        assert sha256_file(str(BUNDLE_DIR / name)) == entry["sha256"], name
    rc = generate.main(["--class", "sneaker", "--num", "1", "--steps", "2", "--decoder-steps", "1",
                        "--out", str(tmp_path / "g"), "--device", "cpu"])
    assert rc == 0
    assert "7 (sneaker)" in capsys.readouterr().out
    assert os.path.exists(tmp_path / "g" / "0007_sneaker_0.png")


def test_embedded_bundle_offers_teacher_and_kl_and_compares_on_request(tmp_path, capsys):
    """The embedded bundle carries the distilled decoder (the default), its 8-step teacher and the KL-VAE; a plain
    run decodes with the default only, --compare with all three, side by side."""
    gen = load_generator(device="cpu")
    assert gen.decoder_names == ["SSDD-XS 1-step (distilled)", "SSDD-XS 8-step (teacher)", "KL-VAE"]
    assert [steps for _, steps in gen.decoders.values()] == [1, 8, 1]
    rc = generate.main(["--class", "bag", "--num", "1", "--steps", "2", "--out", str(tmp_path / "c"), "--compare",
                        "--device", "cpu"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert all(f"decoder {name}:" in printed for name in gen.decoder_names)
    assert sorted(p for p in os.listdir(tmp_path / "c") if p != "grid.png") == [
        "kl-vae", "ssdd-xs-1-step-distilled", "ssdd-xs-8-step-teacher"]


def test_compare_decodes_the_same_latents_with_every_decoder(tmp_path):
    tok = make_tokenizer(tmp_path / "tok")
    dit = make_dit(tmp_path / "dit.safetensors", tok)
    kl_path = make_kl_decoder(tmp_path / "kl")  # a second decoder of the same latents: the KL-VAE baseline
    gen = load_generator(dit, device="cpu", decoder=[tok, kl_path])
    assert gen.decoder_names == ["SSDD-XS 8-step", "KL-VAE"]
    images, t = gen.compare(["sneaker", 0], num=2, seed=3, steps=2)
    assert set(images) == set(gen.decoder_names) and t["decoders"]["KL-VAE"]["decoder_steps"] == 1
    assert all(im.shape == (4, 3, 32, 32) for im in images.values())
    assert not torch.equal(images["SSDD-XS 8-step"], images["KL-VAE"])
    # the default decoder's images are generate()'s, and the KL-VAE's are a decode of the very same latents
    alone, _ = gen.generate(["sneaker", 0], num=2, seed=3, steps=2)
    assert torch.equal(alone, images["SSDD-XS 8-step"])
    y = torch.tensor([7, 7, 0, 0])
    noise, dec_noise = gen.draw_noise(4, seed=3)
    z, _ = gen.sample_latents(y, noise, gen.sampler_settings(steps=2), seed=3)
    assert torch.equal(gen.decode(z, dec_noise, "KL-VAE")[0], images["KL-VAE"])
    with pytest.raises(UserError, match="offers"):
        gen.decode(z, dec_noise, "nope")


def test_embedded_bundle_makes_grey_images(tmp_path):
    """The embedded generator learnt Fashion-MNIST, grey images: bundle.json says so (image_channels 1), and every
    decoder's samples are grey exactly (R = G = B), the mean of the decoder's three channels."""
    info = json.load(open(BUNDLE_DIR / "bundle.json"))
    assert info["image_channels"] == 1 and info["dataset"] == "fmnist"
    gen = load_generator(device="cpu")
    assert gen.image_channels == 1
    by_decoder, _ = gen.compare([7, 2], num=2, seed=0, steps=2)
    for name, images in by_decoder.items():
        assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 1], images[:, 2]), name
    # grey(colour output) == grey output: only the channels' mean, nothing else changed
    colour = Generator(**{**gen.__dict__, "image_channels": 3})
    default = gen.decoder_names[0]
    grey, _ = gen.generate([7], num=3, seed=4, steps=2)
    rgb, _ = colour.generate([7], num=3, seed=4, steps=2)
    assert not torch.equal(rgb[:, 0], rgb[:, 1])  # the decoder alone tints the images
    assert torch.equal(grey, rgb.mean(1, keepdim=True).expand_as(rgb)), default
    # and so are the PNGs that generate.py writes
    assert generate.main(["--class", "bag", "--num", "2", "--steps", "2", "--out", str(tmp_path / "g"),
                          "--device", "cpu"]) == 0
    for name in ("0008_bag_0.png", "0008_bag_1.png", "grid.png"):
        pixels = np.asarray(Image.open(tmp_path / "g" / name))
        assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all(), name


def test_export_records_the_data_channels(bundle, tmp_path):
    """bundle.json image_channels: 1 for a DiT of Fashion-MNIST (no latent cache to ask), or as --image-channels
    says; a generator of colour data keeps its colours."""
    out, tok, dit = bundle
    assert json.load(open(out / "bundle.json"))["image_channels"] == 1  # make_dit's metadata: dataset fmnist
    assert export_main(["--dit", dit, "--out", str(tmp_path / "rgb"), "--image-channels", "3"]) == 0
    assert json.load(open(tmp_path / "rgb" / "bundle.json"))["image_channels"] == 3
    colour = load_generator(str(tmp_path / "rgb"), device="cpu")
    images, _ = colour.generate([7], num=2, seed=0, steps=1, decoder_steps=1)
    assert colour.image_channels == 3 and not torch.equal(images[:, 0], images[:, 1])


def test_class_strings_that_are_not_ascii_ids_are_names_and_long_ones_are_cut():
    """'--5', '²', '١' are not ids (so they are unknown names, one line); a 5,000-digit id is out of range without
    int() of the whole string; a long name is echoed cut short."""
    from dit.class_names import resolve_class_ids

    names = [f"c{i}" for i in range(10)]
    assert resolve_class_ids(["3", 4, "07", "c2"], names, 10) == [3, 4, 7, 2]
    for spec in ("--5", "²", "١", True):
        with pytest.raises(UserError, match="unknown class name"):
            resolve_class_ids([spec], names, 10)
    with pytest.raises(UserError, match="outside this model's classes") as e:
        resolve_class_ids(["9" * 5000], names, 10)
    assert len(str(e.value)) < 100
    with pytest.raises(UserError) as e:
        resolve_class_ids(["x" * 100_000], names, 10)
    assert len(str(e.value)) < 400
