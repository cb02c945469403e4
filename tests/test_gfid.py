"""eval/gfid.py and eval/lib/adm_npz.py: the Fréchet distance, IS, ADM precision/recall, the ADM batch format, and the
whole command against torch-fidelity with a randomly initialised Inception (made at test time, never downloaded)."""

import json
import os
import re

import numpy as np
import pytest
import torch
from helpers import CLASSES, ROOT, make_folder
from PIL import Image

import eval.gfid as gfid_cli
from eval.lib.adm_npz import NpzImages, write_sample_batch
from eval.lib.gfid import (
    FEATURE_DIM,
    ImageSource,
    InceptionFeatures,
    center_crop,
    compare,
    extract,
    frechet_distance,
    gaussian,
    inception_score,
    manifold_radii,
    precision_recall,
    small_set_warning,
)
from tokenizer.common.errors import UserError


def _stats(x):
    return gaussian(np.asarray(x, np.float32))


# ----------------------------------------------------------------------------------------------------- statistics


def test_gaussian_is_numpy_mean_and_unbiased_cov_in_float64():
    f = np.random.default_rng(0).normal(size=(257, 12)).astype(np.float32)
    mu, sigma = gaussian(f, block=50)  # several blocks
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    np.testing.assert_allclose(mu, f.astype(np.float64).mean(0), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(sigma, np.cov(f.astype(np.float64), rowvar=False), rtol=1e-10, atol=1e-12)


def test_frechet_distance_matches_torch_fidelity_and_a_closed_form():
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(400, 32)), rng.normal(size=(300, 32)) * 1.5 + 0.3
    (ma, sa), (mb, sb) = _stats(a), _stats(b)
    theirs = fid_statistics_to_metric({"mu": ma, "sigma": sa}, {"mu": mb, "sigma": sb}, False)[KEY_METRIC_FID]
    assert frechet_distance(ma, sa, mb, sb) == pytest.approx(theirs, rel=1e-9)
    # closed form for commuting covariances: |dmu|^2 + sum (sqrt(s1) - sqrt(s2))^2
    s1, s2 = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 4.0, 1.0])
    assert frechet_distance(np.zeros(3), s1, np.ones(3), s2) == pytest.approx(3 + 1 + 0 + 4, rel=1e-12)


def test_frechet_distance_never_nan_on_singular_covariances():
    rng = np.random.default_rng(2)
    few, other = rng.normal(size=(10, 64)), rng.normal(size=(10, 64)) + 0.5  # rank 9 in 64 dimensions
    (m1, s1), (m2, s2) = _stats(few), _stats(other)
    d = frechet_distance(m1, s1, m2, s2)
    assert np.isfinite(d) and d > 0
    assert abs(frechet_distance(m1, s1, m1, s1)) < 1e-4  # identical: ~0 despite rank deficiency
    zero = np.zeros((64, 64))  # a degenerate set (all images equal)
    assert np.isfinite(frechet_distance(m1, zero, m2, s2))
    with pytest.raises(UserError, match="NaN or inf"):
        frechet_distance(m1, s1 * np.nan, m2, s2)
    with pytest.raises(UserError, match="different dimensions"):
        frechet_distance(m1, s1, m2[:3], s2[:3, :3])


def test_inception_score_of_known_predictions():
    sure = np.full((100, 10), -50.0)
    sure[np.arange(100), np.arange(100) % 10] = 50.0  # confident and spread evenly over 10 classes
    mean, std = inception_score(sure, splits=10)
    assert mean == pytest.approx(10.0, rel=1e-6) and std == pytest.approx(0, abs=1e-6)
    assert inception_score(np.zeros((100, 10)))[0] == pytest.approx(1.0)  # uniform predictions: IS 1
    # consecutive splits as ADM: a split that only holds class 0 scores 1
    grouped = np.full((20, 10), -50.0)
    grouped[np.arange(20), np.repeat([0, 1], 10)] = 50.0
    assert inception_score(grouped, splits=2)[0] == pytest.approx(1.0, rel=1e-6)
    with pytest.raises(UserError, match="at least 10"):
        inception_score(np.zeros((5, 10)))


def test_precision_recall_follow_the_adm_manifolds():
    # 1-D: reference 0, 1, 2, 3, 10 -> 3rd-neighbour squared radii (the point itself is the 0th): 9, 4, 4, 9, 81
    ref = np.array([[0.0], [1.0], [2.0], [3.0], [10.0]], np.float32)
    radii = manifold_radii(torch.from_numpy(ref), k=3, block=2, fp16=False)
    assert radii.tolist() == [9.0, 4.0, 4.0, 9.0, 81.0]
    samples = np.array([[2.5], [18.0], [19.0], [40.0], [41.0]], np.float32)
    # precision: 2.5 (0.25 from 2), 18 (64 <= 81 from 10) and 19 (81 <= 81: the boundary counts) are inside,
    # 40 and 41 are not -> 3/5; the sample at 2.5 has radius 37.5^2 and covers every reference point -> recall 1
    p, r = precision_recall(ref, samples, k=3, fp16=False, block=3)
    assert (p, r) == (pytest.approx(0.6), pytest.approx(1.0))
    assert precision_recall(samples, ref, k=3, fp16=False) == (pytest.approx(1.0), pytest.approx(0.6))  # swapped
    f = np.random.default_rng(3).normal(size=(60, 8)).astype(np.float32)
    assert precision_recall(f, f) == (1.0, 1.0)
    assert precision_recall(f, f + 100) == (0.0, 0.0)
    with pytest.raises(UserError, match="more than 3"):
        precision_recall(f[:3], f)


# ----------------------------------------------------------------------------------------------------- ADM batches


def _images(n, seed, size=32):
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def test_adm_npz_round_trips_streamed(tmp_path):
    x, labels = _images(7, 0), np.arange(7) % 3
    path = str(tmp_path / "s.npz")
    write_sample_batch(path, iter(x), 7, (32, 32, 3), labels)  # one image at a time
    with np.load(path) as z:  # what np.load (and the ADM evaluator) reads
        assert sorted(z.files) == ["arr_0", "arr_1"]
        assert z["arr_0"].dtype == np.uint8 and np.array_equal(z["arr_0"], x) and np.array_equal(z["arr_1"], labels)
    npz = NpzImages(path)
    assert len(npz) == 7 and npz.stats is None and np.array_equal(npz.labels, labels)
    assert np.array_equal(np.concatenate(list(npz.batches(3))), x)
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    with pytest.raises(ValueError, match="announced"):
        write_sample_batch(str(tmp_path / "short.npz"), iter(x[:5]), 7, (32, 32, 3))
    assert not os.path.exists(tmp_path / "short.npz")
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]  # nor its temporary


def test_adm_npz_rejects_what_is_not_a_batch(tmp_path):
    np.savez(tmp_path / "float.npz", np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(UserError, match="uint8"):
        NpzImages(str(tmp_path / "float.npz"))
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(UserError, match="neither images"):
        NpzImages(str(tmp_path / "other.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="cannot read"):
        NpzImages(str(tmp_path / "junk.npz"))
    np.savez(tmp_path / "stats.npz", mu=np.zeros(4), sigma=np.eye(4))  # statistics only: allowed
    assert NpzImages(str(tmp_path / "stats.npz")).stats["sigma"].shape == (4, 4)


def test_image_sources_folder_npz_and_dataset_split(tmp_path):
    x = _images(5, 1)
    folder = tmp_path / "png"
    folder.mkdir()
    for i, im in enumerate(x):
        Image.fromarray(im).save(folder / f"{i:03d}.png")
    write_sample_batch(str(tmp_path / "x.npz"), [x], 5, (32, 32, 3))
    for spec in (str(folder), str(tmp_path / "x.npz")):
        src = ImageSource(spec)
        assert src.count == 5 and np.array_equal(np.concatenate(list(src.batches(2))), x)
    data = ImageSource(os.path.join(ROOT, "configs", "fmnist.yaml") + ":test")
    first = next(data.batches(4))
    assert data.split == "test" and first.shape == (4, 32, 32, 3) and first.dtype == np.uint8
    assert (first[:, :2] == 0).all()  # the 2-px padding of the 28-px images is background (-1 -> 0)
    Image.fromarray(_images(1, 2, size=16)[0]).save(folder / "999.png")
    with pytest.raises(UserError, match="differ in size"):
        list(ImageSource(str(folder)).batches(10))
    with pytest.raises(UserError, match="neither"):
        ImageSource(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images .* in .*empty nor in its sub-folders"):
        ImageSource(str(tmp_path / "empty"))


def test_a_class_folder_tree_gives_every_image_of_every_class(tmp_path, capsys):
    """<root>/val of the ImageNet layout (PNG and JPEG of a few sizes, .JPEG in capitals): every image of every class
    folder, in class order; images of several sizes need --image-size, asked for before any work."""
    root = make_folder(tmp_path / "photos", train=1, val=6)
    (root / "val" / "owl" / "notes.txt").write_text("not an image")  # other files are not images
    (root / "val" / "owl" / "deeper").mkdir()
    Image.new("RGB", (40, 36), (255, 0, 0)).save(root / "val" / "owl" / "deeper" / "zz.png")  # any depth
    with pytest.raises(UserError, match=r"images differ in size \(.*\); pass --image-size N"):
        ImageSource(str(root / "val"))
    tree = ImageSource(str(root / "val"), image_size=16)
    assert tree.count == 4 * 6 + 1 and tree.classes == CLASSES
    assert "image folder, 4 sub-folders, 25 images, brought to 16x16" in tree.describe()
    x = np.concatenate(list(tree.batches(7)))
    assert x.shape == (25, 16, 16, 3) and x.dtype == np.uint8
    # make_folder fills class c with grey 40 + 50 c: the images come class by class, each class's files sorted
    levels = [int(round(im.mean())) for im in x[:24]]
    assert levels == [40 + 50 * c for c in range(4) for _ in range(6)], levels
    assert x[24].reshape(-1, 3).mean(0).round().tolist() == [255, 0, 0]  # owl/deeper/zz.png comes last
    # the whole command reads the tree too (here it stops at the missing weights, after the sources were read)
    out = tmp_path / "r.json"
    assert gfid_cli.main([str(root / "val"), str(root / "val"), "--image-size", "16", "--inception-weights",
                          str(tmp_path / "none.pth"), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert "image folder, 4 sub-folders, 25 images" in captured.out and "none.pth" in captured.err
    assert captured.err.count("warning: ") == 2 and not out.exists()


def test_center_crop_resizes_the_shorter_side_and_keeps_the_centre():
    a = np.zeros((60, 100, 3), np.uint8)  # H 60, W 100: left 50 columns black, right 50 white
    a[:, 50:] = 255
    out = center_crop(Image.fromarray(a), 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert (out[:, :6] < 10).all() and (out[:, -6:] > 245).all()  # the centre of the image, black | white
    same = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    assert np.array_equal(center_crop(Image.fromarray(same), 16), same)  # already N x N: unchanged
    tall = center_crop(Image.new("RGB", (20, 90), (7, 8, 9)), 8)
    assert tall.shape == (8, 8, 3) and (tall == [7, 8, 9]).all()


def test_a_bad_folder_is_refused_before_any_work_and_changes_nothing(tmp_path, capsys):
    """Unreadable files, folders without images and bad sizes: one line, before Inception is loaded; an earlier
    result at --out stays as it was."""
    good = make_folder(tmp_path / "good", train=1, val=2)
    corrupt = make_folder(tmp_path / "corrupt", train=1, val=2)
    (corrupt / "val" / "dog" / "zz.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "r.json"
    out.write_text('{"fid": 1.0}')
    before = (out.read_bytes(), out.stat().st_mtime_ns)
    (tmp_path / "nothing" / "cat").mkdir(parents=True)
    cases = [(str(corrupt / "val"), "cannot read image .*zz.png"), (str(tmp_path / "nothing"), "no images"),
             (str(good / "val"), "images differ in size"), (str(tmp_path / "missing"), "neither an image folder")]
    for ref, message in cases:
        args = [ref, str(good / "val"), "--inception-weights", str(tmp_path / "none.pth"), "--out", str(out)]
        if "differ" not in message:
            args += ["--image-size", "16"]
        assert gfid_cli.main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err and re.search(message, err), (ref, err)
        assert "none.pth" not in err  # refused before the (missing) Inception weights were looked for
    assert gfid_cli.main([str(good / "val"), str(good / "val"), "--image-size", "0"]) == 2
    assert "--image-size must be a positive" in capsys.readouterr().err
    assert (out.read_bytes(), out.stat().st_mtime_ns) == before


def test_small_sets_are_warned_about():
    class Source:  # what small_set_warning reads of an ImageSource
        def __init__(self, count, stats=None):
            self.count, self.stats = count, stats

        fid_from_images = ImageSource.fid_from_images

    line = small_set_warning(Source(64), "samples")
    assert line.startswith("samples: 64 images for 2,048-dimensional") and "singular" in line and "\n" not in line
    assert small_set_warning(Source(FEATURE_DIM), "reference") is not None  # rank 2,047 < 2,048: still singular
    assert small_set_warning(Source(FEATURE_DIM + 1), "samples") is None
    stats = {"mu": np.zeros(FEATURE_DIM), "sigma": np.eye(FEATURE_DIM)}
    assert small_set_warning(Source(100, stats), "reference") is None  # FID from its precomputed statistics


def test_config_split_form_and_help_explain_themselves(tmp_path, capsys):
    """CONFIG.yaml:SPLIT as --help explains it: a file with a dataset section gives that split of the folder, as the
    tokenizer's evaluation prepares it."""
    root = make_folder(tmp_path / "photos", train=1, val=3)
    (tmp_path / "mine.yaml").write_text(f"dataset: {{root: {root}, im_size: 32}}\n")
    src = ImageSource(str(tmp_path / "mine.yaml") + ":val")
    assert src.split == "val" and src.count == 12 and "dataset split val, 12 images" in src.describe()
    x = np.concatenate(list(src.batches(5)))
    assert x.shape == (12, 32, 32, 3) and int(round(x[0].mean())) == 40  # cat: grey 40, centre-cropped
    assert ImageSource(str(tmp_path / "mine.yaml")).split == "val"  # default: the config's eval.split
    with pytest.raises(SystemExit):
        gfid_cli.main(["--help"])
    text = capsys.readouterr().out
    for needle in ("class-folder tree", "CONFIG.yaml[:SPLIT]", "configs/fmnist.yaml:test", "mine.yaml:val",
                   "--image-size N", "precomputed mu/sigma", "2,048", '"warnings"', ".webp"):
        assert needle in text, needle


# ----------------------------------------------------------------------------------------------------- with Inception


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two folders of the same 20 images (32 px, upsampled by the extractor) and one shifted in colour."""
    root = tmp_path_factory.mktemp("gfid")
    x = (np.random.default_rng(4).random((20, 32, 32, 3)) * 160).astype(np.uint8)
    for name, imgs in (("a", x), ("a2", x), ("shifted", (x.astype(int) + 90).clip(0, 255).astype(np.uint8))):
        (root / name).mkdir()
        for i, im in enumerate(imgs):
            Image.fromarray(im).save(root / name / f"{i:03d}.png")
    return root, x


@pytest.mark.slow
def test_gfid_against_torch_fidelity_and_adm_npz(folders, inception_file, tmp_path, capsys):
    import torch_fidelity

    root, x = folders
    inception = InceptionFeatures(str(inception_file))
    feats = {n: extract(ImageSource(str(root / n)), inception, 8) for n in ("a", "shifted")}
    same = compare(feats["a"], feats["a"])
    assert abs(same["fid"]) < 1e-3 and abs(same["sfid"]) < 1e-3
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    assert feats["a"]["spatial"].shape == (20, 17 * 17 * 7) and feats["a"]["logits"].shape == (20, 1008)

    out = tmp_path / "r.json"
    assert gfid_cli.main([str(root / "a"), str(root / "shifted"), "--inception-weights", str(inception_file),
                          "--out", str(out), "--batch-size", "8"]) == 0
    captured = capsys.readouterr()
    line = captured.out.strip().splitlines()[-1]
    assert line.startswith("FID ") and "sFID" in line and "precision" in line
    assert "warning: reference: 20 images" in captured.err and "warning: samples: 20 images" in captured.err
    r = json.load(open(out))
    assert set(r) >= {"fid", "sfid", "inception_score", "precision", "recall", "kid", "notes", "command", "warnings"}
    assert [w.split(":")[0] for w in r["warnings"]] == ["reference", "samples"]
    assert r["fid"] > 1.0 + 100 * abs(same["fid"]) and r["sfid"] > 0 and r["n_samples"] == 20
    assert any("mixed_6/conv" in n for n in r["notes"])
    theirs = torch_fidelity.calculate_metrics(input1=str(root / "shifted"), input2=str(root / "a"), fid=True,
                                              feature_extractor_weights_path=str(inception_file), cuda=False,
                                              save_cpu_ram=True, verbose=False, batch_size=8)
    assert r["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-5)

    # an ADM .npz of the same images gives the same features, and its precomputed mu/sigma give the same FID
    npz_path = str(tmp_path / "a.npz")
    write_sample_batch(npz_path, [x], 20, (32, 32, 3))
    from_npz = extract(ImageSource(npz_path), inception, 8)
    assert all(np.array_equal(from_npz[k], feats["a"][k]) for k in feats["a"])
    (mu, sigma), (mu_s, sigma_s) = gaussian(feats["a"]["pool"]), gaussian(feats["a"]["spatial"])
    with_stats = str(tmp_path / "ref_with_stats.npz")
    np.savez(with_stats, x, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    assert ImageSource(with_stats).stats is not None
    out2 = tmp_path / "r2.json"
    assert gfid_cli.main([with_stats, str(root / "shifted"), "--inception-weights", str(inception_file),
                          "--out", str(out2), "--batch-size", "8"]) == 0
    r2 = json.load(open(out2))
    assert r2["fid"] == pytest.approx(r["fid"], rel=1e-9) and r2["sfid"] == pytest.approx(r["sfid"], rel=1e-9)
    assert r2["precision"] == r["precision"] and any("precomputed" in n for n in r2["notes"])
    assert [w.split(":")[0] for w in r2["warnings"]] == ["samples"]  # the reference's FID comes from its mu/sigma

    # a class-folder tree of the same images (10 per class folder) gives the same features, in the same order
    tree = tmp_path / "tree"
    for i, im in enumerate(x):
        (tree / f"class{i // 10}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(tree / f"class{i // 10}" / f"{i:03d}.png")
    from_tree = extract(ImageSource(str(tree)), inception, 8)
    assert all(np.array_equal(from_tree[k], feats["a"][k]) for k in feats["a"])


def test_gfid_without_weights_is_one_line(tmp_path, capsys):
    folder = tmp_path / "f"
    folder.mkdir()
    Image.fromarray(_images(1, 0)[0]).save(folder / "0.png")
    assert gfid_cli.main([str(folder), str(folder), "--inception-weights", str(tmp_path / "none.pth")]) == 2
    *warnings, err = capsys.readouterr().err.strip().splitlines()
    assert err.startswith("error:") and "none.pth" in err
    assert [w.split(":")[:2] for w in warnings] == [["warning", " reference"], ["warning", " samples"]]  # 1 image each


def test_compare_reports_what_it_cannot_compute():
    rng = np.random.default_rng(5)

    def feats(n):
        return {"pool": rng.normal(size=(n, 16)).astype(np.float32),
                "spatial": rng.normal(size=(n, 8)).astype(np.float32), "logits": rng.normal(size=(n, 10))}

    r = compare(feats(6), feats(3))  # too few samples for IS splits and 3-NN balls
    assert np.isfinite(r["fid"]) and r["inception_score"] is None and r["precision"] is None and r["kid"] is not None
    assert any(n.startswith("inception_score not computed") for n in r["notes"])
    assert any(n.startswith("precision and recall not computed") for n in r["notes"])
    only_stats = {"mu": np.zeros(16), "sigma": np.eye(16)}  # a reference of statistics only: no sFID, P/R, KID
    r = compare(None, feats(20), ref_stats=only_stats)
    assert r["fid"] is not None and r["sfid"] is None and r["recall"] is None and r["kid"] is None
