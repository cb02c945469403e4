"""The facebook/SSDD release by name: every name's architecture (checked against the release's published sizes
without building anything), and loading through the Hugging Face cache with downloads off, from every place that
takes a checkpoint (SSDD.from_pretrained, reconstruct.py --ckpt, ssdd.checkpoint=, tokenizer.checkpoint=, the
decoder specs of the generation pipeline)."""

import os

import pytest
import torch
from hub_fixtures import put_release, use_hub_cache
from safetensors.torch import load_file

from tokenizer import SSDD
from tokenizer.common.checkpoint import STATE_FILE
from tokenizer.common.config import load_config
from tokenizer.common.downloads import RELEASED_SSDD, SSDD_REPO, SSDD_REVISION, released_name
from tokenizer.common.errors import UserError, WeightsUnavailableError
from tokenizer.common.runs import resolve_checkpoint
from tokenizer.common.validation import check_config
from tokenizer.config_checks import SSDD_CHECKS
from tokenizer.pretrained import release_table, resolve_pretrained

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A Hub cache holding two releases of random weights: the smallest whole model and the smallest decoder-only."""
    cache = tmp_path_factory.mktemp("hub")
    mp = pytest.MonkeyPatch()
    use_hub_cache(mp, cache)
    files = {name: put_release(cache, name, seed=i) for i, name in enumerate(("F8C4_S_256", "SDVAE_S_256"))}
    yield cache, files
    mp.undo()


@pytest.fixture
def offline_hub(hub, monkeypatch):
    use_hub_cache(monkeypatch, hub[0])
    return hub


def test_every_released_name_has_its_file_and_architecture():
    assert len(RELEASED_SSDD) == 4 * 5 + 4 + 1
    rows = {r["name"]: r for r in release_table()}  # built on the meta device: nothing allocated or fetched
    for enc in ("F8C4", "F16C4", "F16C16", "F32C64"):
        for size in ("S", "B", "M", "L", "XL"):
            row = rows[f"{enc}_{size}_256"]
            assert (row["file"], row["encoder"], row["decoder"]) == (f"{enc}/{enc}_{size}_256.safetensors",
                                                                      enc.lower(), size)
    assert rows["SDVAE_L_256"]["file"] == "SDVAE/SDVAE_L_256.safetensors" and rows["SDVAE_L_256"]["decoder_only"]
    assert all(r["revision"] == SSDD_REVISION and r["repo"] == SSDD_REPO for r in rows.values())
    # f8c4 + M, the demo's architecture: 84,443,811 parameters in 536 tensors (the release's key list)
    with torch.device("meta"):
        demo = SSDD(encoder="f8c4", decoder="M")
    assert sum(p.numel() for p in demo.parameters()) == 84_443_811 and len(demo.state_dict()) == 536
    assert rows["demo_f8c4_M_128"]["encoder_params"] == rows["F8C4_M_256"]["encoder_params"]
    # the Hub's LFS sizes of two files: fp32 encoder + decoder plus a header of under 100 kB
    for name, size in (("F16C16_B_256", 268_991_676), ("F16C16_L_256", 547_508_988)):
        params = rows[name]["encoder_params"] + rows[name]["decoder_params"]
        assert 0 < size - 4 * params < 100_000, (name, size - 4 * params)
    assert rows["F32C64_XL_256"]["latent"] == "64 x H/32 x W/32"


def test_names_are_recognised_in_their_spellings_and_nothing_else():
    assert released_name("f8c4_m_256.safetensors") == "F8C4_M_256"
    assert released_name("F8C4/F8C4_M_256.safetensors") == "F8C4_M_256"
    assert released_name("facebook/SSDD/SDVAE/SDVAE_S_256.safetensors") == "SDVAE_S_256"
    for other in ("weights/F8C4_M_256.safetensors", "F8C4_H_256", "SDVAE_XL_256", "fmnist_f8c4_XS", "sd-vae-ft-mse"):
        assert released_name(other) is None, other


def test_from_pretrained_loads_the_cached_file_offline(offline_hub):
    _, files = offline_hub
    model = SSDD.from_pretrained("F8C4_S_256")
    assert (model.encoder_name, model.decoder_name, model.training) == ("f8c4", "S", False)
    saved = load_file(files["F8C4_S_256"])
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        out = model.decode(model.encode(x).mode(), steps=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and torch.isfinite(out).all()

    dec = SSDD.from_pretrained("SDVAE_S_256")  # decoder-only: the encoder would be SD-VAE's, fetched on encode()
    assert (dec.encoder_name, dec.decoder_name) == ("sdvae", "S")
    assert torch.equal(dec.decoder.conv_out.weight, load_file(files["SDVAE_S_256"])["decoder.conv_out.weight"])
    # the official constructor, given the name as its checkpoint, loads the same file
    same = SSDD(encoder="sdvae", decoder="S", checkpoint="SDVAE_S_256")
    assert torch.equal(same.decoder.conv_out.weight, dec.decoder.conv_out.weight)


def test_a_release_not_in_the_cache_is_one_line_naming_the_file_and_where_to_put_it(offline_hub):
    with pytest.raises(WeightsUnavailableError) as err:
        SSDD.from_pretrained("F8C4_M_256")
    msg = str(err.value)
    assert "\n" not in msg
    assert f"https://huggingface.co/{SSDD_REPO}/blob/{SSDD_REVISION}/F8C4/F8C4_M_256.safetensors" in msg
    assert os.path.join("torch-home", "hub", "checkpoints", "F8C4_M_256.safetensors") in msg
    with pytest.raises(UserError, match="not a released SSDD model; known names: F8C4_S_256"):
        SSDD.from_pretrained("F8C4_H_256")


def test_a_file_named_as_released_needs_no_architecture_and_refuses_another(offline_hub, tmp_path):
    _, files = offline_hub
    local = tmp_path / "F8C4_S_256.safetensors"  # what `git clone https://huggingface.co/facebook/SSDD` gives
    local.write_bytes(open(files["F8C4_S_256"], "rb").read())
    assert SSDD.from_checkpoint(str(local)).decoder_name == "S"
    with pytest.raises(UserError, match="is the released SSDD model F8C4_S_256 .* not encoder sdvae"):
        SSDD.from_checkpoint(str(local), encoder="sdvae")


def test_resolve_checkpoint_takes_names_and_a_run_of_that_name_wins(offline_hub, tmp_path):
    _, files = offline_hub
    assert os.path.samefile(resolve_checkpoint(str(tmp_path), "F8C4_S_256"), files["F8C4_S_256"])
    run = tmp_path / "jobs" / "F8C4_S_256" / "checkpoints" / "last"
    run.mkdir(parents=True)
    (run / "model_ae_ema.safetensors").write_bytes(b"")
    (run / STATE_FILE).write_text("{}")  # what marks a complete training state
    assert resolve_checkpoint(str(tmp_path), "F8C4_S_256") == str(run / "model_ae_ema.safetensors")
    with pytest.raises(UserError, match="released SSDD name"):
        resolve_checkpoint(str(tmp_path), "no_such_run")


def test_reconstruct_script_takes_a_name(offline_hub, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("reconstruct", os.path.join(ROOT, "sample", "reconstruct.py"))
    reconstruct = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reconstruct)
    out = tmp_path / "rec.png"
    assert reconstruct.main(["--ckpt", "F8C4_S_256", "--size", "32", "--steps", "1", "--out", str(out)]) == 0
    assert out.exists() and "decode 1 step(s)" in capsys.readouterr().out


def test_config_checkpoint_names_set_the_architecture(offline_hub, tmp_path):
    from tokenizer.evaluation import model_from_config

    args = ["config=configs/fmnist.yaml", f"ckpt_dir={tmp_path}", "ssdd.encoder_base_channels=32"]
    cfg = check_config(load_config("ssdd.yaml", [*args, "ssdd.checkpoint=SDVAE_S_256"]), SSDD_CHECKS)
    assert (cfg.ssdd.encoder, cfg.ssdd.decoder, cfg.ssdd.encoder_base_channels) == ("sdvae", "S", 128)
    model = model_from_config(cfg)
    assert (model.encoder_name, model.decoder_name) == ("sdvae", "S")

    cfg = check_config(load_config("ssdd.yaml", [*args, "ssdd.checkpoint=F8C4_S_256", "ssdd.decoder=XS"]), SSDD_CHECKS)
    assert (cfg.ssdd.encoder, cfg.ssdd.decoder) == ("f8c4", "S")
    assert model_from_config(cfg).decoder_name == "S"
    with pytest.raises(WeightsUnavailableError, match="F8C4/F8C4_XL_256.safetensors"):
        check_config(load_config("ssdd.yaml", [*args, "ssdd.checkpoint=F8C4_XL_256"]), SSDD_CHECKS)


def test_dit_tokenizer_checkpoint_takes_a_name(offline_hub, tmp_path):
    from dit.cache import load_tokenizer
    from dit.config_checks import DIT_CHECKS

    cfg = load_config("dit.yaml", ["config=configs/dit_fmnist.yaml", f"ckpt_dir={tmp_path}",
                                   "tokenizer.checkpoint=F8C4_S_256"])
    model, path = load_tokenizer(check_config(cfg, DIT_CHECKS))
    assert (model.encoder_name, model.decoder_name, model.has_encoder) == ("f8c4", "S", True)
    assert os.path.basename(path) == "F8C4_S_256.safetensors"


def test_the_pipeline_resolver_gives_decoder_files(offline_hub):
    """What dit.pipeline does with `--decoder ssdd:NAME` once it calls resolve_pretrained (one line there)."""
    from dit.pipeline import load_decoder

    _, files = offline_hub
    path = resolve_pretrained("ssdd:SDVAE_S_256")
    assert os.path.samefile(path, files["SDVAE_S_256"])
    dec = load_decoder(path, 4, "DiT-XL/2", sdvae_latents=True)
    assert (dec.encoder_name, dec.decoder_name) == ("sdvae", "S")
    with pytest.raises(UserError, match="not encoder sdvae"):  # an f8c4 model cannot decode SD-VAE latents
        load_decoder(resolve_pretrained("F8C4_S_256"), 4, "DiT-XL/2", sdvae_latents=True)
    assert resolve_pretrained("ssdd:runs/mine.safetensors") is None and resolve_pretrained("sdvae") is None
    assert resolve_pretrained(files["F8C4_S_256"]) is None  # an existing path is the caller's to load
