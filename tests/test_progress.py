"""Honest progress (dit/progress.py): the DiT is reported per sampler step and each decoder per batch, every stage
from 0 before its work to its total at the end, and the tqdm bars of the command-line tools show true rates."""

import io
import re

import pytest
import torch
from helpers import make_bundle

from dit.pipeline import load_generator
from dit.progress import DiTProgress, TqdmProgress, dit_evaluations
from dit.samplers import FAMILY_METHODS, run_sampler
from sample import generate


class Recorder:
    """A progress callback that keeps every report, and what `start` announced."""

    def __init__(self):
        self.calls, self.starts = [], []

    def start(self, stage, total, unit):
        self.starts.append((stage, total, unit))

    def __call__(self, stage, done, total):
        self.calls.append((stage, done, total))

    def of(self, stage):
        return [(d, t) for s, d, t in self.calls if s == stage]


class CountingModel:
    """A stand-in DiT for the samplers: a mild contraction, counting its evaluations."""

    null_class = 10

    def __init__(self):
        self.evaluations = 0

    def __call__(self, x, t, y):
        self.evaluations += 1
        return -0.1 * x


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("progress"))


@pytest.mark.parametrize("family,sampler", [(f, m) for f, methods in FAMILY_METHODS.items() for m in methods])
def test_evaluation_table_matches_the_samplers(family, sampler):
    """dit_evaluations is what each sampler really does, so step counts map onto evaluations exactly."""
    for steps in (2, 5):
        model = CountingModel()
        settings = {"steps": steps, "sampler": sampler, "cfg_scale": 2.0, "cfg_channels": None,
                    "guidance_interval": (0.0, 1.0), "time_shift": 1.0}
        run_sampler(family, model, torch.randn(2, 4, 4, 4), torch.tensor([1, 2]), settings,
                    torch.Generator().manual_seed(0))
        expected = dit_evaluations(family, sampler, steps)
        if expected is None:  # the adaptive ODE: counted, not known beforehand
            assert (family, sampler) == ("sit", "ode") and model.evaluations > 0
        else:
            assert model.evaluations == expected, (family, sampler, steps)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_generate_reports_every_dit_step_and_decoder_batch(bundle, sampler):
    gen = load_generator(bundle, device="cpu")
    rec = Recorder()
    # 3 classes x 2 images in batches of 4: two DiT batches of 3 steps, two decoder batches
    _, t = gen.generate([1, 2, 3], num=2, seed=0, steps=3, sampler=sampler, batch_size=4, progress=rec)
    assert rec.starts == [("dit", 6, "step"), (t["decoder"], 6, "img")]
    assert rec.of("dit") == [(d, 6) for d in range(7)]  # 0 before any work, then one report per step (Heun: 2 evals)
    assert rec.of(t["decoder"]) == [(0, 6), (4, 6), (6, 6)]
    assert [s for s, _, _ in rec.calls] == ["dit"] * 7 + [t["decoder"]] * 3  # the DiT first, then the decoder


def test_compare_reports_each_decoder_in_turn(bundle):
    gen = load_generator(bundle, device="cpu")
    rec = Recorder()
    gen.compare([7], num=2, seed=0, steps=2, progress=rec)
    stages = list(dict.fromkeys(s for s, _, _ in rec.calls))
    assert stages == ["dit", *gen.decoder_names]
    for name in gen.decoder_names:
        assert rec.of(name) == [(0, 2), (2, 2)]


def test_adaptive_ode_reports_evaluations_and_ends_at_its_total():
    """SiT's ODE has no step count: evaluations are reported, the total estimated from the path covered so far."""
    rec = Recorder()
    tracker = DiTProgress(rec, "sit", "ode", 250, batches=2, device=torch.device("cpu"))
    for _ in range(2):
        model = tracker.wrap(CountingModel())
        settings = {"steps": 250, "sampler": "ode", "cfg_scale": 1.0, "cfg_channels": None,
                    "guidance_interval": (0.0, 1.0)}
        run_sampler("sit", model, torch.randn(1, 4, 4, 4), torch.tensor([1]), settings)
        tracker.batch_done()
    assert rec.starts == [("dit", 200, "eval")]
    done = [d for d, _ in rec.of("dit")]
    assert done == sorted(done) and done[0] == 0
    last_done, last_total = rec.of("dit")[-1]
    assert last_done == last_total == tracker.evals_before > 0
    assert all(d < t for d, t in rec.of("dit")[:-1])  # only the very end reports the stage complete


def test_tqdm_bars_count_steps_and_show_true_rates(bundle, tmp_path, capsys):
    """generate.py's bars: one per stage, advancing step by step, whose rate is the work's (the old bars were
    created after the work and jumped to 100 % at 100,000+ img/s)."""
    assert generate.main(["--ckpt", str(bundle), "--class", "1", "--num", "2", "--steps", "6", "--out",
                          str(tmp_path / "g"), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    states = re.split(r"[\r\n]+", captured.err)
    dit = [s for s in states if s.startswith("DiT:")]
    shown = [int(m.group(1)) for s in dit if (m := re.search(r"\| (\d+)/6 \[", s))]
    assert shown[0] == 0 and shown[-1] == 6 and shown == sorted(shown)  # tqdm redraws at most every 0.1 s
    rate = float(re.search(r"([\d.]+)step/s\]", dit[-1]).group(1))
    dit_s = float(re.search(r"\): ([\d.]+) s for 2 latents", captured.out).group(1))
    assert 6 / dit_s / 4 < rate < 6 / dit_s * 4, (rate, dit_s)  # the measured steps per second, not a jump
    decoder = [s for s in states if s.startswith("SSDD-XS 1-step")]
    img_rate = float(re.search(r"([\d.]+)img/s\]", decoder[-1]).group(1))
    decoder_s = float(re.search(r"decoder .*: ([\d.]+) s for 2 images", captured.out).group(1))
    assert img_rate < 2 / max(decoder_s, 1e-3) * 4


def test_tqdm_adapter_follows_the_protocol():
    bars = TqdmProgress(file=io.StringIO())
    bars.start("dit", 4, "step")
    assert bars.bars["dit"].unit == "step" and bars.bars["dit"].total == 4
    for done in range(5):
        bars("dit", done, 4)
    assert "dit" not in bars.bars  # closed at its total
    bars("KL-VAE", 0, 3)  # reported without start(): a bar all the same
    bars("KL-VAE", 1, 5)  # a total that changes (the adaptive ODE's estimate) is followed
    assert bars.bars["KL-VAE"].total == 5 and bars.bars["KL-VAE"].n == 1
    bars.close()
    assert bars.bars == {}
    assert "4/4" in bars.file.getvalue() and "step/s" in bars.file.getvalue()
