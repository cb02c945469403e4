"""Generation metrics the way papers report them (the ADM evaluator's conventions), in PyTorch: FID, sFID, Inception
Score, precision and recall, and KID. The command line is eval/gfid.py; eval/generation_table.py uses the same code.

    inception = InceptionFeatures(weights_file)
    ref, samples = ImageSource("VIRTUAL_imagenet256_labeled.npz"), ImageSource("samples/dit_xl")
    result = compare(extract(ref, inception), extract(samples, inception), ref.stats)   # {fid, sfid, ..., notes}

An image source (`ImageSource`) is one of:
  * a folder of images, searched recursively, so a class-folder tree such as `<root>/val` (`<class>/*.JPEG`) gives
    every image of every class folder; the extensions the data loader reads (tokenizer.data_check.IMAGE_EXTENSIONS);
  * an ADM `.npz` batch (`eval.lib.adm_npz`); one that carries precomputed `mu`/`sigma` (and `mu_s`/`sigma_s`), as
    ADM's reference batches do, is used as it is for FID (and sFID); its images still serve precision, recall, KID;
  * `CONFIG.yaml[:SPLIT]`: the images a dataset config reads from a split, quantised to 8 bits.
The metrics need images of one size: `image_size=N` brings every image to N x N first (`center_crop`).

docs/ARCHITECTURE.md §10 states the protocol. In short:
  * features: torch-fidelity's `inception-v3-compat` (the port of the TF graph ADM runs), uint8 images at their own
    size, resized to 299 inside the network as the TF graph does; pool features (2048-d) for FID, precision/recall
    and KID; the bias-free logits (ADM's `softmax/logits/MatMul`) for IS;
  * sFID: ADM's `mixed_6/conv` is the 1x1 branch of the third 17x17 block, which torch-fidelity's port calls
    `Mixed_6d.branch1x1`; we read its (post-ReLU) output through a forward hook, keep the first 7 of its 192
    channels and flatten in TF's NHWC order (17 x 17 x 7 = 2023-d), so precomputed `mu_s`/`sigma_s` fit;
  * statistics in float64 (mean and unbiased covariance); the Fréchet distance from the eigenvalues of
    sqrt(S1) S2 sqrt(S1), which is symmetric positive semi-definite, so it cannot give NaN or complex values;
  * IS: 10 splits of consecutive samples (5,000 each for 50k, as ADM; ADM uses 5,000-sample splits whatever N);
  * precision / recall: k-NN manifolds with k = 3 on squared distances (ADM); ADM rounds the distances to fp16,
    which we copy by default (`--pr-fp32` keeps fp32);
  * KID: not in ADM; torch-fidelity's estimator (100 subsets of min(1000, N), cubic polynomial kernel).

Inception weights: a state dict of torch-fidelity's FeatureExtractorInceptionV3, else torch-fidelity's standard
download where a network exists; otherwise a one-line error says what to place where.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from eval.lib.adm_npz import NpzImages
from tokenizer.common.errors import UserError, one_line
from tokenizer.data import load_rgb
from tokenizer.data_check import IMAGE_EXTENSIONS

FEATURE_DIM = 2048  # Inception pool3: a set of at most this many images has a singular covariance
SPATIAL_LAYER = "Mixed_6d.branch1x1"  # ADM's mixed_6/conv in torch-fidelity's names
SPATIAL_CHANNELS = 7  # ADM keeps the first 7 of its 192 channels
POOL, SPATIAL, LOGITS = "pool", "spatial", "logits"
SFID_NOTE = ("sFID: ADM's mixed_6/conv (torch-fidelity Mixed_6d.branch1x1, post-ReLU), first 7 channels, 17x17x7 "
             "NHWC-flattened; same layer as ADM, computed with torch-fidelity's port of the TF graph")


# ----------------------------------------------------------------------------------------------------- features


class InceptionFeatures:
    """torch-fidelity's InceptionV3 giving, for uint8 images (B, 3, H, W), {pool (B, 2048), spatial (B, 2023),
    logits (B, 1008)} as float32 CPU tensors (logits without the bias, as ADM's IS)."""

    def __init__(self, weights: str | None = None, device="cpu"):
        from tokenizer.metrics import load_inception

        self.device = torch.device(device)
        self.net = load_inception(weights, self.device, features=("2048", "logits_unbiased"),
                                  purpose="generation metrics", hint="pass --inception-weights FILE").eval()
        self._spatial = None
        self.net.get_submodule(SPATIAL_LAYER).register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output):
        # (B, 192, 17, 17) -> first 7 channels, in TF's (H, W, C) order -> (B, 2023)
        self._spatial = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(output.shape[0], -1).float().cpu()

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> dict:
        pool, logits = self.net(images.to(self.device))
        return {POOL: pool.float().cpu(), SPATIAL: self._spatial, LOGITS: logits.float().cpu()}


def image_files(folder: str) -> list:
    """Every image file under `folder`, recursively (following links), sorted by relative path: a flat folder of
    samples, or a class-folder tree `<class>/<image>` of any depth."""
    found = []
    for directory, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()
        found += [os.path.join(directory, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found, key=lambda f: os.path.relpath(f, folder))


def center_crop(image: Image.Image, size: int) -> np.ndarray:
    """uint8 (size, size, 3) of an RGB image: the shorter side brought to `size` (halved with a box filter while it
    is at least twice `size`, then bicubic), then the central square, as ADM and DiT prepare reference images."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    a = np.asarray(image)
    top, left = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
    return a[top:top + size, left:left + size]


def _header_size(path: str) -> tuple:
    """(width, height) from the file's header (no pixels decoded); an unreadable file is a one-line UserError."""
    try:
        with Image.open(path) as im:
            return im.size
    except Exception as e:  # UnidentifiedImageError, OSError, DecompressionBombError, ...
        raise UserError(f"cannot read image {path}: {one_line(e) or type(e).__name__}") from None


class ImageSource:
    """REF or SAMPLES of the command line: a name, a count, uint8 NHWC batches, and precomputed stats or None.

    image_size: bring every image to image_size x image_size (`center_crop`) before the metrics; without it the
    images of a folder must all have one size. A folder's files are checked on their headers before any work."""

    def __init__(self, spec: str, image_size: int | None = None):
        self.spec, self.stats, self.labels, self.image_size = spec, None, None, image_size
        if image_size is not None and (isinstance(image_size, bool) or int(image_size) != image_size
                                       or image_size < 1):
            raise UserError(f"--image-size must be a positive whole number of pixels, got {image_size!r}")
        path, split = spec, ""
        if not os.path.exists(spec) and ":" in spec:  # CONFIG.yaml:SPLIT
            path, _, split = spec.rpartition(":")
        if os.path.isdir(spec):
            self.files = image_files(spec)
            if not self.files:
                raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {spec} nor in its sub-folders")
            self.kind, self.count = "folder", len(self.files)
            # the sub-folders of `spec` that hold images: the class folders of a class-folder tree
            self.classes = sorted({os.path.relpath(f, spec).split(os.sep)[0] for f in self.files
                                   if os.sep in os.path.relpath(f, spec)})
            self._check_headers()
        elif spec.endswith(".npz") and os.path.isfile(spec):
            self.kind, self.npz = "npz", NpzImages(spec)
            self.count, self.stats, self.labels = len(self.npz), self.npz.stats, self.npz.labels
        elif path.endswith((".yaml", ".yml")):
            from tokenizer.common.config import load_config
            from tokenizer.data import build_dataset

            cfg = load_config("ssdd.yaml", [f"config={path}"])
            self.split = split or str(cfg.eval.split)
            self.kind, self.dataset = "dataset", build_dataset(cfg.dataset, self.split, train=False)
            self.count = len(self.dataset)
        else:
            raise UserError(f"{spec!r} is neither an image folder, an .npz batch, nor CONFIG.yaml[:SPLIT]")

    def _check_headers(self) -> None:
        """Before any work: every file of the folder opens as an image, and (without image_size) all have one size.
        Reads headers only: listing and headers of 10,000 32-px PNGs took 0.3 s of CPU (0.6 s on 2 busy cores)."""
        first = _header_size(self.files[0])
        for f in self.files[1:]:
            size = _header_size(f)
            if size != first and self.image_size is None:
                raise UserError(
                    f"{self.spec}: images differ in size ({first[0]}x{first[1]} {self.files[0]}, {size[0]}x{size[1]} "
                    f"{f}); pass --image-size N to bring every image to N x N (shorter side resized, centre crop, as "
                    f"ADM and DiT prepare reference images), e.g. the samples' size")

    def describe(self) -> str:
        if self.kind == "folder":
            what = f"image folder, {len(self.classes)} sub-folders" if self.classes else "image folder"
        else:
            what = {"npz": "ADM .npz", "dataset": f"dataset split {getattr(self, 'split', '')}"}[self.kind]
        return (f"{self.spec} ({what}, {self.count} images"
                + (f", brought to {self.image_size}x{self.image_size}" if self.image_size else "")
                + (", precomputed mu/sigma" if self.stats else "") + ")")

    def fid_from_images(self) -> bool:
        """Whether FID statistics are computed from this source's images (not taken precomputed from an .npz)."""
        return self.count > 0 and not (self.stats and "mu" in self.stats and "sigma" in self.stats)

    def batches(self, size: int):
        """uint8 (b, H, W, 3) numpy batches; every image must have the size of the first (or image_size)."""
        shape = None
        for batch in self._raw_batches(size):
            if self.image_size:
                batch = [im if im.shape[:2] == (self.image_size,) * 2
                         else center_crop(Image.fromarray(im), self.image_size) for im in batch]
            for im in batch:
                shape = shape or im.shape
                if im.shape != shape:
                    raise UserError(f"{self.spec}: images differ in size ({shape[:2]} and {im.shape[:2]}); pass "
                                    f"--image-size N, or compare images of one size, as the ADM evaluator's batches "
                                    f"hold")
            yield np.stack(batch)

    def _raw_batches(self, size: int):
        """Lists of uint8 (H, W, 3) images, `size` at a time, as stored."""
        if self.kind == "npz":
            yield from (list(b) for b in self.npz.batches(size))
            return
        from tokenizer.metrics import to_uint8

        for start in range(0, self.count, size):
            if self.kind == "folder":
                yield [np.asarray(load_rgb(f)) for f in self.files[start:start + size]]
            else:
                x = torch.stack([self.dataset[i][0] for i in range(start, min(start + size, self.count))])
                yield list(to_uint8(x))


def small_set_warning(source: ImageSource, role: str) -> str | None:
    """One line when `source`'s FID statistics come from at most FEATURE_DIM images, else None."""
    if not source.fid_from_images() or source.count > FEATURE_DIM:
        return None
    n = source.count
    return (f"{role}: {n} images for {FEATURE_DIM:,}-dimensional Inception features, so their covariance is singular "
            f"(rank at most {n - 1}) and FID (and sFID) is biased upward and unreliable; compare such figures only at "
            f"equal counts (papers use 50,000 samples)")


def extract(source: ImageSource, inception: InceptionFeatures, batch_size: int = 64, desc: str = "features") -> dict:
    """{pool, spatial, logits}: float32 numpy (N, D) for every image of `source`, in order (tqdm progress)."""
    parts = {POOL: [], SPATIAL: [], LOGITS: []}
    with tqdm(total=source.count, desc=desc, unit="img") as bar:
        for batch in source.batches(batch_size):
            batch = np.require(batch, requirements=["C", "W"])  # a writable copy of read-only (npz) buffers
            feats = inception(torch.from_numpy(batch).permute(0, 3, 1, 2))
            for k in parts:
                parts[k].append(feats[k].numpy())
            bar.update(len(batch))
    return {k: np.concatenate(v) for k, v in parts.items()}


# ----------------------------------------------------------------------------------------------------- metrics


def gaussian(features: np.ndarray, block: int = 10000) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), unbiased covariance (D, D)) in float64 of features (N, D), as np.mean / np.cov(rowvar=False),
    accumulated over row blocks so that 50k x 2048 features need no float64 copy."""
    n = len(features)
    if n < 2:
        raise UserError(f"need at least 2 images for a covariance, got {n}")
    mu = np.zeros(features.shape[1])
    for i in range(0, n, block):
        mu += features[i:i + block].astype(np.float64).sum(0)
    mu /= n
    sigma = np.zeros((features.shape[1],) * 2)
    for i in range(0, n, block):
        c = features[i:i + block].astype(np.float64) - mu
        sigma += c.T @ c
    return mu, sigma / (n - 1)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^1/2), in float64.

    Tr((S1 S2)^1/2) is the sum of the square roots of the eigenvalues of S1 S2, which are those of
    R S2 R with R = S1^1/2 (similar matrices). R S2 R is symmetric positive semi-definite, so a symmetric
    eigensolver gives real eigenvalues; rounding can only make tiny ones negative, and they are clamped to 0. This
    is why the result can be neither NaN nor complex, even for singular covariances (fewer images than dimensions).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
        raise UserError(f"statistics of different dimensions: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} "
                        f"vs {sigma2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, sigma1, sigma2)):
        raise UserError("the feature statistics contain NaN or inf (non-finite images or features?)")
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ sigma2 @ root1
    lam = np.linalg.eigvalsh((m + m.T) / 2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(np.clip(lam, 0, None)).sum())


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """(mean, std) over `splits` consecutive splits of exp(E_x KL(p(y|x) || p(y))), softmax in float64."""
    if len(logits) < splits:
        raise UserError(f"the Inception Score needs at least {splits} images (one per split), got {len(logits)}")
    x = torch.from_numpy(np.asarray(logits)).double()
    log_p = x.log_softmax(dim=1)
    n, scores = len(x), []
    for i in range(splits):
        part = log_p[i * n // splits:(i + 1) * n // splits]
        log_q = part.exp().mean(0).log()
        scores.append(float((part.exp() * (part - log_q)).sum(1).mean().exp()))
    return float(np.mean(scores)), float(np.std(scores))


def _squared_distances(a: torch.Tensor, b: torch.Tensor, fp16: bool) -> torch.Tensor:
    """(n, m) squared Euclidean distances, |a|^2 - 2 a.b + |b|^2 clamped at 0 (ADM's formula); with fp16, rounded
    to float16 when all are finite in it, as ADM's distance block does."""
    d = ((a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1)[None]).clamp_min_(0)
    if fp16:
        h = d.half()
        if torch.isfinite(h).all():
            d = h.float()
    return d


def manifold_radii(features: torch.Tensor, k: int = 3, block: int = 5000, fp16: bool = True) -> torch.Tensor:
    """(N,) squared distance of every point to its k-th nearest neighbour (the point itself counts as the 0-th),
    found block by block without an N x N matrix."""
    radii = []
    for i in range(0, len(features), block):
        best = None  # the k + 1 smallest distances of each row so far
        for j in range(0, len(features), block):
            d = _squared_distances(features[i:i + block], features[j:j + block], fp16)
            best = d if best is None else torch.cat([best, d], 1)
            best = best.topk(min(k + 1, best.shape[1]), dim=1, largest=False).values
        radii.append(best[:, k])
    return torch.cat(radii)


def precision_recall(ref: np.ndarray, samples: np.ndarray, k: int = 3, fp16: bool = True, device="cpu",
                     block: int = 5000) -> tuple[float, float]:
    """ADM's improved precision and recall (Kynkäänniemi et al. 2019) of features (N, D):
    precision = fraction of samples inside some reference point's k-NN ball, recall = fraction of reference points
    inside some sample's k-NN ball (inside: squared distance <= squared radius)."""
    if min(len(ref), len(samples)) <= k:
        raise UserError(f"precision/recall with k = {k} need more than {k} images per set, got {len(ref)} and "
                        f"{len(samples)}")
    r = torch.from_numpy(np.asarray(ref, np.float32)).to(device)
    s = torch.from_numpy(np.asarray(samples, np.float32)).to(device)
    radii_r, radii_s = manifold_radii(r, k, block, fp16), manifold_radii(s, k, block, fp16)
    r_in = torch.zeros(len(r), dtype=torch.bool, device=device)  # reference point covered by the samples
    s_in = torch.zeros(len(s), dtype=torch.bool, device=device)  # sample covered by the reference
    for i in range(0, len(r), block):
        for j in range(0, len(s), block):
            d = _squared_distances(r[i:i + block], s[j:j + block], fp16)
            r_in[i:i + block] |= (d <= radii_s[None, j:j + block]).any(1)
            s_in[j:j + block] |= (d <= radii_r[i:i + block, None]).any(0)
    return float(s_in.double().mean()), float(r_in.double().mean())


def kernel_inception_distance(ref: np.ndarray, samples: np.ndarray, subsets: int = 100,
                              subset_size: int = 1000) -> tuple[float, float]:
    """(mean, std) of torch-fidelity's unbiased MMD^2 estimate with the cubic polynomial kernel over `subsets` random
    subsets of min(subset_size, N) images (its default seed)."""
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    size = min(subset_size, len(ref), len(samples))
    if size < 2:
        raise UserError("KID needs at least 2 images per set")
    out = kid_features_to_metric(torch.from_numpy(np.asarray(samples)), torch.from_numpy(np.asarray(ref)),
                                 kid_subsets=subsets, kid_subset_size=size, verbose=False)
    return out[KEY_METRIC_KID_MEAN], out[KEY_METRIC_KID_STD]


def compare(ref_feats: dict | None, sample_feats: dict, ref_stats: dict | None = None,
            sample_stats: dict | None = None, is_splits: int = 10, k: int = 3, pr_fp16: bool = True,
            device="cpu") -> dict:
    """Every metric of two feature sets (`extract` output); `*_stats` (mu, sigma, mu_s, sigma_s) replace statistics
    computed from features where given (an ADM reference batch). A metric that cannot be had is None, with a note."""
    notes, out = [SFID_NOTE], {}

    def stats(feats, given, key):
        names = ("mu", "sigma") if key == POOL else ("mu_s", "sigma_s")
        if given is not None and all(n in given for n in names):
            return given[names[0]], given[names[1]]
        if feats is None:
            return None
        return gaussian(feats[key])

    for key, metric in ((POOL, "fid"), (SPATIAL, "sfid")):
        a, b = stats(ref_feats, ref_stats, key), stats(sample_feats, sample_stats, key)
        out[metric] = None if a is None or b is None else frechet_distance(*a, *b)
        if out[metric] is None:
            notes.append(f"{metric} not computed: the reference has neither images nor precomputed statistics for it")
    out["inception_score"] = out["inception_score_std"] = None
    try:
        out["inception_score"], out["inception_score_std"] = inception_score(sample_feats[LOGITS], is_splits)
    except UserError as e:
        notes.append(f"inception_score not computed: {e}")
    out["precision"] = out["recall"] = out["kid"] = out["kid_std"] = None
    if ref_feats is None:
        notes.append("precision, recall and KID not computed: the reference holds statistics but no images")
    else:
        for names, fn in ((("precision", "recall"), lambda: precision_recall(
                ref_feats[POOL], sample_feats[POOL], k, pr_fp16, device)),
                          (("kid", "kid_std"), lambda: kernel_inception_distance(ref_feats[POOL], sample_feats[POOL]))):
            try:
                out.update(zip(names, fn()))
            except UserError as e:
                notes.append(f"{' and '.join(names)} not computed: {e}")
    if ref_stats is not None:
        notes.append("reference FID statistics: precomputed mu/sigma of the .npz, used as they are")
    notes.append(f"IS: {is_splits} consecutive splits (ADM: splits of 5,000, i.e. 10 for 50k samples)")
    notes.append(f"precision/recall: k = {k}, squared distances "
                 + ("rounded to fp16 as ADM" if pr_fp16 else "in fp32"))
    return {**out, "notes": notes}
