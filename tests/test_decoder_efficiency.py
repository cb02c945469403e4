"""eval/lib/flops.py, eval/lib/decoders.py's noise handling, and eval/decoder_efficiency.py on a tiny CPU run."""

import importlib.util
import json
import os

import pytest
import torch

import eval.decoder_efficiency as efficiency
from dit.models import build_dit
from eval.lib.decoders import build_decode_fn, decoder_inputs
from eval.lib.flops import count_flops, count_flops_by_op, matmul_peak
from eval.lib.train_steps import dit_forward_flops
from eval.sampling_speed import decoder_timer

HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None


def test_counter_includes_cpu_attention_and_matches_the_analytic_dit_count(one_thread):
    model = build_dit("DiT-Ti/2", input_size=8, in_channels=4, num_classes=10, learn_sigma=True).eval()
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.randint(0, 10, (3,))
    with torch.no_grad():
        total, by_op = count_flops_by_op(lambda: model(x, t, y))
    assert "aten._scaled_dot_product_flash_attention_for_cpu" in by_op  # torch's own table has no CPU formula
    assert total == dit_forward_flops(model, (4, 8, 8), 3)["total"]
    # backward: the matrix products' gradients come on top of the forward
    assert count_flops(lambda: model(x, t, y).sum().backward()) > 2 * total


def test_matmul_peak_is_measured(one_thread):
    peak = matmul_peak("cpu", torch.float32, n=64, repeats=2)
    assert peak["tflops"] >= peak["tflops_median"] > 0
    assert peak["n"] == 64 and peak["dtype"] == "float32" and peak["threads"] == 1 and len(peak["seconds"]) == 2


def test_ssdd_timing_draws_no_noise(monkeypatch, one_thread):
    """The timed decode gets its noise as an argument: nothing is drawn (or copied) inside the call."""
    fn, _, latent = build_decode_fn("XS", "f8c4", 32, torch.device("cpu"), compile_=False)
    z, noise = decoder_inputs(1, latent, 32, "cpu")
    assert z.shape == (1, 4, 4, 4) and noise.shape == (1, 3, 32, 32)
    _, sampling_speed_call, _ = decoder_timer("XS", 1, "f8c4", 32, 1, torch.device("cpu"), False)

    def no_drawing(*args, **kwargs):
        raise AssertionError("noise drawn inside a timed decode")

    with torch.inference_mode():
        first = fn(z, noise, 1)
        monkeypatch.setattr(torch, "randn", no_drawing)
        assert torch.equal(fn(z, noise, 1), first)  # the same start gives the same image
        assert sampling_speed_call(1).shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="noise drawn beforehand"):
        fn(z, None, 1)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_DIFFUSERS, reason="diffusers (an optional extra) is not installed")
def test_diffusers_decoder_matches_ours_in_size_and_flops(one_thread):
    ours, n_ours, latent = build_decode_fn("kl", "f8c4", 32, torch.device("cpu"), compile_=False)
    theirs, n_theirs, _ = build_decode_fn("diffusers", "f8c4", 32, torch.device("cpu"), compile_=False)
    z, _ = decoder_inputs(1, latent, 32, "cpu")
    with torch.inference_mode():
        assert theirs(z).shape == ours(z).shape == (1, 3, 32, 32)
        assert count_flops(lambda: theirs(z)) == count_flops(lambda: ours(z))
    assert n_ours == n_theirs  # post_quant_conv included on both sides


@pytest.mark.slow
def test_tiny_efficiency_run(tmp_path, one_thread):
    out = str(tmp_path / "eff")
    decoders = ["XS", "kl", "kl-subpixel", "diffusers"]
    argv = ["--decoders", *decoders, "--kl-base-channels", "32", "--size", "32", "--batch-sizes", "1", "2",
            "--warmup", "0", "--repeats", "2", "--peak-size", "128", "--device", "cpu", "--out", out]
    assert efficiency.main(argv) == 0
    r = json.load(open(out + ".json"))
    rows = {(x["decoder"], x["batch"]): x for x in r["rows"]}
    built = decoders if HAS_DIFFUSERS else decoders[:3]
    assert set(rows) == {(d, b) for d in built for b in (1, 2)}
    peak = r["peak"]
    assert peak["gflops"] == max(peak["start_gflops"], peak["end_gflops"], peak["in_turns_best_gflops"]) > 0
    assert peak["in_turns_calls"] == 2 * len(rows) and 0 < peak["in_turns_gflops"] <= peak["gflops"]
    for x in rows.values():
        assert len(x["times_s"]) == 2 and x["images_per_s"] > 0
        assert x["gflops"] == pytest.approx(x["gflop_per_image"] * x["images_per_s"])
        assert x["peak_fraction"] == pytest.approx(x["gflops"] / peak["gflops"])
    assert rows[("XS", 1)]["gflop_per_image"] == rows[("XS", 2)]["gflop_per_image"] > 0
    # the same KL decoder with sub-pixel upsampling: its three upsampling convs cost 16/36 of what they did
    assert 0.5 < rows[("kl-subpixel", 1)]["gflop_per_image"] / rows[("kl", 1)]["gflop_per_image"] < 0.95
    assert "convolution" in " ".join(r["flops_by_op"]["SSDD-XS 1-step"])
    md = open(out + ".md").read()
    assert "| decoder | params | batch | GFLOP/image | images/s | ms/image | GFLOP/s | of the peak |" in md
    assert "taken in turns, one after each timed decoder call: " in md
    assert "- SSDD-XS 1-step vs KL-VAE (ours, base 32), batch 2: **" in md
    assert "python eval/decoder_efficiency.py --decoders XS kl kl-subpixel diffusers" in md
    assert os.path.getsize(out + ".png") > 1000
    if not HAS_DIFFUSERS:
        assert any("diffusers is not installed" in n for n in r["notes"])


def test_unknown_decoder_is_a_one_line_error(tmp_path, capsys):
    assert efficiency.main(["--decoders", "S", "XXL", "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown decoder 'XXL'" in err and "diffusers" in err
    assert not os.path.exists(tmp_path / "e.json")


def test_decoder_names_with_an_upsampling_mode(tmp_path, capsys):
    assert efficiency.canonical("m-nearest") == "M-nearest" and efficiency.canonical("KL-SUBPIXEL") == "kl-subpixel"
    assert efficiency.label("M-nearest", 1, 128) == "SSDD-M 1-step (nearest upsampling)"
    fn, _, latent = build_decode_fn("XS-nearest", "f8c4", 32, torch.device("cpu"), compile_=False)
    z, noise = decoder_inputs(1, latent, 32, "cpu")
    with torch.inference_mode():
        assert fn(z, noise, 1).shape == (1, 3, 32, 32)
    assert efficiency.main(["--decoders", "M-bilinear", "--out", str(tmp_path / "e")]) == 2
    assert "unknown decoder 'M-bilinear'" in capsys.readouterr().err
