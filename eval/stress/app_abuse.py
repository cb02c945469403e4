"""Abuse run of the Gradio app: what an unfriendly client sends, all at once, against a loopback app.

    python eval/stress/app_abuse.py --out docs/reports/app_abuse     # starts `python app/app.py` on a free port
    python eval/stress/app_abuse.py --url http://127.0.0.1:7860 --out runs/abuse   # an app running here

Phases (raw HTTP through Gradio's /call API, as curl would send it; each request from one of several loopback
source addresses 127.0.0.2, 127.0.0.3, ... so that the app sees several clients):
  probes       malformed and hostile requests, one by one: bad class strings ("--5", "²", "١", a 5,000-digit
               number, a 50,000-character name, a 10 MB name), a fractional seed, a NaN CFG scale, too few values,
               broken JSON, a request over the cost cap, internal endpoints, a foreign Host header, /monitoring,
               a file outside the app's; each must get a one-line refusal without object reprs, paths or tracebacks;
  uploads      3 x 20 MB to /gradio_api/upload, one of them from another origin: all refused, nothing stored;
  mixed        30 concurrent requests (valid and invalid, /generate and /compare) from 6 clients;
  maximal      17 of the largest requests the app accepts from one client, while another client asks for a small
               image: the client's share of the queue is capped, the other waits behind that share only;
  abandoned    a large request whose client reads for 2 s and goes: the app must be free soon after;
  generations  100 small generations from 4 clients.
Each request ends answered (its result arrived), refused (a 4xx/503 answer before the queue: the message must be one
line), failed (an error after it was queued) or lost (no outcome before --timeout). Reports requests lost, the
longest any valid request waited, the app's temp folder size and its resident memory before and after.
Writes <out>.json and <out>.md. Only loopback addresses are contacted.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import httpx  # noqa: E402

from app.limits import DEFAULT_MAX_COST, LIMITS  # noqa: E402
from eval.lib.report import command_line, machine_info, markdown_table, run_script, today, write_report  # noqa: E402
from eval.stress.app_load import free_port, loopback_url, wait_until_up  # noqa: E402  (the same loopback rules)
from tokenizer.common.errors import UserError  # noqa: E402

LEAKS = ("Traceback", "object at 0x", "/tmp/", "/home/", "/work/", "/usr/", "site-packages", "File \"")
CLIENTS = [f"127.0.0.{i}" for i in range(2, 10)]


def client(address: str, timeout: float) -> httpx.Client:
    """An HTTP client whose connections come from `address` (any 127.0.0.x is this machine's loopback)."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=timeout)


def one_line_refusal(response: httpx.Response) -> tuple[bool, str]:
    """(is the refusal one clean line, its text): a `detail` string, or the message of a validation list."""
    text = response.text
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = text
    if isinstance(detail, list):
        detail = " ".join(d.get("message", "") for d in detail if isinstance(d, dict) and not d.get("is_valid", True))
    detail = str(detail)
    clean = "\n" not in detail.strip() and not any(leak in text for leak in LEAKS) and len(detail) < 400
    return clean, detail


def call(url: str, address: str, api: str, data, timeout: float, read_for: float | None = None, raw: bytes = None,
         headers: dict | None = None) -> dict:
    """POST /gradio_api/call/<api> then read its result stream -> {"outcome", "wait_s", "status", "message"}.

    read_for: stop reading after this many seconds (the client goes away)."""
    t0 = time.perf_counter()
    out = {"api": api, "client": address}
    try:
        with client(address, timeout) as http:
            body = raw if raw is not None else json.dumps({"data": data}).encode()
            response = http.post(f"{url}/gradio_api/call/{api}", content=body,
                                 headers={"content-type": "application/json", **(headers or {})})
            out["status"] = response.status_code
            if response.status_code != 200:
                clean, message = one_line_refusal(response)
                return {**out, "outcome": "refused", "clean": clean, "message": message,
                        "wait_s": time.perf_counter() - t0}
            event_id = response.json()["event_id"]
            event, payload = None, None
            limit = httpx.Timeout(timeout, read=read_for) if read_for is not None else None
            try:
                with http.stream("GET", f"{url}/gradio_api/call/{api}/{event_id}", timeout=limit or timeout) as stream:
                    for line in stream.iter_lines():
                        if line.startswith("event:"):
                            event = line.split(":", 1)[1].strip()
                        elif line.startswith("data:"):
                            payload = line.split(":", 1)[1].strip()
                            if event in ("complete", "error"):
                                break
                        if read_for is not None and time.perf_counter() - t0 > read_for:
                            raise httpx.ReadTimeout("the client goes")
            except httpx.ReadTimeout:
                if read_for is None:
                    raise
                return {**out, "outcome": "abandoned", "wait_s": time.perf_counter() - t0}
            wait = time.perf_counter() - t0
            if event == "complete":
                leaks = [leak for leak in LEAKS if leak in payload]
                return {**out, "outcome": "answered", "wait_s": wait, "clean": not leaks}
            message = json.loads(payload) if payload else None
            message = message.get("error") if isinstance(message, dict) else message
            return {**out, "outcome": "failed", "wait_s": wait, "message": str(message),
                    "clean": not any(leak in str(payload) for leak in LEAKS)}
    except httpx.TimeoutException:
        return {**out, "outcome": "lost", "wait_s": time.perf_counter() - t0, "message": "no outcome before --timeout"}
    except httpx.HTTPError as e:
        return {**out, "outcome": "lost", "wait_s": time.perf_counter() - t0, "message": type(e).__name__}


# ----------------------------------------------------------------------------- the requests


def generate(classes, num=1, seed=0, steps=12, cfg=2.0, sampler=None, decoder=None, decoder_steps=1):
    return ["generate", [classes, num, seed, cfg, steps, sampler, decoder, decoder_steps]]


def compare(classes, num=1, seed=0, steps=12, cfg=2.0, sampler=None):
    return ["compare", [classes, num, seed, cfg, steps, sampler]]


def app_settings(url: str) -> dict:
    """The app's defaults as the page shows them (sampler, steps, decoders) from Gradio's config."""
    config = httpx.get(f"{url}/config", timeout=30).json()
    values = {c.get("props", {}).get("elem_id"): c.get("props", {}) for c in config["components"]}
    return {"sampler": values["sampler"]["value"], "steps": int(values["steps"]["value"]),
            "decoder": values["decoder"]["value"], "classes": len(values["classes"]["choices"])}


def fill(request, settings):
    api, data = request
    data = list(data)
    if data[5] is None:
        data[5] = settings["sampler"]
    if api == "generate" and data[6] is None:
        data[6] = settings["decoder"]
    return api, data


def probes(url: str, settings: dict, timeout: float) -> list:
    """Hostile requests one by one -> rows {"case", "outcome", "status", "clean", "message"}."""
    n = settings["classes"]
    big = 10 * 2**20
    cases = [("class '--5'", generate(["--5"])), ("class '²'", generate(["²"])), ("class '١'", generate(["١"])),
             ("class: a 5,000-digit number", generate(["9" * 5000])),
             ("class name of 50,000 characters", generate(["y" * 50_000])),
             (f"class {n} (one past the last)", generate([n])), ("class -1", generate([-1])),
             ("seed 1.5", generate([0], seed=1.5)), ("seed 2^32", generate([0], seed=2**32)),
             ("too many classes", generate(list(range(9)))), ("classes as a dict", generate({"a": 1})),
             ("over the cost cap", compare(list(range(8)), num=8, steps=DEFAULT_MAX_COST // 64 + 1)),
             ("10,000 images per class", generate([0], num=10_000)), ("steps -1", generate([0], steps=-1))]
    rows = []
    for name, request in cases:
        api, data = fill(request, settings)
        rows.append({"case": name, **call(url, CLIENTS[0], api, data, timeout)})
    raw = {"NaN CFG scale": (b'{"data": [[0], 1, 0, NaN, 12, "%s", "%s", 1]}'
                             % (settings["sampler"].encode(), settings["decoder"].encode()), "generate"),
           "too few values": (b'{"data": [[7]]}', "generate"), "broken JSON": (b'{"data": [', "generate"),
           "class name of 10 MB": (b'{"data": [["' + b"y" * big + b'"]]}', "generate"),
           "internal endpoint lay_out": (b'{"data": [{}]}', "lay_out")}
    for name, (body, api) in raw.items():
        rows.append({"case": name, **call(url, CLIENTS[0], api, None, timeout, raw=body)})
    with client(CLIENTS[0], timeout) as http:
        join = http.post(f"{url}/gradio_api/queue/join", json={"data": [], "fn_index": 0, "session_hash": "x"})
        host = http.get(f"{url}/", headers={"host": "attacker.example"})
        for name, response in (("internal fn_index 0 via the queue", join),
                               ("foreign Host header (DNS rebinding)", host),
                               ("/monitoring", http.get(f"{url}/monitoring")),
                               ("/monitoring/summary", http.get(f"{url}/monitoring/summary")),
                               ("file outside the app (/etc/passwd)", http.get(f"{url}/gradio_api/file=/etc/passwd"))):
            clean, message = one_line_refusal(response)
            rows.append({"case": name, "outcome": "refused" if response.status_code >= 400 else "answered",
                         "status": response.status_code, "clean": clean, "message": message})
    return rows


def uploads(url: str, timeout: float) -> list:
    rows = []
    with client(CLIENTS[1], timeout) as http:
        for i, origin in enumerate((None, None, "http://attacker.example")):
            t0 = time.perf_counter()
            response = http.post(f"{url}/gradio_api/upload", files={"files": (f"f{i}.bin", os.urandom(20 * 2**20))},
                                 headers={"origin": origin} if origin else {})
            clean, message = one_line_refusal(response)
            rows.append({"case": f"20 MB upload{' from another origin' if origin else ''}",
                         "outcome": "refused" if response.status_code >= 400 else "answered",
                         "status": response.status_code, "clean": clean, "message": message,
                         "wait_s": time.perf_counter() - t0})
    return rows


def burst(url: str, requests: list, timeout: float) -> list:
    """[(client address, (api, data), read_for)] released together -> their rows, in order."""
    barrier = threading.Barrier(len(requests))

    def one(item):
        address, (api, data), read_for = item
        barrier.wait()
        return call(url, address, api, data, timeout, read_for=read_for)

    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        return list(pool.map(one, requests))


def mixed(url: str, settings: dict, timeout: float) -> list:
    kinds = [generate([0], num=2), compare([7]), generate(["sneaker" if settings["classes"] == 10 else 1]),
             generate(["--5"]), compare([0], num=2), generate([0], seed=1.5), compare([0, 1]),
             generate([0], steps=0), compare(list(range(8)), num=8, steps=DEFAULT_MAX_COST), generate([1], num=3)]
    requests = [(CLIENTS[i % 6], fill(kinds[i % len(kinds)], settings), None) for i in range(30)]
    return [{"phase": "mixed", **row} for row in burst(url, requests, timeout)]


def maximal(url: str, settings: dict, timeout: float) -> list:
    steps = DEFAULT_MAX_COST // (LIMITS["classes"] * LIMITS["num"])
    big = fill(compare(list(range(LIMITS["classes"])), num=LIMITS["num"], steps=steps), settings)
    requests = [(CLIENTS[2], big, None)] * 17
    rows = []
    with ThreadPoolExecutor(max_workers=2) as pool:
        flood = pool.submit(burst, url, requests, timeout)
        time.sleep(2.0)  # the flood is in; another client asks for one small image
        other = pool.submit(call, url, CLIENTS[3], *fill(generate([0]), settings), timeout)
        rows += [{"phase": "maximal", **row} for row in flood.result()]
        rows.append({"phase": "maximal", "case": "another client's small request", **other.result()})
    return rows


def abandoned(url: str, settings: dict, timeout: float) -> list:
    steps = DEFAULT_MAX_COST // (LIMITS["classes"] * LIMITS["num"])
    big = fill(compare(list(range(LIMITS["classes"])), num=LIMITS["num"], steps=steps), settings)
    gone = call(url, CLIENTS[4], *big, timeout, read_for=2.0)
    t0 = time.perf_counter()
    after = call(url, CLIENTS[5], *fill(generate([0]), settings), timeout)
    return [{"phase": "abandoned", "case": "a maximal request read for 2 s", **gone},
            {"phase": "abandoned", "case": "the next client's small request", **after,
             "after_abandon_s": time.perf_counter() - t0}]


def generations(url: str, settings: dict, n: int, timeout: float) -> list:
    rows = []
    lock = threading.Lock()

    def worker(k: int):
        for i in range(k, n, 4):
            row = call(url, CLIENTS[4 + k], *fill(generate([i % settings["classes"]], seed=i), settings), timeout)
            with lock:
                rows.append({"phase": "generations", **row})

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return rows


# ----------------------------------------------------------------------------- the run


def rss_bytes(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return None


def folder_bytes(path: str | None) -> int | None:
    if path is None or not os.path.isdir(path):
        return None if path is None else 0
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files
               if os.path.isfile(os.path.join(d, f)))


def start_app(args, temp: str):
    port = free_port()
    command = [sys.executable, os.path.join(ROOT, "app", "app.py"), "--host", "127.0.0.1", "--port", str(port),
               "--device", args.device]
    if args.ckpt:
        command += ["--ckpt", args.ckpt]
    if args.decoder:
        command += ["--decoder", *args.decoder]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p),
           "GRADIO_TEMP_DIR": os.path.join(temp, "gradio"), "TMPDIR": temp}
    log = os.path.join(temp, "app.log")
    app = subprocess.Popen(command, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    return app, f"http://127.0.0.1:{port}", log


def summarise(rows: list) -> dict:
    valid = [r for r in rows if r.get("outcome") == "answered" and "wait_s" in r]
    return {"requests": len(rows), **{k: sum(r.get("outcome") == k for r in rows)
                                      for k in ("answered", "refused", "failed", "lost", "abandoned")},
            "unclean": sum(r.get("clean") is False for r in rows),
            "longest_valid_wait_s": max((r["wait_s"] for r in valid), default=None)}


def abuse(args) -> dict:
    temp = tempfile.mkdtemp(prefix="app_abuse_")
    app = None
    try:
        if args.url:
            url, log = loopback_url(args.url), None
            wait_until_up(url, None, None, 30)
        else:
            app, url, log = start_app(args, temp)
            wait_until_up(url, app, log, args.start_timeout)
        pid = app.pid if app else None
        settings = app_settings(url)
        rss_before, temp_before = rss_bytes(pid), folder_bytes(temp if app else None)
        phases = {}
        for name, run in (("probes", lambda: probes(url, settings, args.timeout)),
                          ("uploads", lambda: uploads(url, args.timeout)),
                          ("mixed", lambda: mixed(url, settings, args.timeout)),
                          ("maximal", lambda: maximal(url, settings, args.timeout)),
                          ("abandoned", lambda: abandoned(url, settings, args.timeout)),
                          ("generations", lambda: generations(url, settings, args.generations, args.timeout))):
            t0 = time.perf_counter()
            print(f"{name}...", flush=True)
            phases[name] = {"rows": run(), "wall_s": time.perf_counter() - t0}
            print(f"  {summarise(phases[name]['rows'])}", flush=True)
        alive = call(url, CLIENTS[0], *fill(generate([0]), settings), args.timeout)["outcome"] == "answered"
        rss_after, temp_after = rss_bytes(pid), folder_bytes(temp if app else None)
        if temp_after is not None and log is not None:
            temp_after -= os.path.getsize(log)  # the app's own log, written by this script
            temp_before -= min(temp_before, os.path.getsize(log))
    finally:
        if app is not None:
            app.terminate()
            try:
                app.wait(timeout=30)
            except Exception:  # noqa: BLE001
                app.kill()
            shutil.rmtree(temp, ignore_errors=True)
    every = [r for p in phases.values() for r in p["rows"]]
    total = summarise(every)
    record = {"command": command_line("eval/stress/app_abuse.py", args.argv), "date": today(), "url": url,
              "machine": machine_info("cpu"), "app": {"ckpt": args.ckpt or "embedded bundle", "device": args.device}
              if app else None, "settings": settings, "totals": total, "alive_after": alive,
              "rss_before_mb": rss_before / 2**20 if rss_before else None,
              "rss_after_mb": rss_after / 2**20 if rss_after else None,
              "temp_before_bytes": temp_before, "temp_after_bytes": temp_after,
              "phases": {k: {"wall_s": v["wall_s"], **summarise(v["rows"])} for k, v in phases.items()},
              "raw": {k: v["rows"] for k, v in phases.items()}}
    m = record["machine"]
    columns = [("answered", "answered", "{}"), ("refused", "refused", "{}"), ("failed", "failed", "{}"),
               ("lost", "lost", "{}"), ("abandoned", "abandoned by the client", "{}"),
               ("unclean", "messages with reprs/paths/tracebacks", "{}"),
               ("longest_valid_wait_s", "longest wait of an answered request (s)", "{:.1f}"),
               ("wall_s", "wall (s)", "{:.1f}")]
    rows = [{"phase": k, **v} for k, v in record["phases"].items()]
    lines = ["# The Gradio app under abuse", "",
             f"{'The app started by the script (' + record['app']['ckpt'] + ', ' + args.device + ')' if app else url}"
             f"; {m['cpu']} ({m['cpus']} CPUs), load average {m['load_average']}, {record['date']}.", "",
             f"Command: `{record['command']}`", "",
             *markdown_table(rows + [{"phase": "all", "wall_s": None, **total}], columns,
                             lead=[("phase", "phase"), ("requests", "requests")]), "",
             f"Requests lost: **{total['lost']}**; longest wait of an answered request: "
             f"**{total['longest_valid_wait_s']:.1f} s**; serving afterwards: {alive}.", "",
             f"Temp folder (GRADIO_TEMP_DIR and TMPDIR of the app): {temp_before} bytes before, "
             f"**{temp_after} bytes after**. Resident memory of the app: "
             f"{record['rss_before_mb'] or 0:.0f} MB before, **{record['rss_after_mb'] or 0:.0f} MB after**.", "",
             "| probe | status | answer |", "|---|---|---|"]
    for r in phases["probes"]["rows"] + phases["uploads"]["rows"]:
        lines.append(f"| {r['case']} | {r.get('status')} | {str(r.get('message', r['outcome'])).replace('|', '/')} |")
    m_rows = phases["maximal"]["rows"]
    lines += ["", f"Maximal requests ({LIMITS['classes']} classes x {LIMITS['num']} images x "
                  f"{DEFAULT_MAX_COST // 64} steps, /compare) from one client: "
                  f"{sum(r['outcome'] == 'answered' for r in m_rows[:-1])} answered, "
                  f"{sum(r['outcome'] == 'refused' for r in m_rows[:-1])} refused; another client's small request "
                  f"waited {m_rows[-1]['wait_s']:.1f} s ({m_rows[-1]['outcome']})."]
    a_rows = phases["abandoned"]["rows"]
    lines += [f"Abandoned maximal request: the next client's small request was answered "
              f"{a_rows[-1]['after_abandon_s']:.1f} s after the first client left ({a_rows[-1]['outcome']}).", ""]
    write_report(args.out, record, "\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {args.out}.json and {args.out}.md")
    if total["lost"] or total["unclean"] or not alive:
        raise UserError(f"{total['lost']} lost requests, {total['unclean']} unclean messages; serving afterwards: "
                        f"{alive}")
    return record


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default=None, help="an app already running on a loopback address (default: start one)")
    ap.add_argument("--ckpt", default=None, help="generator of the app the script starts (default: embedded)")
    ap.add_argument("--decoder", nargs="+", default=None, help="decoders of the app the script starts")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--generations", type=int, default=100)
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds any one request may take")
    ap.add_argument("--start-timeout", type=float, default=300.0)
    ap.add_argument("--out", default="runs/app_abuse")
    return run_script(ap, abuse, argv)


if __name__ == "__main__":
    sys.exit(main())
