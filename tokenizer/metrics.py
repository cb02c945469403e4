"""Reconstruction metrics (docs/ARCHITECTURE.md §10): PSNR, SSIM, LPIPS (AlexNet), rFID, MSE, MAE.

Both originals and reconstructions are clamped and quantised to 8-bit levels before anything is measured.

Design:
- Everything is a running *sum* held in float64 tensors on ``device`` (``state``), so a distributed eval only has to
  all-reduce them (``all_reduce`` / ``gather``) and then call ``compute()``: no images are kept in memory.
- rFID streams images through torch-fidelity's InceptionV3 feature extractor (2048-d pool features, uint8 input,
  resized to 299 internally) and accumulates Σf and Σf·fᵀ in float64 (like torcheval's FID); the Fréchet distance
  is then computed by torch-fidelity's ``fid_statistics_to_metric``. This equals ``torch_fidelity.calculate_metrics``
  on the same images (tested) without storing them; ``save_cpu_ram`` is irrelevant (no DataLoader is used).
- Missing LPIPS/Inception weights never crash the eval: the metric is reported as None and a one-line reason is
  listed in ``compute()['notes']``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from tokenizer.common.downloads import cache_path
from tokenizer.common.errors import UserError, WeightsUnavailableError

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's InceptionV3 (TF port)
HIGHER_IS_BETTER = {"psnr", "ssim"}  # for the other metrics (rfid, lpips, mse, mae) lower is better


def selection_score(result: dict, metric: str) -> float:
    """A score where higher is better, from `metric` of a `compute()` result (PSNR when that metric is missing,
    e.g. rFID without Inception weights): what picks a run's best checkpoint."""
    key = metric if result.get(metric) is not None else "psnr"
    return result[key] if key in HIGHER_IS_BETTER else -result[key]


def _levels(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] → float tensor of integer 8-bit levels 0..255."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round()


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Images (..., 3, H, W) in [-1, 1] -> uint8 (..., H, W, 3) numpy array (clamped, rounded): what a PNG, a
    display or an ADM sample batch holds."""
    return _levels(x).to(torch.uint8).movedim(-3, -1).cpu().numpy()


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Clamp images in [-1, 1] and quantise them to the 8-bit grid: float values k/255 in [0, 1]."""
    return _levels(x) / 255


def pad_to_pow2(x: torch.Tensor, min_size: int = 64) -> torch.Tensor:
    """Pad H and W each (centred) to the next power of two ≥ min_size; reflect padding, replicate when the image is
    too small to reflect. Used for AlexNet LPIPS, whose pooling stack needs ≥ ~64 px (a 28-px image fails)."""
    h, w = x.shape[-2:]
    th, tw = (max(min_size, 1 << (s - 1).bit_length()) for s in (h, w))
    if (th, tw) == (h, w):
        return x
    pad = ((tw - w) // 2, tw - w - (tw - w) // 2, (th - h) // 2, th - h - (th - h) // 2)
    mode = "reflect" if max(pad[:2]) < w and max(pad[2:]) < h else "replicate"
    return F.pad(x, pad, mode=mode)


def load_inception(weights_path: str | Path | None = None, device="cpu", features=("2048",),
                   purpose: str = "rFID",
                   hint: str = "set eval.inception_weights=<file>, or eval.fid=false to skip rFID") -> torch.nn.Module:
    """torch-fidelity's InceptionV3 feature extractor (`features`: its names, '2048' pool features by default).
    weights_path=None: torch-fidelity's standard download (cached in $TORCH_HOME/hub/checkpoints). Raises
    WeightsUnavailableError (one line: what to place where, or `hint`: the config key or flag the user sets) when
    it cannot be had."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    if weights_path is not None and not Path(weights_path).is_file():
        raise WeightsUnavailableError(f"Inception weights file not found: {weights_path}; {hint}")
    try:
        net = FeatureExtractorInceptionV3("inception-v3-compat", list(features), feature_extractor_weights_path=
                                          None if weights_path is None else str(weights_path), verbose=False)
    except Exception as err:
        what = weights_path or cache_path(INCEPTION_FILE)
        first = (str(err).strip().splitlines() or [""])[0][:120]
        raise WeightsUnavailableError(
            f"Inception weights for {purpose} unavailable ({type(err).__name__}: {first}); put {INCEPTION_FILE} at "
            f"{what} or {hint}"
        ) from None
    return net.to(device)


class ReconstructionMetrics:
    """Streaming reconstruction metrics over a whole eval set.

    Usage (single process)::

        m = ReconstructionMetrics(device)
        for x in loader: m.update(x, model(x))          # both (B, 3, H, W) in [-1, 1]
        results = m.compute()

    Distributed contract: every process calls ``update`` on its own shard, then **every** process calls
    ``m.gather(accelerator)`` (or ``m.all_reduce(fn)`` with any sum-reducing collective ``fn(tensor) -> tensor``)
    exactly once — it sums all state tensors across processes in place; shards may have different sizes, a process
    may even have 0 images. Then ``compute()`` gives the global result on every process (call it on the main one).

    ``compute()`` returns: n_images; psnr = 10·log10(1 / global MSE) over the whole set (float64; ``inf`` when
    originals and reconstructions are identical, as torcheval gives); ssim (scikit-image per image, averaged);
    lpips (AlexNet, mean; images padded to a power-of-two size ≥ 64, see ``pad_to_pow2``) or None; rfid or None;
    mse and mae on the [0, 1] scale (plain, not ×1000); notes: list of one-line reasons for None metrics.
    """

    def __init__(self, device="cpu", lpips: bool = True, lpips_weights_path: str | Path | None = None,
                 fid: bool = True, inception_weights_path: str | Path | None = None):
        self.device = torch.device(device)
        self.notes: list[str] = []
        self.lpips_net = None
        if lpips:
            from tokenizer.losses import LPIPSLoss

            try:
                self.lpips_net = LPIPSLoss("alex", weights_path=lpips_weights_path).to(self.device)
            except UserError as err:
                self.notes.append(f"lpips not computed: {err}")
        self.inception = None
        if fid:
            try:
                self.inception = load_inception(inception_weights_path, self.device)
            except UserError as err:
                self.notes.append(f"rfid not computed: {err}")
        self.reset()

    def reset(self) -> None:
        z = lambda *shape: torch.zeros(shape, dtype=torch.float64, device=self.device)  # noqa: E731
        self.state: dict[str, torch.Tensor] = {k: z() for k in ("n_images", "n_values", "sse", "sae", "ssim_sum")}
        if self.lpips_net is not None:
            self.state["lpips_sum"] = z()
        if self.inception is not None:
            for side in ("real", "fake"):
                self.state[f"fid_{side}_sum"] = z(2048)
                self.state[f"fid_{side}_outer"] = z(2048, 2048)
        self._reduced = False

    @torch.no_grad()
    def update(self, originals: torch.Tensor, reconstructions: torch.Tensor) -> None:
        """Add a batch; both (B, 3, H, W) in [-1, 1] (any device/dtype). Runs in fp32 even inside autocast."""
        with torch.autocast(self.device.type, enabled=False):
            self._update(originals, reconstructions)

    def _update(self, originals: torch.Tensor, reconstructions: torch.Tensor) -> None:
        if self._reduced:
            raise RuntimeError("update() after all_reduce()/gather(): call reset() first")
        if originals.shape != reconstructions.shape or originals.dim() != 4 or originals.shape[1] != 3:
            raise UserError(f"expected two (B, 3, H, W) batches, got {tuple(originals.shape)} and "
                             f"{tuple(reconstructions.shape)}")
        a, b = _levels(originals.to(self.device)), _levels(reconstructions.to(self.device))
        s = self.state
        diff = (a.double() - b.double()) / 255
        s["n_images"] += a.shape[0]
        s["n_values"] += diff.numel()
        s["sse"] += diff.square().sum()
        s["sae"] += diff.abs().sum()

        from skimage.metrics import structural_similarity

        a_np, b_np = (a / 255).double().cpu().numpy(), (b / 255).double().cpu().numpy()
        s["ssim_sum"] += sum(structural_similarity(u, v, channel_axis=0, data_range=1.0) for u, v in zip(a_np, b_np))

        if self.lpips_net is not None:
            x, y = pad_to_pow2(a / 127.5 - 1), pad_to_pow2(b / 127.5 - 1)
            s["lpips_sum"] += self.lpips_net.per_image(x, y).double().sum()
        if self.inception is not None:
            for side, img in (("real", a), ("fake", b)):
                f = self.inception(img.to(torch.uint8))[0].double()
                s[f"fid_{side}_sum"] += f.sum(0)
                s[f"fid_{side}_outer"] += f.T @ f

    def all_reduce(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Sum the state over processes, once. Default: torch.distributed.all_reduce when initialised."""
        if self._reduced:
            raise RuntimeError("state already reduced")
        if reduce_sum is None:
            import torch.distributed as dist

            if not (dist.is_available() and dist.is_initialized()):
                return

            def reduce_sum(t):
                dist.all_reduce(t)
                return t

        for k in self.state:  # same keys and order on every process (same config everywhere)
            self.state[k] = reduce_sum(self.state[k])
        self._reduced = True

    def gather(self, accelerator) -> None:
        """``all_reduce`` through an ``accelerate.Accelerator`` (no-op for a single process)."""
        if accelerator.num_processes > 1:
            self.all_reduce(lambda t: accelerator.reduce(t, reduction="sum"))

    def compute(self) -> dict:
        s = {k: v.cpu() for k, v in self.state.items()}
        n, nv = int(s["n_images"].item()), s["n_values"].item()
        notes = list(self.notes)
        out: dict = {"n_images": n, "psnr": None, "ssim": None, "lpips": None, "rfid": None, "mse": None,
                     "mae": None, "notes": notes}
        if n == 0:
            notes.append("no images")
            return out
        mse = s["sse"].item() / nv
        out.update(mse=mse, mae=s["sae"].item() / nv, ssim=s["ssim_sum"].item() / n,
                   psnr=math.inf if mse == 0 else 10 * math.log10(1 / mse))
        if "lpips_sum" in s:
            out["lpips"] = s["lpips_sum"].item() / n
        if "fid_real_sum" in s:
            if n < 2:
                notes.append("rfid not computed: FID needs at least 2 images")
            else:
                from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

                stats = [self._gaussian(s[f"fid_{side}_sum"], s[f"fid_{side}_outer"], n) for side in ("real", "fake")]
                out["rfid"] = fid_statistics_to_metric(*stats, verbose=False)[KEY_METRIC_FID]
        return out

    @staticmethod
    def _gaussian(total: torch.Tensor, outer: torch.Tensor, n: int) -> dict:
        mu = (total / n).numpy()
        sigma = (outer.numpy() - n * np.outer(mu, mu)) / (n - 1)  # unbiased, as np.cov
        return {"mu": mu, "sigma": sigma}
