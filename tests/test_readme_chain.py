"""The README's "Your own data" commands, run as written: the fenced block between the `your-data-commands` markers
is the one list of commands that the README shows and this test executes, line by line, with bash from the
repository root, on a generated image folder. Only `DATA` (the folder) and `RUNS` (a temporary runs folder) differ
from what a user types; the sizes and step counts are the README's own (configs/yourdata_cpu.yaml,
configs/yourdata_dit_cpu.yaml). The folder's name holds a space, as a user's may: the commands quote their paths."""

import json
import os
import re
import shlex
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import CLASSES, ROOT, make_folder
from PIL import Image

from tokenizer.metrics import INCEPTION_FILE

README = os.path.join(ROOT, "README.md")
START, END = "<!-- your-data-commands:start -->", "<!-- your-data-commands:end -->"
VARIABLES = ("DATA", "RUNS")  # what the README sets first and the test gives its own values


def readme_commands(path: str = README) -> tuple[dict, list]:
    """({variable: README value}, [command]) of the bash block between the markers: comment lines dropped,
    backslash-continued lines joined, each remaining line one command."""
    text = open(path, encoding="utf-8").read()
    assert text.count(START) == 1 and text.count(END) == 1, "the README must mark its command block once"
    block = text.split(START)[1].split(END)[0]
    (code,) = re.findall(r"```bash\n(.*?)```", block, re.S)
    variables, commands, pending = {}, [], ""
    for line in code.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1]
            continue
        line, pending = pending + line, ""
        assignment = re.match(r"^([A-Z_]+)=(\S+)", line)
        if assignment:
            variables[assignment.group(1)] = assignment.group(2)
        else:
            commands.append(" ".join(line.split()))
    assert not pending, "the block ends in a continued line"
    return variables, commands


def test_the_readme_block_is_what_the_chain_test_runs():
    variables, commands = readme_commands()
    assert tuple(variables) == VARIABLES  # nothing else is substituted
    programs = [" ".join(shlex.split(c)[:3 if c.startswith("python -m") else 2]) for c in commands]
    assert programs == ["python -m tokenizer.data_check", *["python -m tokenizer.train"] * 4, "python -m dit.cache",
                        "python -m dit.train", "python -m dit.export", "python sample/generate.py",
                        "python sample/sample_ddp.py", "python eval/gfid.py"]
    tasks = [re.findall(r"(task=\w+|distill_teacher=true)", c) for c in commands[1:5]]
    assert tasks == [[], ["task=eval"], ["task=z_stats"], ["distill_teacher=true"]]
    for c in commands:
        assert "$DATA" not in c.replace('"$DATA', "") and "$RUNS" not in c.replace('"$RUNS', ""), c  # quoted


def snapshot(root) -> dict:
    seen = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            st = os.stat(os.path.join(folder, name))
            seen[os.path.join(folder, name)] = (st.st_size, st.st_mtime_ns)
    return seen


def run(command: str, env: dict, timeout: int = 600) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    done = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return done, time.perf_counter() - t0


@pytest.mark.slow
def test_the_readme_commands_run_as_written(tmp_path, inception_file):
    variables, commands = readme_commands()
    data = make_folder(tmp_path / "my photos", train=16, val=2)  # 4 classes: 64 train and 8 val images
    runs = tmp_path / "runs"
    # gfid takes torch-fidelity's Inception from its download cache, as it would after a download: random weights
    checkpoints = tmp_path / "torch_home" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    os.symlink(inception_file, checkpoints / INCEPTION_FILE)
    env = {**os.environ, "DATA": str(data), "RUNS": str(runs), "TORCH_HOME": str(tmp_path / "torch_home"),
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
           "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    times = []
    for command in commands:
        done, seconds = run(command, env)
        times.append((seconds, command))
        assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        if "tokenizer.data_check" in command:
            assert "train: 0 unreadable of 64" in done.stdout and "val: 0 unreadable of 8" in done.stdout
        if "eval/gfid.py" in command:
            assert "warning: samples: 32 images" in done.stderr and done.stdout.strip().splitlines()[-1].startswith(
                "FID ")
    print("\n".join(f"{s:6.1f} s  {c}" for s, c in times) + f"\n{sum(s for s, _ in times):6.1f} s in all")

    jobs, real = runs / "jobs", str(data.resolve())
    # the tokenizer, its evaluation, z_stats and distillation: each on the given folder, each recorded
    tok = json.load(open(jobs / "tok" / "data.json"))
    assert tok["train"]["root"] == real and tok["train"]["class_names"] == CLASSES and tok["train"]["files"] == 64
    assert (jobs / "tok" / "checkpoints" / "last" / "model_ae_ema.safetensors").is_file()
    (z_stats,) = (jobs / "tok" / "results").glob("step*/z_stats.json")
    assert json.load(open(z_stats))["data"]["root"] == real
    evals = list((jobs / "tok" / "results").glob("step*/eval_*steps.json"))
    assert evals and all(json.load(open(e))["data"]["root"] == real for e in evals)
    from tokenizer.common.checkpoint import read_weights

    _, meta = read_weights(str(jobs / "tok_1step" / "checkpoints" / "last" / "model_ae_ema.safetensors"))
    assert int(meta["single_step"]) == 1
    # the latent cache records the data that made it: the tokenizer's training data, file for file
    (cache,) = (runs / "latents").iterdir()
    cache_meta = json.load(open(cache / "cache.json"))
    assert cache_meta["data"]["root"] == real and cache_meta["data"]["fingerprint"] == tok["train"]["fingerprint"]
    assert cache_meta["data"]["class_names"] == CLASSES
    assert json.load(open(jobs / "dit" / "data.json"))["cache"] == str(cache)
    # the bundle, the generated images and the samples carry the folder's classes
    bundle = json.load(open(runs / "bundle" / "bundle.json"))
    assert bundle["dit"]["class_names"] == CLASSES and bundle["decoder"]["single_step"] and bundle["im_size"] == 32
    pngs = sorted(p.name for p in (runs / "generated").glob("*.png"))
    assert pngs == ["0000_cat_0.png", "0000_cat_1.png", "0001_dog_0.png", "0001_dog_1.png", "grid.png"]
    with np.load(runs / "samples" / "first.npz") as z:
        assert z["arr_0"].shape == (32, 32, 32, 3) and np.bincount(z["arr_1"]).tolist() == [8] * 4
    assert Image.open(runs / "samples" / "first" / "000000.png").size == (32, 32)
    # the metrics: the 8 val images of every class folder against the 32 samples, with the small-set warnings
    r = json.load(open(runs / "gfid.json"))
    assert r["n_ref"] == 8 and r["n_samples"] == 32 and np.isfinite(r["fid"]) and r["image_size"] == 32
    assert [w.split(":")[0] for w in r["warnings"]] == ["reference", "samples"]

    # bad data: the same commands on a folder with a corrupt file and an empty class folder stop in one line each,
    # before any work, and leave the runs, the cache, the bundle and the metrics as they were
    bad = make_folder(tmp_path / "bad", train=16, val=2, empty="zz_empty", corrupt="dog/zz_corrupt.png")
    (bad / "val" / "cat" / "zz_corrupt.png").write_bytes(b"\x89PNG not an image")
    before = snapshot(runs)
    env_bad = {**env, "DATA": str(bad)}
    refusals = {"tokenizer.train": "zz_empty", "dit.cache": "zz_empty", "eval/gfid.py": "cannot read image"}
    for command in commands:
        what = next((k for k in refusals if k in command), None)
        if what is None or "task=" in command or "distill" in command:
            continue
        done, _ = run(command, env_bad)
        last = done.stderr.strip().splitlines()[-1]
        assert done.returncode != 0 and last.startswith("error:") and refusals[what] in last, (command, done.stderr)
        assert "Traceback" not in done.stderr
    assert snapshot(runs) == before
