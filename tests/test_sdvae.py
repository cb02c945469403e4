"""SD-VAE in this project's modules: key maps of both published layouts, parameter counts equal to diffusers'
AutoencoderKL, SSDD decoders on SD-VAE latents (released decoder-only files), offline messages. Nothing downloads."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from tokenizer import SSDD, UserError, WeightsUnavailableError
from tokenizer.encoder import Encoder
from tokenizer.kl_decoder import KLDecoder
from tokenizer.latent_stats import fixed_z_stats
from tokenizer.sdvae import SDVAE_SCALE, detect_layout, from_layout, sdvae_file, to_layout

ASSETS = os.path.join(os.path.dirname(__file__), "assets")

# diffusers 0.42.1 AutoencoderKL with the stabilityai/sd-vae-ft-mse config, counted in a scratch environment
# (docs/RESULTS.md): encoder, quant_conv, decoder, post_quant_conv, total.
DIFFUSERS_ENCODER, DIFFUSERS_QUANT_CONV = 34_163_592, 72
DIFFUSERS_DECODER, DIFFUSERS_POST_QUANT_CONV = 49_490_179, 20
DIFFUSERS_TOTAL = 83_653_863


def _count(module):
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts_equal_diffusers_autoencoderkl():
    with torch.device("meta"):
        model = SSDD(encoder="sdvae", decoder="kl")
    # our encoder holds SD's quant_conv as out_proj, our decoder holds post_quant_conv
    assert _count(model.encoder) == DIFFUSERS_ENCODER + DIFFUSERS_QUANT_CONV
    assert _count(model.encoder.out_proj) == DIFFUSERS_QUANT_CONV
    assert _count(model.decoder) == DIFFUSERS_DECODER + DIFFUSERS_POST_QUANT_CONV
    assert _count(model.decoder.post_quant_conv) == DIFFUSERS_POST_QUANT_CONV
    assert _count(model) == DIFFUSERS_TOTAL


def test_diffusers_layout_is_diffusers_key_list():
    """Our writer gives exactly the names and shapes of diffusers' own state dict (pinned in tests/assets)."""
    pinned = json.load(open(os.path.join(ASSETS, "sdvae_diffusers_keys.json")))["keys"]
    with torch.device("meta"):
        state = SSDD(encoder="sdvae", decoder="kl").state_dict()
    mine = {k: list(v.shape) for k, v in to_layout(state, "diffusers").items()}
    assert mine == pinned
    assert len(pinned) == 248 and pinned["decoder.up_blocks.0.upsamplers.0.conv.weight"] == [512, 512, 3, 3]
    # LDM keeps this project's names apart from the quant convs, and 1x1 convs in the attention
    ldm = to_layout(state, "ldm")
    assert {"quant_conv.weight", "post_quant_conv.weight", "encoder.mid.attn_1.q.weight"} <= set(ldm)
    assert tuple(ldm["encoder.mid.attn_1.q.weight"].shape) == (512, 512, 1, 1)
    assert detect_layout(ldm) == "ldm" and detect_layout(to_layout(state, "diffusers")) == "diffusers"
    assert detect_layout(state) is None  # this project's own keys are neither


def _small_sdvae(seed=0):
    """The SD-VAE layout at base width 32 (same names, fewer channels): key maps do not depend on widths."""
    torch.manual_seed(seed)
    enc, dec = Encoder(8, 4, 32), KLDecoder(4, 8, 32)
    state = {f"encoder.{k}": v + 0.02 * torch.randn_like(v) for k, v in enc.state_dict().items()}
    state |= {f"decoder.{k}": v + 0.02 * torch.randn_like(v) for k, v in dec.state_dict().items()}
    return enc, dec, state


def _outputs(enc, dec, state):
    enc.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("encoder.")}, strict=True)
    dec.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("decoder.")}, strict=True)
    torch.manual_seed(1)
    x, z = torch.rand(1, 3, 32, 32) * 2 - 1, torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        return enc(x).mode(), dec(z)


def test_both_layouts_and_old_diffusers_names_load_the_same_weights():
    enc, dec, state = _small_sdvae()
    ref = _outputs(enc, dec, state)
    diffusers = to_layout(state, "diffusers")
    old = {k.replace("to_q", "query").replace("to_k", "key").replace("to_v", "value")
           .replace("to_out.0", "proj_attn"): v
           for k, v in diffusers.items()}  # diffusers files written before the attention rename
    whole_sd = {f"first_stage_model.{k}": v
                for k, v in to_layout(state, "ldm").items()}  # inside a Stable Diffusion file
    whole_sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(1)  # the rest of such a file is ignored
    for published in (diffusers, old, to_layout(state, "ldm"), whole_sd):
        back = from_layout(published, list(state))
        assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
        enc2, dec2, _ = _small_sdvae(seed=5)
        out = _outputs(enc2, dec2, back)
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


@pytest.mark.slow
def test_full_size_sdvae_loads_from_both_layouts_with_same_outputs(sdvae_files):
    ref = sdvae_files["model"]
    torch.manual_seed(0)
    x, z = torch.rand(1, 3, 32, 32) * 2 - 1, torch.randn(1, 4, 4, 4) * 4
    with torch.no_grad():
        want_z, want_x = ref.encode(x).mode(), ref.decode(z)
        for layout in ("diffusers", "ldm"):
            model = SSDD(encoder="sdvae", decoder="kl", checkpoint=sdvae_files[layout]).eval()
            assert torch.equal(model.encode(x).mode(), want_z) and torch.equal(model.decode(z), want_x), layout
            assert model.sdvae_pending is None
        # the encoder alone, into a model with another decoder
        enc_only = SSDD(encoder="sdvae", decoder="XS", encoder_checkpoint=sdvae_files["ldm"]).eval()
        assert torch.equal(enc_only.encode(x).mode(), want_z)


@pytest.mark.slow
def test_released_sdvae_decoder_file_loads_and_decodes(tmp_path, monkeypatch):
    """SDVAE_{S,B,M,L}_256.safetensors hold `decoder.*` only and no metadata; the size comes from the shapes."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    torch.manual_seed(0)
    src = SSDD(encoder="sdvae", decoder="XS")
    path = tmp_path / "SDVAE_XS_256.safetensors"
    save_file({f"decoder.{k}": v.contiguous() for k, v in src.decoder.state_dict().items()}, str(path))
    model = SSDD(encoder="sdvae", decoder="XS", checkpoint=str(path)).eval()
    built = SSDD.from_checkpoint(str(path), encoder="sdvae").eval()
    assert built.decoder_name == "XS" and built.encoder_name == "sdvae"
    z, noise = torch.randn(1, 4, 4, 4), torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        out = model.decode(z, steps=2, noise=noise)
        assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()
        assert torch.equal(out, src.eval().decode(z, steps=2, noise=noise))
        assert torch.equal(out, built.decode(z, steps=2, noise=noise))
    # its encoder is SD-VAE's, fetched at the first encode(): offline, one line saying what to place where
    with pytest.raises(WeightsUnavailableError) as info:
        model.encode(torch.zeros(1, 3, 32, 32))
    msg = str(info.value)
    assert "\n" not in msg and "sd-vae-ft-mse" in msg
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "sd-vae-ft-mse.safetensors") in msg


def test_sdvae_name_found_in_the_cache_without_network(tmp_path, monkeypatch, sdvae_files):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(WeightsUnavailableError):
        sdvae_file("sd-vae-ft-ema")
    target = tmp_path / "hub" / "checkpoints" / "sd-vae-ft-ema.safetensors"
    target.parent.mkdir(parents=True)
    os.symlink(sdvae_files["diffusers"], target)
    assert sdvae_file("sd-vae-ft-ema") == str(target)
    with pytest.raises(UserError, match="not found"):
        sdvae_file("sd-vae-ft-nothing")


def test_files_of_another_family_give_one_line_errors(tmp_path, sdvae_files):
    with pytest.raises(UserError) as info:  # SD-VAE given where an SSDD decoder is expected
        SSDD(encoder="sdvae", decoder="M", checkpoint=sdvae_files["diffusers"])
    assert "SD-VAE autoencoder" in str(info.value) and "\n" not in str(info.value)
    dit = tmp_path / "DiT.safetensors"
    save_file({"x_embedder.proj.weight": torch.zeros(8, 4, 2, 2)}, str(dit))
    with pytest.raises(UserError, match="not an SSDD checkpoint.*DiT/SiT"):
        SSDD(encoder="sdvae", decoder="XS", checkpoint=str(dit))
    with pytest.raises(UserError, match="no SSDD decoder"):  # a decoder-only file of no known size
        bad = tmp_path / "SDVAE_odd.safetensors"
        save_file({"decoder.conv_in.weight": torch.zeros(7, 7, 3, 3)}, str(bad))
        SSDD.from_checkpoint(str(bad), encoder="sdvae")
    with pytest.raises(UserError, match="base width 128"):
        SSDD(encoder="sdvae", decoder="XS", encoder_base_channels=64)


def test_latent_scale_is_part_of_the_description():
    assert SSDD(encoder="sdvae", decoder="XS").fixed_z_stats["z_std"] == pytest.approx(1 / 0.18215)
    assert fixed_z_stats("sdvae") == {"z_mean": 0.0, "z_std": 1 / SDVAE_SCALE,
                                      "source": "SD-VAE scale factor 0.18215 (LDM)"}
    assert SSDD(encoder="f8c4", decoder="XS", encoder_base_channels=32).fixed_z_stats is None
