"""SSDD as the `vae` of diffusers pipelines, offline: a DiTPipeline built from a small random DiTTransformer2DModel
gives, with SSDDVAE, the images our own decoder makes from the latents the pipeline produced (the released SDVAE_S
decoder on SD-VAE latents, and a tokenizer of this project with a shifted latent space); the VAE answers what
diffusers reads of a VAE."""

import json

import pytest
import torch
from helpers import make_tokenizer
from hub_fixtures import put_release, use_hub_cache

diffusers = pytest.importorskip("diffusers", reason="the diffusers extra: pip install '.[diffusers]'")

from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel  # noqa: E402

from tokenizer import SSDD  # noqa: E402
from tokenizer.common.errors import UserError  # noqa: E402
from tokenizer.diffusers_vae import SSDDVAE  # noqa: E402
from tokenizer.sdvae import SDVAE_SCALE  # noqa: E402


def small_dit(seed=0) -> DiTTransformer2DModel:
    """A 1-layer DiT on 4x4x4 latents with DiT's 1000 classes (DiTPipeline's null class is 1000) and learnt sigma."""
    torch.manual_seed(seed)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                 num_layers=1, sample_size=4, patch_size=2, num_embeds_ada_norm=1000,
                                 norm_num_groups=16).eval()


def run_pipeline(vae: SSDDVAE, seed: int = 0):
    """(images in [0, 1], the normalised latents DiTPipeline sampled: what it handed to vae.decode, times
    scaling_factor)."""
    pipe = DiTPipeline(transformer=small_dit(), vae=vae, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    seen, decode = [], vae.decode
    vae.decode = lambda z, *a, **k: (seen.append(z.detach().clone()), decode(z, *a, **k))[1]
    try:
        out = pipe(class_labels=[1, 207], guidance_scale=4.0, num_inference_steps=3,
                   generator=torch.Generator().manual_seed(seed), output_type="pt").images
    finally:
        del vae.decode
    assert len(seen) == 1
    return out, seen[0] * vae.config.scaling_factor


def our_decode(model: SSDD, latents: torch.Tensor, steps: int, seed: int) -> torch.Tensor:
    """This project's decode of (de-normalised) latents, its noise drawn as SSDD.decode draws it, as [0, 1] images."""
    f = model.patch_size
    noise = torch.randn((latents.shape[0], 3, latents.shape[2] * f, latents.shape[3] * f),
                        generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        x = model.decode(latents, steps=steps, noise=noise)
    return (x / 2 + 0.5).clamp(0, 1)


@pytest.fixture(scope="module")
def sdvae_s(tmp_path_factory):
    cache = tmp_path_factory.mktemp("hub")
    mp = pytest.MonkeyPatch()
    use_hub_cache(mp, cache)
    put_release(cache, "SDVAE_S_256")
    yield cache
    mp.undo()


def test_dit_pipeline_with_the_released_sdvae_decoder_matches_our_decode(sdvae_s, monkeypatch):
    use_hub_cache(monkeypatch, sdvae_s)
    vae = SSDDVAE.from_ssdd("SDVAE_S_256", steps=2).manual_seed(5)
    assert vae.config.scaling_factor == pytest.approx(SDVAE_SCALE) and vae.config.latent_shift == 0.0
    images, latents = run_pipeline(vae)
    assert images.shape == (2, 3, 32, 32)
    # as dit.pipeline maps a generator's SD-VAE latents back: z = z_norm * z_std + z_mean, z_std = 1 / 0.18215
    z = latents * (1 / SDVAE_SCALE)
    ours = our_decode(SSDD.from_pretrained("SDVAE_S_256"), z, steps=2, seed=5)
    diff = float((images - ours).abs().max())
    print(f"DiTPipeline + SSDDVAE(SDVAE_S_256) vs SSDD.decode: max pixel difference {diff:.3g} (of 1), "
          f"{diff * 255:.3g} of 255")
    assert diff < 1e-5
    assert float((images - our_decode(vae.ssdd, z, steps=2, seed=6)).abs().max()) > 1e-3  # the noise matters
    again, _ = run_pipeline(vae.manual_seed(5))
    assert torch.equal(again, images)


def test_dit_pipeline_with_a_project_tokenizer_uses_its_z_stats(tmp_path):
    tok = make_tokenizer(tmp_path, z_mean=0.3, z_std=0.5)  # z_stats.json beside it
    vae = SSDDVAE.from_ssdd(tok).manual_seed(1)
    assert vae.config.scaling_factor == pytest.approx(2.0) and vae.config.latent_shift == pytest.approx(0.3)
    assert vae.default_steps == 8  # a multi-step decoder: the model's default
    images, latents = run_pipeline(vae)
    ours = our_decode(SSDD.from_checkpoint(tok), latents * 0.5 + 0.3, steps=8, seed=1)  # z_norm * z_std + z_mean
    diff = float((images - ours).abs().max())
    print(f"DiTPipeline + SSDDVAE(project tokenizer, z_mean 0.3, z_std 0.5) vs SSDD.decode: max pixel difference "
          f"{diff:.3g}")
    assert diff < 1e-5


def test_the_vae_answers_what_diffusers_reads(tmp_path):
    tok = make_tokenizer(tmp_path, z_mean=0.3, z_std=0.5)
    model = SSDD.from_checkpoint(tok)
    model.single_step = True  # as a distilled decoder: one step by default
    vae = SSDDVAE.from_ssdd(model, z_stats={"z_mean": 0.3, "z_std": 0.5})
    c = vae.config
    assert (c.latent_channels, c.shift_factor, c.latents_mean, c.latents_std, c.force_upcast) == (4, 0.0, None,
                                                                                                   None, False)
    assert 2 ** (len(c.block_out_channels) - 1) == 8 == model.patch_size  # the pipelines' vae_scale_factor
    assert vae.default_steps == 1 and vae.dtype == torch.float32 and vae.device.type == "cpu"

    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        assert torch.allclose(dist.mode(), model.encode(x).mode() - 0.3)
        g = torch.Generator().manual_seed(0)
        assert torch.equal(dist.sample(generator=g), dist.sample(generator=torch.Generator().manual_seed(0)))
        z = dist.mode()
        out = vae.decode(z, generator=torch.Generator().manual_seed(3)).sample
        assert torch.equal(vae.decode(z, return_dict=False, generator=torch.Generator().manual_seed(3))[0], out)
        vae.enable_slicing()
        assert torch.allclose(vae.decode(z, generator=torch.Generator().manual_seed(3)).sample, out, atol=1e-6)
        vae.disable_slicing()
        assert vae(x).sample.shape == x.shape
        with pytest.raises(NotImplementedError):
            vae.enable_tiling()

        vae.save_pretrained(tmp_path / "vae")
        assert json.loads((tmp_path / "vae" / "config.json").read_text())["scaling_factor"] == pytest.approx(2.0)
        back = SSDDVAE.from_pretrained(tmp_path / "vae")
        assert torch.equal(back.decode(z, generator=torch.Generator().manual_seed(3)).sample, out)

        half = vae.to(torch.device("cpu"), torch.bfloat16)
        assert half.dtype == torch.bfloat16 and next(half.ssdd.decoder.parameters()).dtype == torch.bfloat16
        low = half.decode(z, generator=torch.Generator().manual_seed(3)).sample
        assert low.dtype == torch.bfloat16 and float((low.float() - out).abs().max()) < 0.1


def test_a_tokenizer_without_known_scale_is_one_line(tmp_path):
    model = SSDD(encoder="f8c4", decoder="XS", encoder_base_channels=32)
    with pytest.raises(UserError, match="no known scale: pass z_stats="):
        SSDDVAE.from_ssdd(model)
    kl = SSDDVAE.from_ssdd(SSDD(encoder="f8c4", decoder="kl", encoder_base_channels=32, kl_base_channels=32),
                           scaling_factor=1.0)
    with torch.no_grad():
        assert kl.decode(torch.zeros(1, 4, 4, 4)).sample.shape == (1, 3, 32, 32)  # one deterministic pass


def test_a_pipeline_with_the_vae_saves_and_loads_back(tmp_path):
    vae = SSDDVAE.from_ssdd(SSDD(encoder="sdvae", decoder="XS"), steps=1).manual_seed(0)
    DiTPipeline(transformer=small_dit(), vae=vae, scheduler=DDIMScheduler()).save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["vae"] == ["tokenizer.diffusers_vae", "SSDDVAE"]
    back = DiTPipeline.from_pretrained(tmp_path)  # imports this module for its vae, as for any custom component
    assert isinstance(back.vae, SSDDVAE) and back.vae.default_steps == 1
    z = torch.randn(2, 4, 4, 4)
    with torch.no_grad():
        assert torch.equal(back.vae.decode(z, generator=torch.Generator().manual_seed(1)).sample,
                           vae.decode(z, generator=torch.Generator().manual_seed(1)).sample)
