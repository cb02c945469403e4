"""A Hugging Face Hub cache on disk, for tests that load by name with downloads off (HF_HUB_OFFLINE=1).

The layout is the one huggingface_hub writes: <cache>/models--<owner>--<name>/blobs/<hash> holds each file,
snapshots/<revision>/<path> links to it, refs/main names the revision. hf_hub_download and snapshot_download with
local_files_only=True read exactly that, so the code under test runs its real lookup.
"""

import hashlib
import os
import shutil

import huggingface_hub.constants
import torch
from safetensors.torch import save_file

from tokenizer.common.downloads import RELEASED_SSDD, SSDD_REPO, SSDD_REVISION


def use_hub_cache(monkeypatch, cache_dir) -> str:
    """Point the Hub cache (and torch's, where files may be placed by hand) at test folders; downloads off."""
    cache_dir = str(cache_dir)
    os.makedirs(cache_dir, exist_ok=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", cache_dir)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", cache_dir)
    monkeypatch.setenv("TORCH_HOME", os.path.join(cache_dir, "torch-home"))
    return cache_dir


def put_in_hub_cache(cache_dir, repo: str, revision: str, path_in_repo: str, source: str) -> str:
    """Copy the local file `source` into the cache as `path_in_repo` of `repo` at `revision`; returns its snapshot
    path."""
    root = os.path.join(str(cache_dir), "models--" + repo.replace("/", "--"))
    digest = hashlib.sha256(open(source, "rb").read()).hexdigest()
    blob = os.path.join(root, "blobs", digest)
    os.makedirs(os.path.dirname(blob), exist_ok=True)
    if not os.path.exists(blob):
        shutil.copyfile(source, blob)
    link = os.path.join(root, "snapshots", revision, path_in_repo)
    os.makedirs(os.path.dirname(link), exist_ok=True)
    if os.path.lexists(link):
        os.remove(link)
    os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
    os.makedirs(os.path.join(root, "refs"), exist_ok=True)
    with open(os.path.join(root, "refs", "main"), "w") as f:
        f.write(revision)
    return link


def put_release(cache_dir, name: str, seed: int = 0) -> str:
    """A randomly initialised model of the released `name`'s architecture, saved as the release saves it (a flat
    fp32 state dict without metadata; `decoder.*` only for the SDVAE_* files) into the cache at the pinned revision."""
    from tokenizer import SSDD

    file, encoder, decoder = RELEASED_SSDD[name]
    torch.manual_seed(seed)
    model = SSDD(encoder=encoder, decoder=decoder)
    for p in model.decoder.parameters():  # away from the zero init, so outputs depend on every layer
        p.data.add_(torch.randn_like(p) * 0.02)
    state = model.state_dict()
    if encoder == "sdvae":
        state = {k: v for k, v in state.items() if k.startswith("decoder.")}
    os.makedirs(str(cache_dir), exist_ok=True)
    tmp = os.path.join(str(cache_dir), "tmp-" + os.path.basename(file))
    save_file({k: v.contiguous() for k, v in state.items()}, tmp)
    link = put_in_hub_cache(cache_dir, SSDD_REPO, SSDD_REVISION, file, tmp)
    os.remove(tmp)
    return link
