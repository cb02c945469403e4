"""eval/dit_throughput.py: the analytic FLOP count matches torch's counter, and a tiny run reports steps/s and MFU."""

import json

import torch
from torch.utils.flop_counter import FlopCounterMode

from dit.models import build_dit
from eval.dit_throughput import main
from eval.lib.train_steps import dit_forward_flops as forward_flops


def test_forward_flops_match_torch_counter(one_thread):
    for name, latent in (("DiT-Ti/2", (4, 8, 8)), ("DiT-S/4", (4, 16, 12))):
        model = build_dit(name, input_size=latent[1:], in_channels=4, num_classes=10, learn_sigma=True)
        x = torch.randn(3, *latent)
        with FlopCounterMode(display=False) as counter:
            model(x, torch.rand(3), torch.randint(0, 10, (3,)))
        flops = forward_flops(model, latent, 3)
        counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
        # torch counts Linear layers and the patch convolution on a CPU, not its fused CPU attention kernel
        assert flops["dense"] == counts["aten.addmm"] + counts["aten.convolution"]
        tokens, hidden = model.x_embedder.num_patches, model.blocks[0].attn.qkv.in_features
        assert flops["attention"] == 3 * len(model.blocks) * 4 * tokens**2 * hidden


def test_tiny_run_reports_steps_and_mfu(tmp_path, capsys, one_thread):
    out = tmp_path / "t"
    argv = ["--model", "DiT-Ti/2", "--latent", "4", "8", "8", "--batch-size", "2", "--num-classes", "10",
            "--device", "cpu", "--warmup", "1", "--iters", "2", "--peak-tflops", "1", "--out", str(out)]
    assert main(argv) == 0
    r = json.load(open(f"{out}.json"))["results"][0]
    assert r["steps_per_s"] > 0 and r["images_per_s"] == 2 * r["steps_per_s"] and r["precision"] == "fp32"
    assert r["compile"] is False and r["fused_adamw"] is False  # CPU: eager, default AdamW
    assert 0 < r["mfu"] < 1 and abs(r["achieved_tflops"] - r["train_tflop_per_step"] * r["steps_per_s"]) < 1e-9
    md = open(f"{out}.md").read()
    assert "| DiT-Ti/2 |" in md and "MFU %" in md and "python eval/dit_throughput.py --model DiT-Ti/2" in md
    capsys.readouterr()
    assert main(["--model", "DiT-Q/2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "DiT-Q/2" in err
