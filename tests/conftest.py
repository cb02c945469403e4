import os
from unittest import mock

import pytest

# Never reach for the network in tests: hub clients fail fast instead of retrying for ~46 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def sdvae_files(tmp_path_factory):
    """Random SD-VAE weights (full size, 83.7 M parameters) saved once in both published layouts:
    {"model": the SSDD(encoder='sdvae', decoder='kl') they came from, "diffusers": the Hugging Face
    diffusion_pytorch_model.safetensors layout, "ldm": the original single-file layout as a torch pickle (.ckpt)}."""
    import torch
    from safetensors.torch import save_file

    from tokenizer import SSDD
    from tokenizer.sdvae import to_layout

    torch.manual_seed(0)
    model = SSDD(encoder="sdvae", decoder="kl").eval()
    model.sdvae_pending = None  # these random weights are the SD-VAE here: never fetch the real one
    with torch.no_grad():  # move every tensor off its init (zero biases, unit norms) so each key matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    tmp = tmp_path_factory.mktemp("sdvae")
    state = model.state_dict()
    diffusers = tmp / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in to_layout(state, "diffusers").items()}, str(diffusers))
    ldm = tmp / "vae-ft-mse-840000-ema-pruned.ckpt"
    torch.save({"state_dict": to_layout(state, "ldm"), "global_step": 840000}, str(ldm))
    return {"model": model, "diffusers": str(diffusers), "ldm": str(ldm)}


@pytest.fixture
def one_thread():
    """Run the test's torch work on one thread: on a busy 2-core machine two threads wait on each other (a decoder
    call took 30x longer than with one)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def inception_file(tmp_path_factory):
    """torch-fidelity's InceptionV3 with Kaiming-normal random weights (~96 MB, made at test time, never committed):
    features that vary with the image, so FID, IS, precision and recall can be checked offline."""
    import torch
    from torch import nn
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    torch.manual_seed(0)
    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None):
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight)
    path = tmp_path_factory.mktemp("inception") / "inception_random.pth"
    torch.save(net.state_dict(), path)
    return path
