"""Kill campaign: does a run survive SIGKILLs at random moments, losing nothing?

    nice -n 10 python eval/stress/kill_campaign.py --kills 10 --out docs/reports/kill_campaign

For each trainer (tokenizer.train on 64 Fashion-MNIST images with a 32-wide encoder and the XS decoder; dit.train
with DiT-Ti/1 on the latent cache of a random tokenizer), the run is done once straight, then again under kills:
each attempt is a fresh process that is SIGKILLed, and re-run, until it finishes. Attempts alternate between two
kill times: one drawn uniformly over the wall time of the latest whole uninterrupted run (the straight run at first;
start-up included), and one while a checkpoint is being written (at the first or second temporary checkpoint
folder the attempt creates, after 0-50 ms more). A random time can fall after a resumed attempt has finished: its
round then ends, and when a run finishes before `--kills` kills, another round starts from scratch. Every finished
round must equal the straight run: every step's loss record, every tensor file of checkpoints/last (and best/), the
evaluation results, and the promised outputs present (last, best, each evaluation's results, the final sample grid)
with no temporary file or folder left. Writes <out>.json and <out>.md.
"""

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
sys.path.insert(0, ROOT)

from eval.lib.report import command_line, machine_info, markdown_table, run_script, today, write_report  # noqa: E402
from tokenizer.common.runs import read_loss_log  # noqa: E402

# 32 images at batch 8: 4 steps per epoch, an evaluation (and so a best/ candidate) at every epoch end
TOKENIZER = ["config=configs/fmnist.yaml", "ssdd.encoder_base_channels=32", "dataset.batch_size=8", "dataset.limit=32",
             "training.max_steps=12", "training.eval_freq=1", "training.eval_images=16", "training.ckpt_every=2",
             "training.log_freq=1", "training.sample_every=8", "ssdd.fm_sampler.steps=2", "eval.batch_size=16"]
DIT = ["config=configs/dit_fmnist.yaml", "dataset.limit=32", "cache.batch_size=8", "training.batch_size=8",
       "training.max_steps=24", "training.ckpt_every=2", "training.log_freq=1", "training.sample_every=6",
       "sample.steps=2", "sample.per_class=1", "sample.grid_classes=[0,7]", "sample.decoder_steps=1"]
# (steps, steps with an evaluation, steps with a sample grid) of each config above
PLAN = {"tokenizer": (12, [4, 8, 12], [8]), "dit": (24, [], [6, 12, 18, 24])}


def environment() -> dict:
    # one thread everywhere: the float reduction order, hence every bit, must not depend on the machine's load
    return dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def launch(module: str, args: list, log: str) -> subprocess.Popen:
    with open(log, "a") as f:
        return subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=environment(), stdout=f,
                                stderr=subprocess.STDOUT)


def prepare_dit(work: str) -> list:
    """A random tokenizer with its z_stats.json and the latent cache of 32 images; the DiT run's arguments."""
    import torch

    from tokenizer import SSDD
    from tokenizer.common.checkpoint import save_weights

    torch.manual_seed(0)
    model = SSDD(encoder="f8c4", decoder="XS", encoder_base_channels=32)
    tok = os.path.join(work, "tokenizer", "tok.safetensors")
    os.makedirs(os.path.dirname(tok), exist_ok=True)
    save_weights(model, tok, model.architecture())
    with open(os.path.join(os.path.dirname(tok), "z_stats.json"), "w") as f:
        json.dump({"z_mean": 0.1, "z_std": 0.5}, f)
    args = [*DIT, f"tokenizer.checkpoint={tok}", f"ckpt_dir={work}"]
    proc = launch("dit.cache", args, os.path.join(work, "cache.log"))
    if proc.wait() != 0:
        raise RuntimeError(f"dit.cache failed; see {work}/cache.log")
    return args


def temporary_folders(checkpoints: str, pid: int) -> list:
    try:
        return [n for n in os.listdir(checkpoints) if n.startswith(".tmp-") and n.endswith(f"-{pid}")]
    except FileNotFoundError:
        return []


def attempt(module: str, args: list, run: str, mode: str, rng: random.Random, straight_s: float, log: str) -> dict:
    """One process: killed as `mode` says, or left to finish. Returns what happened."""
    checkpoints = os.path.join(run, "checkpoints")
    t0 = time.time()
    proc = launch(module, args, log)
    record = {"mode": mode}
    if mode == "random":
        record["delay_s"] = round(rng.uniform(0, straight_s), 2)
        try:
            proc.wait(timeout=record["delay_s"])
        except subprocess.TimeoutExpired:
            pass
    else:  # during the n-th checkpoint write of this process
        record["checkpoint_write"], extra = rng.choice([1, 2]), rng.uniform(0, 0.05)
        writes, writing = 0, False
        while proc.poll() is None and writes < record["checkpoint_write"]:
            now = bool(temporary_folders(checkpoints, proc.pid))  # each write reuses the name .tmp-<dir>-<pid>
            writes, writing = writes + (now and not writing), now
            time.sleep(0.002)
        time.sleep(extra)
    if proc.poll() is None:
        record["writing"] = temporary_folders(checkpoints, proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        record["killed_at_s"] = round(time.time() - t0, 2)
    record["returncode"] = proc.returncode
    state = os.path.join(checkpoints, "last", "training_state.json")
    record["last_step_after"] = json.load(open(state))["step"] if os.path.isfile(state) else None
    if proc.returncode not in (0, -signal.SIGKILL):
        raise RuntimeError(f"{module} failed with exit {proc.returncode}; see {log}")
    return record


def outputs(run: str, trainer: str, eval_steps: list, grid_steps: list) -> dict:
    """Which promised outputs exist, and every temporary file or folder left under the run."""
    promised = {"checkpoints/last": os.path.join(run, "checkpoints", "last", "training_state.json")}
    if trainer == "tokenizer":
        promised["checkpoints/best"] = os.path.join(run, "checkpoints", "best", "training_state.json")
        for s in eval_steps:
            promised[f"results/step{s:07d}/eval_training.json"] = os.path.join(run, "results", f"step{s:07d}",
                                                                                "eval_training.json")
    for s in grid_steps:
        promised[f"samples/step{s:07d}.png"] = os.path.join(run, "samples", f"step{s:07d}.png")
    left = [os.path.relpath(os.path.join(d, n), run) for d, dirs, files in os.walk(run) for n in dirs + files
            if ".tmp-" in n or n.endswith(".old")]
    return {"missing": [k for k, p in promised.items() if not os.path.isfile(p)], "promised": len(promised),
            "temporaries_left": left}


def compare(straight: str, killed: str) -> dict:
    """Loss records, tensor files (tensors and metadata; not the bytes, whose header order safetensors varies from
    process to process) and evaluation results of two runs, bit for bit."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    a, b = read_loss_log(straight), read_loss_log(killed)
    tensors_equal, files = True, 0
    for which in ("last", "best"):
        da, db = os.path.join(straight, "checkpoints", which), os.path.join(killed, "checkpoints", which)
        if not os.path.isdir(da):
            continue
        names = sorted(n for n in os.listdir(da) if n.endswith(".safetensors"))
        if names != sorted(n for n in os.listdir(db) if n.endswith(".safetensors")):
            tensors_equal = False
        for n in names:
            ta, tb = load_file(os.path.join(da, n)), load_file(os.path.join(db, n))
            ma, mb = (safe_open(os.path.join(d, n), "pt").metadata() for d in (da, db))
            files += 1
            tensors_equal &= ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta) and ma == mb
        sa, sb = (json.load(open(os.path.join(d, "training_state.json"))) for d in (da, db))
        tensors_equal &= all(sa.get(k) == sb.get(k) for k in ("step", "best", "best_step"))
    evals = {}
    for d in (straight, killed):
        root = os.path.join(d, "results")
        evals[d] = {s: json.load(open(os.path.join(root, s, "eval_training.json")))["results"]
                    for s in sorted(os.listdir(root))} if os.path.isdir(root) else {}
    return {"steps": len(b), "losses_equal": a == b, "tensor_files": files, "tensors_equal": bool(tensors_equal),
            "evaluations_equal": evals[straight] == evals[killed]}


def campaign(trainer: str, args: list, work: str, kills: int, rng: random.Random) -> dict:
    module = "tokenizer.train" if trainer == "tokenizer" else "dit.train"
    total, eval_steps, grid_steps = PLAN[trainer]
    straight = os.path.join(work, "jobs", f"{trainer}_straight")
    t0 = time.time()
    proc = launch(module, [*args, f"run_name={trainer}_straight"], os.path.join(work, f"{trainer}_straight.log"))
    if proc.wait() != 0:
        raise RuntimeError(f"the straight {trainer} run failed; see {work}/{trainer}_straight.log")
    straight_s = time.time() - t0
    rounds, done, full_run_s = [], 0, straight_s
    while done < kills:
        name = f"{trainer}_killed{len(rounds)}"
        run, log = os.path.join(work, "jobs", name), os.path.join(work, f"{name}.log")
        attempts = []
        while True:
            mode = "random" if (done + len(attempts)) % 2 == 0 else "checkpoint"
            t0 = time.time()
            attempts.append(attempt(module, [*args, f"run_name={name}"], run, mode, rng, full_run_s, log))
            if attempts[-1]["returncode"] == 0:
                if len(attempts) == 1:  # a whole run, uninterrupted: the scale of the next random kill times
                    full_run_s = time.time() - t0
                break
        kills = sum(a["returncode"] != 0 for a in attempts)
        done += kills
        result = {"run": name, "kills": kills, "attempts": attempts,
                  **compare(straight, run), **outputs(run, trainer, eval_steps, grid_steps)}
        result["identical"] = (result["losses_equal"] and result["tensors_equal"] and result["evaluations_equal"]
                               and not result["missing"] and not result["temporaries_left"])
        rounds.append(result)
        print(f"{trainer} round {len(rounds)}: {result['kills']} kills, identical: {result['identical']}", flush=True)
    return {"trainer": trainer, "module": module, "steps": total, "straight_s": round(straight_s, 1),
            "kills": done, "rounds": rounds, "all_identical": all(r["identical"] for r in rounds)}


def report(args, results: list) -> str:
    rows = []
    for r in results:
        for i, rd in enumerate(r["rounds"]):
            if not rd["kills"]:
                continue
            modes = [a for a in rd["attempts"] if a["returncode"] != 0]
            rows.append({"trainer": r["trainer"], "round": i + 1, "kills": rd["kills"],
                         "at_ckpt": sum(a["mode"] == "checkpoint" for a in modes),
                         "mid_write": sum(bool(a.get("writing")) for a in modes),
                         "steps": rd["steps"], "losses": "identical" if rd["losses_equal"] else "DIFFERENT",
                         "tensors": f"{rd['tensor_files']} files identical" if rd["tensors_equal"] else "DIFFERENT",
                         "evals": "identical" if rd["evaluations_equal"] else "DIFFERENT",
                         "outputs": "all present" if not rd["missing"] else f"missing {rd['missing']}",
                         "tmp": len(rd["temporaries_left"])})
    lead = [(k, k) for k in ("trainer", "round", "kills", "at_ckpt", "mid_write", "steps", "losses", "tensors",
                             "evals", "outputs", "tmp")]
    lines = [f"# Kill campaign ({today()})", "", f"`{command_line('eval/stress/kill_campaign.py', args.argv)}`", "",
             "Columns: kills in the round; at_ckpt: kills timed to a checkpoint write; mid_write: kills that landed "
             "while a temporary checkpoint folder existed; tmp: temporary files or folders left at the end.", "",
             *markdown_table(rows, [], lead), "",
             *[f"- {r['trainer']}: {r['kills']} kills in {len(r['rounds'])} rounds ("
               f"{sum(not rd['kills'] for rd in r['rounds'])} of them ended before a kill landed; not in the table, "
               f"compared too), straight run {r['straight_s']} s; every round identical to the straight run, "
               f"with all outputs and no temporary left: **{r['all_identical']}**" for r in results]]
    return "\n".join(lines) + "\n"


def main_campaign(args) -> dict:
    work = args.workdir or tempfile.mkdtemp(prefix="kill_campaign_")
    os.makedirs(work, exist_ok=True)
    rng = random.Random(args.seed)
    results = []
    for trainer in args.trainers:
        run_args = [*TOKENIZER, f"ckpt_dir={work}"] if trainer == "tokenizer" else prepare_dit(work)
        results.append(campaign(trainer, run_args, work, args.kills, rng))
    record = {"date": today(), "command": command_line("eval/stress/kill_campaign.py", args.argv),
              "machine": machine_info("cpu"), "seed": args.seed, "workdir": work, "results": results}
    print("wrote", *write_report(args.out, record, report(args, results)))
    if not args.keep and not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return record


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=10, help="at least this many SIGKILLs per trainer")
    ap.add_argument("--trainers", nargs="+", choices=["tokenizer", "dit"], default=["tokenizer", "dit"])
    ap.add_argument("--seed", type=int, default=0, help="of the kill times")
    ap.add_argument("--workdir", default=None, help="where the runs go (default: a temporary folder, removed after)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--out", default="docs/reports/kill_campaign")
    return run_script(ap, main_campaign, argv)


if __name__ == "__main__":
    sys.exit(main())
