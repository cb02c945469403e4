"""eval/stress/cache_memory.py end to end on a tiny synthetic cache: it writes a readable cache, trains on it in a
subprocess, records the trainer's memory, and removes what it wrote."""

import json

import pytest

from eval.stress.cache_memory import main


@pytest.mark.slow
def test_tiny_cache_memory_run(tmp_path):
    work, out = tmp_path / "work", tmp_path / "report"
    argv = ["--entries", "200", "--shard-size", "30", "--dir", str(work), "--model", "DiT-Ti/2", "--steps", "2",
            "--batch-size", "4", "--workers", "1", "--read-items", "50", "--out", str(out)]
    assert main(argv) == 0
    r = json.load(open(f"{out}.json"))
    assert r["entries"] == 200 and r["steps"] == 2 and 0 < r["cache_gb_on_disk"] < 0.01
    m = r["trainer_mb"]
    assert m["VmHWM"] >= m["VmRSS"] > 0 and m["RssAnon"] > 0 and r["worker_peak_mb"]["count"] == 1
    assert "step" in r["log_tail"] or "train" in r["log_tail"]
    assert r["random_reads"]["items"] == 50 and r["random_reads"]["items_per_s"] > 0
    assert not work.exists()  # the cache and the run are deleted without --keep
    assert "| 200 |" in open(f"{out}.md").read()


def test_odd_entry_count_is_a_one_line_error(tmp_path, capsys):
    assert main(["--entries", "201", "--dir", str(tmp_path / "w"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "even" in err
