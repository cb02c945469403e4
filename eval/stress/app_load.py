"""Load test of the Gradio app: N concurrent /generate requests to a loopback app, each answered or refused.

    python eval/stress/app_load.py --requests 50 --out docs/reports/app_load   # starts `python app/app.py` (free port)
    python eval/stress/app_load.py --url http://127.0.0.1:7860 --requests 50 --out runs/app_load   # an app running

All requests are released at once (a barrier), each from its own thread through one `gradio_client.Client`. Each
ends answered (its images arrived), refused (the queue was full: Gradio answers 503 and the client raises
"Queue is full"), failed (any other error) or lost (no outcome within --timeout). Afterwards one more request checks
that the app still serves. Writes <out>.json and <out>.md: answered requests per second over the burst, p50/p95
latency of the answered requests (queue wait included), the counts, the app's queue settings, and the machine with
its load average. Only loopback addresses are ever contacted: --url must be a literal loopback IP.
"""

import argparse
import ipaddress
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import numpy as np

from eval.lib.report import command_line, machine_info, markdown_table, run_script, today, write_report
from tokenizer.common.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository


def loopback_url(url: str) -> str:
    host = urlparse(url).hostname or ""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise UserError(f"--url must be a loopback address such as http://127.0.0.1:7860, got {url!r}")
    return url.rstrip("/")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, app: subprocess.Popen | None, log: str | None, timeout: float) -> None:
    deadline = time.time() + timeout
    while True:
        if app is not None and app.poll() is not None:
            last = open(log).read().strip().splitlines()[-1:] if log else []
            raise UserError(f"the app exited with status {app.returncode}: {' '.join(last) or 'no output'}")
        try:
            urllib.request.urlopen(url, timeout=5)
            return
        except OSError:
            if time.time() > deadline:
                raise UserError(f"the app at {url} did not answer within {timeout:.0f} s") from None
            time.sleep(0.5)


def start_app(args, log: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, os.path.join(ROOT, "app", "app.py"), "--host", "127.0.0.1", "--port", str(port),
               "--concurrency", str(args.concurrency), "--max-queue", str(args.max_queue), "--device", args.device]
    if args.ckpt:
        command += ["--ckpt", args.ckpt]
    if args.decoder:
        command += ["--decoder", *args.decoder]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    app = subprocess.Popen(command, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    return app, f"http://127.0.0.1:{port}"


def fire(url: str, n: int, request: dict, timeout: float) -> tuple[list, float]:
    """n requests released together -> ([{"outcome", "latency_s", "error"}], wall seconds of the burst)."""
    from gradio_client import Client

    client = Client(url, verbose=False)
    barrier = threading.Barrier(n + 1)
    deadline = [0.0]

    def one(i: int) -> dict:
        barrier.wait()
        t0 = time.perf_counter()
        try:
            job = client.submit(**{**request, "seed": i}, api_name="/generate")
            job.result(timeout=max(1.0, deadline[0] - time.perf_counter()))
            outcome, error = "answered", None
        except TimeoutError:
            outcome, error = "lost", "no outcome before --timeout"
        except Exception as e:  # the client reports a full queue as its QueueError
            text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            outcome, error = ("refused" if "queue is full" in text.lower() else "failed"), text
        return {"outcome": outcome, "latency_s": time.perf_counter() - t0, "error": error}

    with ThreadPoolExecutor(max_workers=n) as pool:
        futures = [pool.submit(one, i) for i in range(n)]
        deadline[0] = time.perf_counter() + timeout
        start = time.perf_counter()
        barrier.wait()
        results = [f.result() for f in futures]
    return results, time.perf_counter() - start


def still_serving(url: str, request: dict) -> bool:
    from gradio_client import Client

    try:
        Client(url, verbose=False).submit(**request, api_name="/generate").result(timeout=120)
        return True
    except Exception:
        return False


def summarise(results: list, wall_s: float) -> dict:
    counts = {k: sum(r["outcome"] == k for r in results) for k in ("answered", "refused", "failed", "lost")}
    answered = [r["latency_s"] for r in results if r["outcome"] == "answered"]
    refused = [r["latency_s"] for r in results if r["outcome"] == "refused"]

    def pct(xs, q):
        return float(np.percentile(xs, q)) if xs else None

    return {**counts, "wall_s": wall_s, "answered_per_s": counts["answered"] / wall_s,
            "latency_p50_s": pct(answered, 50), "latency_p95_s": pct(answered, 95),
            "latency_max_s": max(answered, default=None), "refusal_p50_s": pct(refused, 50),
            "errors": sorted({r["error"] for r in results if r["outcome"] in ("failed", "lost")})}


def load_test(args) -> dict:
    if not 1 <= args.requests <= 500:
        raise UserError(f"--requests must be in 1..500, got {args.requests}")
    if args.num < 1 or args.timeout <= 0:
        raise UserError("--num must be >= 1 and --timeout > 0")
    request = {"classes": args.classes, "num": args.num}
    if args.steps is not None:
        request["steps"] = args.steps
    app, log = None, None
    if args.url:
        url = loopback_url(args.url)
        wait_until_up(url, None, None, 30)
    else:
        log = os.path.join(tempfile.mkdtemp(prefix="app_load_"), "app.log")
        app, url = start_app(args, log)
    try:
        if app is not None:
            wait_until_up(url, app, log, args.start_timeout)
        print(f"{args.requests} concurrent /generate requests ({request}) to {url}", flush=True)
        results, wall_s = fire(url, args.requests, request, args.timeout)
        alive = still_serving(url, {**request, "seed": 0}) and (app is None or app.poll() is None)
    finally:
        if app is not None:
            app.terminate()
            try:
                app.wait(timeout=30)
            except subprocess.TimeoutExpired:
                app.kill()
    row = {**summarise(results, wall_s), "requests": args.requests, "alive_after": alive}
    record = {"command": command_line("eval/stress/app_load.py", args.argv), "date": today(), "url": url,
              "machine": machine_info("cpu"), "request": request, "results": [row],
              "app": None if args.url else {"concurrency": args.concurrency, "max_queue": args.max_queue,
                                            "ckpt": args.ckpt or "embedded bundle", "device": args.device},
              "raw": results}
    m = record["machine"]
    settings = (f"the app started by the script (concurrency {args.concurrency}, max queue {args.max_queue}, "
                f"{args.ckpt or 'embedded bundle'}, {args.device})" if not args.url else f"the app at {url}")
    lines = ["# Gradio app under load", "",
             f"{args.requests} concurrent `/generate` requests ({request}, seeds 0..{args.requests - 1}) to "
             f"{settings}; {m['cpu']} ({m['cpus']} CPUs), load average {m['load_average']}, {record['date']}.", "",
             f"Command: `{record['command']}`", "",
             *markdown_table([row], [("answered", "answered", "{}"), ("refused", "refused (queue full)", "{}"),
                                     ("failed", "failed", "{}"), ("lost", "lost", "{}"),
                                     ("answered_per_s", "answered requests/s", "{:.2f}"),
                                     ("latency_p50_s", "p50 latency (s)", "{:.2f}"),
                                     ("latency_p95_s", "p95 latency (s)", "{:.2f}"),
                                     ("refusal_p50_s", "p50 refusal (s)", "{:.3f}"), ("wall_s", "wall (s)", "{:.1f}"),
                                     ("alive_after", "serving afterwards", "{}")],
                            lead=[("requests", "requests")]), ""]
    if row["errors"]:
        lines += ["Errors: " + "; ".join(row["errors"]), ""]
    write_report(args.out, record, "\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {args.out}.json and {args.out}.md")
    if row["lost"] or row["failed"] or not alive:
        raise UserError(f"{row['lost']} lost and {row['failed']} failed requests; serving afterwards: {alive}")
    return record


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--url", default=None, help="an app already running on a loopback address (default: start one)")
    ap.add_argument("--class", dest="classes", nargs="+", default=["0"], help="classes of each request (names or ids)")
    ap.add_argument("--num", type=int, default=1, help="images per class in each request")
    ap.add_argument("--steps", type=int, default=None, help="DiT steps (default: the app's)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds the whole burst may take")
    ap.add_argument("--ckpt", default=None, help="generator for the started app (default: the embedded bundle)")
    ap.add_argument("--decoder", nargs="+", default=None, help="decoder files for the started app")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--concurrency", type=int, default=1, help="the started app's --concurrency")
    ap.add_argument("--max-queue", type=int, default=16, help="the started app's --max-queue")
    ap.add_argument("--start-timeout", type=float, default=300, help="seconds the started app may take to come up")
    ap.add_argument("--out", default="runs/app_load")
    return run_script(ap, load_test, argv)


if __name__ == "__main__":
    sys.exit(main())
