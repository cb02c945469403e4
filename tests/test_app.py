"""The Gradio app (app/app.py): server-side validation, the /generate and /compare API endpoints through
gradio_client and forged HTTP calls, and end-to-end runs in a real headless browser (Debian chromium driven by
playwright) that choose classes by name, click Generate / Compare decoders, and check what arrives.

The browser tests skip, saying why, only where the browser cannot be had (bash install.sh installs it where
apt-get exists). SSDD_APP_SCREENSHOT=<path.png> makes the embedded-model browser test save the README screenshot.
"""

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from urllib.parse import urlparse

import numpy as np
import pytest
from helpers import ROOT, make_dit, make_kl_decoder, make_tokenizer
from PIL import Image

from app.app import LIMITS, build_app, launch, validate
from dit.pipeline import load_generator
from tokenizer import UserError

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    """A random DiT with two decoders of its latents: a multi-step SSDD-XS and a KL-VAE (paths, generator)."""
    tmp = tmp_path_factory.mktemp("app")
    tok = make_tokenizer(tmp / "tok")
    files = {"dit": make_dit(tmp / "dit.safetensors", tok), "decoders": [tok, make_kl_decoder(tmp / "kl")]}
    return files, load_generator(files["dit"], device="cpu", decoder=files["decoders"])


@pytest.fixture(scope="module")
def served(standin):
    """The stand-in app served in this process on a free loopback port -> its URL."""
    _, gen = standin
    demo = build_app(gen, concurrency=1, max_queue=8)
    _, url, _ = launch(demo, port=free_port(), block=False)
    yield url.rstrip("/")
    demo.close()


# ----------------------------------------------------------------------------- validation


def test_validate_takes_names_and_ids_and_refuses_bad_input(standin):
    _, gen = standin
    good = dict(classes=["Sneaker", 9], num=2, seed=5, cfg_scale=2, steps=3, sampler="heun")
    args = validate(gen, **good)
    assert args == {"class_ids": [7, 9], "num": 2, "seed": 5, "cfg_scale": 2.0, "steps": 3, "sampler": "heun"}
    args = validate(gen, **good, decoder="KL-VAE", decoder_steps=4.0)  # a slider sends 4.0
    assert args["decoder"] == "KL-VAE" and args["decoder_steps"] == 4 and type(args["decoder_steps"]) is int
    assert validate(gen, **{**good, "classes": "bag"})["class_ids"] == [8]
    bad = {"classes": ([10], "outside this model's classes 0..9"), "num": (10_000, "images per class"),
           "cfg_scale": (math.nan, "CFG scale"), "steps": (-1, "DiT steps"), "seed": (-5, "seed"),
           "sampler": ("ddim", "unknown sampler 'ddim'")}
    for key, (value, message) in bad.items():
        with pytest.raises(UserError, match=message):
            validate(gen, **{**good, key: value})
    for classes in ([], list(range(LIMITS["classes"] + 1)), [True], [[7]], None, {"a": 1}):
        with pytest.raises(UserError, match="classes"):
            validate(gen, **{**good, "classes": classes})
    for value in (math.inf, "2", None, True):
        with pytest.raises(UserError, match="CFG scale"):
            validate(gen, **{**good, "cfg_scale": value})
    with pytest.raises(UserError, match="decoder steps"):
        validate(gen, **good, decoder="KL-VAE", decoder_steps=-3)
    with pytest.raises(UserError, match="offers: SSDD-XS 8-step, KL-VAE"):
        validate(gen, **good, decoder="teacher", decoder_steps=1)


def test_imagenet_models_list_the_imagenet_names(tmp_path):
    tok = make_tokenizer(tmp_path / "tok")
    gen = load_generator(make_dit(tmp_path / "d.safetensors", tok, num_classes=1000,
                                  class_names=[f"n{i:08d}" for i in range(1000)]), device="cpu")
    demo = build_app(gen)
    dropdown = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "classes")
    assert len(dropdown.choices) == 1000 and dropdown.choices[207] == ("golden retriever (207)", 207)
    assert validate(gen, ["golden retriever"], 1, 0, 4.0, 10, "euler")["class_ids"] == [207]


# ----------------------------------------------------------------------------- API


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.mark.slow
def test_api_generate_and_compare_with_gradio_client(served, standin):
    from gradio_client import Client

    _, gen = standin
    client = Client(served, verbose=False)
    assert {"/generate", "/compare"} <= set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    request = dict(classes=["sneaker", 0], num=2, seed=3, cfg_scale=2.0, steps=2, sampler="euler")
    gallery, summary, t = client.predict(**request, decoder="SSDD-XS 8-step", decoder_steps=8, api_name="/generate")
    assert [item["caption"] for item in gallery] == ["sneaker (7)"] * 2 + ["t-shirt/top (0)"] * 2
    assert all(Image.open(item["image"]).size == (32, 32) for item in gallery)  # the real size, not the display
    assert t["images"] == 4 and t["dit_s"] > 0 and t["decoder_s"] > 0 and t["device"] == "cpu"
    assert "DiT" in summary and "Decoder" in summary and f"{t['dit_s']:.3f} s" in summary
    # the page's images are exactly the API's images (8-bit PNG of generate())
    images, _ = gen.generate([7, 0], num=2, seed=3, cfg_scale=2.0, steps=2, sampler="euler", decoder_steps=8)
    from tokenizer.metrics import to_uint8

    assert all(np.array_equal(pixels(item["image"]), to_uint8(images[i])) for i, item in enumerate(gallery))

    ssdd, kl, table, t = client.predict(**request, api_name="/compare")
    assert set(t["decoders"]) == {"SSDD-XS 8-step", "KL-VAE"} and len(ssdd) == len(kl) == 4
    # compare decodes the same latents: its SSDD gallery is the one /generate returned
    assert all(np.array_equal(pixels(a["image"]), pixels(b["image"])) for a, b in zip(ssdd, gallery))
    assert not np.array_equal(pixels(kl[0]["image"]), pixels(ssdd[0]["image"]))
    ups = {name: d["speedup_vs_slowest"] for name, d in t["decoders"].items()}
    assert max(ups.values()) >= 1 and min(ups.values()) == pytest.approx(1.0)
    assert "| SSDD-XS 8-step | 8 |" in table and "| KL-VAE | 1 |" in table and "speed-up vs" in table


def forged_call(url: str, body: str) -> tuple[str, object]:
    """POST a raw JSON body to /generate (as any HTTP client could) -> (event, data) of the result stream."""
    request = urllib.request.Request(f"{url}/gradio_api/call/generate", data=body.encode(),
                                     headers={"Content-Type": "application/json"})
    event_id = json.load(urllib.request.urlopen(request, timeout=30))["event_id"]
    with urllib.request.urlopen(f"{url}/gradio_api/call/generate/{event_id}", timeout=60) as stream:
        lines = [line.decode().strip() for line in stream if line.strip()]
    event = [line for line in lines if line.startswith("event:")][-1].split(":", 1)[1].strip()
    data = json.loads([line for line in lines if line.startswith("data:")][-1].split(":", 1)[1])
    return event, data


def test_api_refuses_bad_input_with_one_line_and_keeps_serving(served):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(served, verbose=False)
    good = dict(classes=[7], num=1, seed=0, cfg_scale=2.0, steps=2, sampler="euler", decoder="KL-VAE",
                decoder_steps=1)
    bad = [({"classes": [10]}, "class 10 is outside this model's classes 0..9"),
           ({"classes": ["snekaer"]}, "did you mean 'sneaker'"),
           ({"num": 10_000}, "the number of images per class must be a whole number in 1..8, got 10000"),
           ({"steps": -1}, "the DiT steps must be a whole number in 1..1000, got -1"),
           ({"decoder_steps": -3}, "the decoder steps must be a whole number"),
           ({"sampler": "ddim"}, "unknown sampler 'ddim'"),
           ({"seed": "abc"}, "the seed must be a whole number")]
    for change, message in bad:
        with pytest.raises(AppError) as e:
            client.predict(**{**good, **change}, api_name="/generate")
        assert message in str(e.value) and "Traceback" not in str(e.value), str(e.value)
    # JSON clients cannot send NaN (gradio_client refuses to encode it); a forged body can
    row = '[[7], 1, 0, {cfg}, 2, "euler", "KL-VAE", 1]'
    for cfg in ("NaN", "Infinity", "-1"):
        event, data = forged_call(served, '{"data": ' + row.format(cfg=cfg) + "}")
        assert event == "error" and data["error"].startswith("the CFG scale must be a number in 0..20"), data
    event, data = forged_call(served, '{"data": [[7]]}')  # too few values: Gradio's own check, one message
    assert event == "error" and "didn't receive enough input values" in data["error"]
    gallery, _, t = client.predict(**good, api_name="/generate")  # still serving
    assert len(gallery) == 1 and t["decoder"] == "KL-VAE"


@pytest.mark.slow  # a fresh interpreter imports torch and gradio
def test_command_line_errors_are_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "app", "--ckpt", str(tmp_path / "nowhere")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 2 and out.stderr.strip().startswith("error: checkpoint not found"), out.stderr
    assert "\n" not in out.stderr.strip()


# ----------------------------------------------------------------------------- browser


@pytest.fixture
def browser(tmp_path):
    """A fresh headless Debian chromium (playwright drives it; it never downloads a browser) -> (page, remote),
    where `remote` collects every request that tried to leave the loopback interface (they are aborted)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[test])")
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.exists(chromium):
        pytest.skip("Debian chromium is not installed here (bash install.sh installs it where apt-get exists)")
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=chromium,
                                                       args=CHROMIUM_ARGS, headless=True,
                                                       viewport={"width": 1280, "height": 900})
        remote = []

        def only_loopback(route):
            url = urlparse(route.request.url)
            if url.scheme in ("http", "https", "ws", "wss") and url.hostname != "127.0.0.1":
                remote.append(route.request.url)
                return route.abort()
            return route.continue_()

        context.route("**/*", only_loopback)
        page = context.new_page()
        page.set_default_timeout(120_000)
        yield page, remote
        context.close()


def choose_classes(page, names):
    page.locator("#classes .remove-all").click()  # drop the default class
    box = page.locator("#classes input")
    for name in names:
        box.click()
        box.fill(name)
        page.keyboard.press("Enter")  # the first match of the typed text
    page.keyboard.press("Escape")


def set_number(page, elem_id, value):
    field = page.locator(f"#{elem_id} input[type=number]").first
    field.fill(str(value))
    field.press("Enter")


def wait_for_images(page, elem_id, n):
    """Until the gallery holds n loaded images and shows no pending state."""
    page.wait_for_function("""([id, n]) => {
        const root = document.querySelector('#' + id);  // a tab's content appears when it is shown
        if (!root) return false;
        const images = [...root.querySelectorAll('.grid-container img')];
        const tracker = root.querySelector('[data-testid=status-tracker]');
        return images.length == n && images.every(i => i.complete && i.naturalWidth > 0)
            && (!tracker || tracker.classList.contains('hide'));
    }""", arg=[elem_id, n])


@pytest.mark.slow
def test_browser_embedded_app_generates_and_compares(browser, tmp_path):
    """`python app/app.py` (the one command, the embedded bundle), driven in a real browser."""
    page, remote = browser
    port = free_port()
    log = open(tmp_path / "app.log", "w")
    app = subprocess.Popen([sys.executable, os.path.join(ROOT, "app", "app.py"), "--port", str(port), "--device",
                            "cpu"], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                           env={**os.environ, "PYTHONPATH": ROOT})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 240
        while True:
            assert app.poll() is None, open(tmp_path / "app.log").read()
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except OSError:
                assert time.time() < deadline, "the app did not answer within 240 s"
                time.sleep(0.5)
        page.goto(url, wait_until="networkidle")
        choose_classes(page, ["sneaker", "ankle"])
        set_number(page, "num", 4)
        page.locator("#generate").click()
        wait_for_images(page, "gallery", 8)
        captions = page.locator("#gallery .caption-label").all_inner_texts()
        assert captions == ["sneaker (7)"] * 4 + ["ankle boot (9)"] * 4
        timings = page.locator("#timings").inner_text()
        assert "DiT DiT-Ti/1:" in timings and "Decoder SSDD-XS 1-step (distilled):" in timings, timings
        assert " s for 8 latents" in timings and " s for 8 images (1 step)" in timings and "Device: cpu" in timings
        if os.environ.get("SSDD_APP_SCREENSHOT"):
            page.wait_for_timeout(1000)  # let the gallery's fade-in finish
            page.screenshot(path=os.environ["SSDD_APP_SCREENSHOT"])

        page.locator("#compare").click()
        wait_for_images(page, "compare-0", 8)
        table = page.locator("#compare-timings").inner_text()
        assert "The same 8 latents" in table and "SSDD-XS 1-step (distilled)\t1\t" in table, table

        set_number(page, "seed", -5)  # the page shows the server's refusal, and the app goes on
        page.locator("#generate").click()
        page.get_by_text("the seed must be a whole number in 0..4294967295, got -5").first.wait_for()
        set_number(page, "seed", 1)
        set_number(page, "num", 2)
        page.locator("#generate").click()
        page.wait_for_function("document.querySelector('#timings').innerText.includes('4 latents')")
        wait_for_images(page, "gallery", 4)
        assert app.poll() is None
        assert remote == [], f"the page asked for remote assets: {remote}"
    finally:
        app.terminate()
        app.wait(timeout=30)
        log.close()


@pytest.mark.slow
def test_browser_compare_shows_every_decoder_with_its_time(browser, served):
    page, remote = browser
    page.goto(served, wait_until="networkidle")
    page.locator("#random-seed").click()
    page.wait_for_function("document.querySelector('#seed input').value !== '0'")
    choose_classes(page, ["bag"])
    set_number(page, "num", 2)
    page.locator("#compare").click()
    for i in range(2):
        wait_for_images(page, f"compare-{i}", 2)
    titles = [page.locator(f"#compare-{i} [data-testid=block-label]").inner_text() for i in range(2)]
    assert titles[0].startswith("SSDD-XS 8-step: ") and titles[1].startswith("KL-VAE: ")
    assert all(title.endswith("x") and " s, " in title for title in titles), titles
    table = page.locator("#compare-timings").inner_text()
    assert "SSDD-XS 8-step\t8\t" in table and "KL-VAE\t1\t" in table and "speed-up vs" in table, table
    page.locator("#generate").click()  # back to Generate: the default decoder, its default steps
    wait_for_images(page, "gallery", 2)
    assert "SSDD-XS 8-step" in page.locator("#timings").inner_text()
    assert remote == []


# ----------------------------------------------------------------------------- load test script


def test_load_test_contacts_loopback_only(capsys):
    from eval.stress.app_load import main as load_test

    for url in ("http://10.1.2.3:7860", "http://localhost:7860", "http://example.org"):
        assert load_test(["--url", url, "--requests", "2"]) == 2
        assert "must be a loopback address" in capsys.readouterr().err


@pytest.mark.slow
def test_load_test_counts_every_request(standin, tmp_path):
    """A burst larger than the queue: each request is answered or refused, none is lost, the app serves on."""
    from eval.stress.app_load import main as load_test

    files, _ = standin
    out = str(tmp_path / "load")
    # 250 DiT steps make each request slow enough that the queue (1 running + 2 waiting) overflows
    assert load_test(["--requests", "12", "--max-queue", "2", "--steps", "250", "--class", "bag", "--ckpt",
                      files["dit"], "--decoder", *files["decoders"], "--out", out]) == 0
    record = json.load(open(out + ".json"))
    row = record["results"][0]
    assert row["answered"] + row["refused"] == 12 and row["failed"] == row["lost"] == 0
    assert row["answered"] >= 1 and row["refused"] >= 1 and row["alive_after"] is True
    assert 0 < row["latency_p50_s"] <= row["latency_p95_s"] and row["answered_per_s"] > 0
    assert all(r["error"] == "Queue is full! Please try again." for r in record["raw"] if r["outcome"] == "refused")
    assert record["app"]["max_queue"] == 2 and record["machine"]["load_average"] is not None
    assert "| 12 |" in open(out + ".md").read()
