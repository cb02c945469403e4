"""Sharing a trained generator on the Hub: the folder `dit.export --hub` writes (what `--push-to-hub` uploads), its
model card's metadata, and loading it back by repository id through a Hub cache with downloads off."""

import json
import os

import pytest
import torch
import yaml
from helpers import make_dit, make_tokenizer
from hub_fixtures import put_in_hub_cache, use_hub_cache

from dit.export import main as export_main
from dit.hub import CARD_FILE, CONFIG_FILE, GRID_FILE, resolve_generator
from dit.pipeline import load_generator
from tokenizer import SSDD
from tokenizer.common.checkpoint import read_weights, save_weights
from tokenizer.common.errors import WeightsUnavailableError

REVISION = "1234567890abcdef1234567890abcdef12345678"
RESULTS = {"dit": "DiT-Ti/1", "num_samples": 200, "rows": [
    {"cfg_scale": 2.0, "decoder": "SSDD-XS 1-step (distilled)", "decoder_steps": 1, "n": 200, "accuracy": 0.9147,
     "fd_classifier": 5.559, "images_per_s": 14.6, "latency_ms": 121.5},
    {"cfg_scale": 2.0, "decoder": "KL-VAE", "decoder_steps": 1, "n": 200, "accuracy": 0.849, "fd_classifier": 12.6,
     "images_per_s": 17.6}]}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A random-weight DiT-Ti/1 + distilled XS decoder exported with --hub and a generation-table result."""
    tmp = tmp_path_factory.mktemp("hubexport")
    tok = make_tokenizer(tmp / "tok")
    teacher = SSDD.from_checkpoint(tok)
    dit = make_dit(tmp / "dit.safetensors", tok)
    state, meta = read_weights(dit)
    save_weights(state, dit, {**meta, "encoder_sha256": teacher.encoder_sha256()})
    distilled = str(tmp / "distilled.safetensors")
    save_weights(teacher, distilled, {**teacher.architecture(), "single_step": 1})
    results = tmp / "generation_table.json"
    results.write_text(json.dumps(RESULTS))
    out = tmp / "hub_folder"
    assert export_main(["--dit", dit, "--decoder", distilled, "--out", str(out), "--steps", "2", "--hub",
                        "--results", str(results), "--grid-per-class", "2", "--extra-decoder",
                        f"SSDD-XS 2-step (teacher)={tok}:2"]) == 0
    return out


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


def test_the_folder_holds_weights_config_card_grid_and_bundle(exported):
    assert sorted(os.listdir(exported)) == sorted(["dit_ema.safetensors", "decoder.safetensors",
                                                   "decoder_ssdd_xs_2_step_teacher.safetensors", "bundle.json",
                                                   CONFIG_FILE, CARD_FILE, GRID_FILE])
    info = json.loads((exported / "bundle.json").read_text())
    assert info["evaluation"][0]["accuracy"] == pytest.approx(0.9147)
    config = json.loads((exported / CONFIG_FILE).read_text())
    assert config["dit"]["model"] == "DiT-Ti/1" and config["decoders"][0] == "SSDD-XS 1-step (distilled)"
    from PIL import Image

    grid = Image.open(exported / GRID_FILE)
    assert grid.size == (10 * 33 + 1, 2 * 33 + 1)  # 10 classes x 2 rows of 32-px images, 1-px padding


def test_the_card_metadata_is_the_hubs_and_shows_the_measured_figures(exported):
    from huggingface_hub import ModelCard

    text = (exported / CARD_FILE).read_text()
    meta = front_matter(text)
    assert meta["library_name"] == "ssdd-suite" and meta["license"] == "mit"
    assert meta["pipeline_tag"] == "unconditional-image-generation" and "ssdd" in meta["tags"]
    assert meta["datasets"] == ["zalando-datasets/fashion_mnist"]
    card = ModelCard(text, ignore_metadata_errors=False)  # huggingface_hub's own parser, model-index included
    accuracy = [r for r in card.data.eval_results if r.metric_type == "accuracy"]
    assert [r.metric_value for r in accuracy] == [91.47, 84.9]
    assert "| 2.0 | SSDD-XS 1-step (distilled) | 1 | 91.47 | 5.559 | 14.6 | 121.5 | 200 |" in text
    assert f"![samples]({GRID_FILE})" in text and "t-shirt/top" in text


def test_a_hub_repository_id_loads_through_the_cache_offline(exported, tmp_path, monkeypatch):
    cache = use_hub_cache(monkeypatch, tmp_path / "hub")
    for name in os.listdir(exported):  # what `--push-to-hub tester/dit-tiny` uploads, as a download caches it
        put_in_hub_cache(cache, "tester/dit-tiny", REVISION, name, str(exported / name))
    folder = resolve_generator("tester/dit-tiny")
    assert folder.endswith(os.path.join("snapshots", REVISION))
    assert resolve_generator(f"hf:tester/dit-tiny@{REVISION}") == folder
    # load_generator (and so generate.py --ckpt and the app) takes the repository id itself
    from_hub, local = load_generator("tester/dit-tiny", device="cpu"), load_generator(str(exported), device="cpu")
    a, _ = from_hub.generate([7, 9], num=2, seed=3)
    b, _ = local.generate([7, 9], num=2, seed=3)
    assert torch.equal(a, b) and from_hub.decoder_names == local.decoder_names

    assert resolve_generator(str(exported)) is None and resolve_generator("DiT-XL-2-256x256.pt") is None
    with pytest.raises(WeightsUnavailableError) as err:
        resolve_generator("tester/not-cached")
    assert "tester/not-cached" in str(err.value) and "\n" not in str(err.value)


def test_push_uploads_that_folder_in_one_call(exported, monkeypatch, capsys):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create",
                                                                                                         repo_id)))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder",
                        lambda self, **kw: calls.append(("upload", kw["repo_id"], kw["folder_path"])))
    assert export_main(["--dit", str(exported / "dit_ema.safetensors"), "--decoder",
                        str(exported / "decoder.safetensors"), "--out", str(exported), "--grid-per-class", "1",
                        "--push-to-hub", "tester/dit-tiny"]) == 0
    assert calls == [("create", "tester/dit-tiny"), ("upload", "tester/dit-tiny", str(exported))]
    assert "pushed" in capsys.readouterr().out


def test_push_without_a_network_is_one_line(exported, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert export_main(["--dit", str(exported / "dit_ema.safetensors"), "--decoder",
                        str(exported / "decoder.safetensors"), "--out", str(exported), "--grid-per-class", "0",
                        "--push-to-hub", "tester/dit-tiny"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: could not push") and err.count("\n") == 1
    assert export_main(["--dit", "x", "--out", str(exported), "--push-to-hub", "not a repo"]) == 2
    assert "give a Hub repository id" in capsys.readouterr().err
