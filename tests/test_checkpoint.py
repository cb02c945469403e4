"""Checkpoint files: strict loads with a readable mismatch report, atomic training states, exact round trips."""

import json
import os

import pytest
import torch

from tokenizer import SSDD, CheckpointMismatchError, UserError
from tokenizer.common.checkpoint import (
    load_training_state,
    load_weights,
    resolve_state_dir,
    save_training_state,
    save_weights,
)


def small(decoder="XS", encoder="f8c4"):
    torch.manual_seed(0)
    return SSDD(encoder=encoder, decoder=decoder, encoder_base_channels=32)


def test_round_trip_and_from_checkpoint(tmp_path):
    model = small()
    path = str(tmp_path / "m.safetensors")
    save_weights(model, path, model.architecture())
    again = SSDD.from_checkpoint(path)
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


def test_decoder_only_file_decodes_like_the_full_model_and_refuses_to_encode(tmp_path):
    model = small().eval()
    model.single_step = True
    path = str(tmp_path / "dec.safetensors")
    model.save_decoder(path, dtype=torch.float16)
    again = SSDD.from_checkpoint(path).eval()
    assert not again.has_encoder and again.single_step  # decode() defaults to 1 step, as the source model
    for k, v in model.decoder.state_dict().items():  # fp16 on disk: equal up to fp16 rounding
        torch.testing.assert_close(again.decoder.state_dict()[k], v.half().float())
    z, noise = torch.randn(2, 4, 4, 4), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again.decode(z, noise=noise), model.decode(z, noise=noise), atol=2e-2, rtol=0)
    with pytest.raises(UserError, match="decoder-only"):
        again.encode(torch.zeros(1, 3, 32, 32))


def test_other_architecture_names_counts_and_a_few_keys(tmp_path):
    path = str(tmp_path / "s.safetensors")
    save_weights(small(decoder="S"), path)
    with pytest.raises(CheckpointMismatchError) as err:
        small(decoder="XS").load_checkpoint(path)
    msg = str(err.value)  # counts and a few names, never the hundreds of keys
    assert "\n" not in msg and "mis-shaped keys" in msg and len(msg) < 200 + len(path), msg
    assert msg.count("decoder.") - path.count("decoder.") <= 2
    # f16 encoder has one more level: its extra keys are reported as unexpected
    save_weights(small(encoder="f16c4"), path)
    with pytest.raises(CheckpointMismatchError, match="unexpected"):
        small().load_checkpoint(path)


def test_corrupt_or_missing_checkpoint_is_a_user_error(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        load_weights(torch.nn.Linear(2, 2), str(bad))
    with pytest.raises(UserError, match="not found"):
        load_weights(torch.nn.Linear(2, 2), str(tmp_path / "missing.safetensors"))


def _state(tmp_path, seed):
    torch.manual_seed(seed)
    net = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    net(torch.randn(5, 4)).sum().backward()
    opt.step()
    return net, opt


def test_training_state_round_trip_restores_optimizer_and_rng(tmp_path):
    net, opt = _state(tmp_path, 0)
    d = str(tmp_path / "ckpt" / "last")
    torch.manual_seed(123)
    save_training_state(d, {"net": net}, opt, {"step": 7})
    expected_draw = torch.rand(3)
    net2, opt2 = _state(tmp_path, 1)
    state = load_training_state(d, {"net": net2}, opt2)
    assert state["step"] == 7
    assert torch.equal(torch.rand(3), expected_draw)  # RNG restored to the moment of saving
    assert torch.equal(net2.weight, net.weight)
    for a, b in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        assert all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a)


def test_kill_between_renames_keeps_the_last_good_state(tmp_path):
    net, opt = _state(tmp_path, 0)
    d = str(tmp_path / "last")
    save_training_state(d, {"net": net}, opt, {"step": 1})
    # Simulate a kill mid-swap: last/ already moved to last.old/, the new one not yet renamed in.
    os.rename(d, d + ".old")
    os.makedirs(tmp_path / ".tmp-last-999")  # a half-written new state
    assert resolve_state_dir(d) == d + ".old"
    assert load_training_state(d, {"net": net}, opt)["step"] == 1
    # the next save cleans up and replaces
    save_training_state(d, {"net": net}, opt, {"step": 2})
    assert resolve_state_dir(d) == d and not os.path.exists(d + ".old")
    assert json.load(open(os.path.join(d, "training_state.json")))["step"] == 2


def test_failed_write_leaves_previous_state(tmp_path, monkeypatch):
    net, opt = _state(tmp_path, 0)
    d = str(tmp_path / "last")
    save_training_state(d, {"net": net}, opt, {"step": 1})
    import tokenizer.common.checkpoint as ck

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck, "save_file", disk_full)
    with pytest.raises(UserError, match="No space left"):
        save_training_state(d, {"net": net}, opt, {"step": 2})
    assert load_training_state(d, {"net": net}, opt)["step"] == 1
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]
