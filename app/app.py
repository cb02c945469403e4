"""Gradio demo: class-to-image generation with a DiT on SSDD latents, and the same latents decoded by every decoder.

    python app/app.py                                   # the embedded Fashion-MNIST bundle on http://127.0.0.1:7860
    python -m app --ckpt runs/jobs/dit_fmnist/checkpoints/last --port 8000
    python app/app.py --ckpt dit.safetensors --decoder distilled.safetensors teacher.safetensors kl.safetensors
    python app/app.py --ckpt DiT-XL-2-256x256.pt --decoder sdvae --decoder ssdd:SDVAE_M_256.safetensors

"Generate" samples latents with the DiT and decodes them with the chosen decoder; "Compare decoders" decodes the
very same latents (and decoder noise) with every decoder the generator offers (the distilled one-step SSDD, its
multi-step teacher, the KL-VAE or SD-VAE baseline), side by side, each with its decode time and its speed-up.

Serving (README.md: "Serving"): one model, loaded once, warmed up and shared by all requests. Requests are checked
before they enter Gradio's queue (app/limits.py through a Gradio validator; app/guard.py in front of Gradio), the
queue runs --concurrency generations at a time and holds --max-queue waiting ones, each client address holds at most
--client-slots of them, one request asks for at most --max-cost image-steps and runs at most --time-limit seconds,
and a job whose client has gone stops. Results are served from memory (app/images.py): nothing is written to disk.
Offline: no analytics, system fonts, no remote asset; binds 127.0.0.1 unless --host says otherwise.
"""

import argparse
import functools
import ipaddress
import json
import logging
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

if __name__ == "__main__" and not __package__:  # `python app/app.py`: import the package app/, not this file
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no phoning home
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gradio as gr  # noqa: E402
from starlette.middleware import Middleware  # noqa: E402

from app import guard, page  # noqa: E402
from app.images import DEFAULT_MAX_MB, PREFIX, ImageStore  # noqa: E402
from app.limits import COMPARE_INPUTS, DEFAULT_MAX_COST, GENERATE_INPUTS, LIMITS, InputError, validate  # noqa: E402
from app.progress import Job, Rates, Stopped, dit_evaluations, install_hooks  # noqa: E402
from dit.pipeline import BUNDLE_DIR, FAMILY_METHODS, Generator, load_generator  # noqa: E402
from tokenizer.common.devices import check_device  # noqa: E402
from tokenizer.common.errors import UserError, one_line, run_cli  # noqa: E402
from tokenizer.metrics import to_uint8  # noqa: E402

log = logging.getLogger("ssdd.app")

DEFAULT_TIME_LIMIT = 300.0  # seconds one request may run
# Rates measured on small batches (the warm-up's single image) overstate the per-image time of large ones, so a
# request is refused in advance only when its estimate is well over the time limit.
ESTIMATE_MARGIN = 2.0
CPU_BUDGET = 45.0  # seconds per image the page's default request may take on a CPU (a minute with some margin)
CPU_SAMPLERS = {"dit": "ddim", "sit": "heun"}  # few-step samplers of each family, for the CPU defaults


@dataclass
class ServerState:
    """What the endpoints and the Guard middleware share."""
    policy: guard.Policy
    store: ImageStore
    rates: Rates
    max_cost: int = DEFAULT_MAX_COST
    time_limit: float = DEFAULT_TIME_LIMIT
    results_prefix: str = PREFIX
    endpoints: dict = field(default_factory=dict)  # fn_index -> guard.Endpoint
    api_names: dict = field(default_factory=dict)  # api name -> fn_index
    readers: guard.Readers = field(default_factory=guard.Readers)
    joining: Counter = field(default_factory=Counter)  # client address -> requests being admitted right now
    demo: gr.Blocks | None = None

    def requests_of(self, host: str) -> int:
        return guard.requests_by_host(self.demo._queue)[host] if self.demo is not None else 0

    def gone(self, session: str | None) -> bool:
        return self.readers.gone(session, self.policy.reader_grace)


# ----------------------------------------------------------------------------- what the endpoints return


def decoder_steps_of(gen: Generator, name: str, steps: int | None) -> int:
    """The steps decoder `name` runs: 1 for a KL decoder, else `steps` or its default."""
    _, decoder, default = gen.pick_decoder(name)
    return 1 if decoder.is_kl else (steps or default)


def gallery_items(gen: Generator, store: ImageStore, base_url: str, images, class_ids: list, num: int) -> list:
    """[(URL of the PNG, caption)], class after class, as Generator.generate orders them."""
    captions = [f"{gen.class_name(cid)} ({cid})" for cid in class_ids for _ in range(num)]
    return [(base_url + store.add(image), caption) for image, caption in zip(to_uint8(images), captions)]


def add_speedups(t: dict) -> dict:
    """Compare timings + each decoder's `speedup_vs_slowest`: the slowest decoder's time over its own."""
    slowest = max(d["decoder_s"] for d in t["decoders"].values())
    for d in t["decoders"].values():
        d["speedup_vs_slowest"] = slowest / max(d["decoder_s"], 1e-9)
    return t


def generate_summary(gen: Generator, t: dict) -> str:
    n = t["images"]
    return (f"**DiT** {gen.name}: **{t['dit_s']:.3f} s** for {n} latents ({t['sampler']}, {t['steps']} steps, "
            f"CFG {t['cfg_scale']:g})  \n**Decoder** {t['decoder']}: **{t['decoder_s']:.3f} s** for {n} images "
            f"({t['decoder_steps']} step{'s' if t['decoder_steps'] > 1 else ''})  \nDevice: `{t['device']}`")


def compare_summary(gen: Generator, t: dict) -> str:
    per = t["decoders"]
    slowest = min(per, key=lambda name: per[name]["speedup_vs_slowest"])
    lines = [f"The same {t['images']} latents from **{gen.name}** ({t['dit_s']:.3f} s; {t['sampler']}, "
             f"{t['steps']} steps, CFG {t['cfg_scale']:g}), decoded by each decoder on `{t['device']}`.", "",
             f"| decoder | steps | decode time | speed-up vs {slowest} |", "|---|---|---|---|"]
    lines += [f"| {name} | {d['decoder_steps']} | {d['decoder_s']:.3f} s | {d['speedup_vs_slowest']:.1f}x |"
              for name, d in per.items()]
    return "\n".join(lines)


def results_base(request) -> str:
    """The address results are served under for this client: the URL it reached the app with + the prefix."""
    http = getattr(request, "request", None)  # the FastAPI request of the client's call
    base = str(http.base_url) if http is not None else "http://127.0.0.1/"
    return base.rstrip("/") + PREFIX


def errors_in_page(handler):
    """A handler whose errors reach the page (and API clients) as one line, never a traceback; the app goes on.
    Unexpected errors say only their type: their text may hold paths or object reprs (the log keeps it all)."""
    @functools.wraps(handler)
    def wrapper(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except (UserError, Stopped) as e:
            raise gr.Error(one_line(e), print_exception=False) from None
        except Exception as e:  # a bug or an exhausted resource: the server log keeps the traceback
            log.exception("generation failed")
            raise gr.Error(f"generation failed ({type(e).__name__}); the server's log has the details",
                           print_exception=False) from None
    return wrapper


def validator(gen: Generator, state: ServerState, inputs: tuple):
    """A Gradio validator of one endpoint: the request's values checked before it is queued (limits.validate,
    then the time it would take at the rates measured here: over ESTIMATE_MARGIN x the time limit, it is refused;
    below that the time limit itself decides)."""
    def check(*values):
        try:
            args = validate(gen, *values, max_cost=state.max_cost)
            images = len(args["class_ids"]) * args["num"]
            evals = dit_evaluations(gen.family, args["sampler"], args["steps"])
            names = [args["decoder"]] if "decoder" in args else gen.decoder_names
            decoders = [(name, decoder_steps_of(gen, name, args.get("decoder_steps"))) for name in names]
            seconds = state.rates.estimate(images, evals, decoders)
            if seconds is not None and seconds > ESTIMATE_MARGIN * state.time_limit:
                raise InputError("steps", f"this request would take about {seconds:,.0f} s here, far over the limit "
                                          f"of {state.time_limit:g} s per request (fewer images or steps)")
        except InputError as e:
            return [gr.validate(d["is_valid"], d["message"]) for d in guard.validation(inputs, e.field, one_line(e))]
        except Exception:  # noqa: BLE001 - a bug in a check must not pass the request on unchecked
            log.exception("checking a request failed")
            return [gr.validate(i > 0, "" if i else "this request could not be checked") for i in range(len(inputs))]
        return [gr.validate(True, "") for _ in inputs]
    return check


# ----------------------------------------------------------------------------- page defaults and presets


def page_defaults(gen: Generator, rates: Rates) -> dict:
    """The request the page starts with: the model's sampler defaults, unless on a CPU one image through the default
    decoder (Generate) would take over CPU_BUDGET s at the rates the warm-up measured; then a few-step sampler, as
    many steps as fit, and one image per class. (Compare adds each other decoder's time per image.)"""
    s = gen.sampler_settings()
    defaults = {"classes": [207] if gen.num_classes == 1000 else [0], "num": 4, "seed": 0,
                "cfg_scale": s["cfg_scale"], "sampler": s["sampler"], "steps": s["steps"]}
    if gen.device.type != "cpu":
        return defaults
    name = gen.decoder_names[0]
    decoding = [(name, decoder_steps_of(gen, name, gen.defaults.get("decoder_steps")))]
    per_image = rates.estimate(1, dit_evaluations(gen.family, s["sampler"], s["steps"]), decoding)
    if per_image is None or per_image <= CPU_BUDGET:
        return defaults
    sampler = CPU_SAMPLERS.get(gen.family, s["sampler"])
    per_step = rates.dit * dit_evaluations(gen.family, sampler, 3) / 3  # evaluations per step of that sampler
    steps = int((CPU_BUDGET - rates.estimate(1, 0, decoding)) / max(per_step, 1e-9))
    return {**defaults, "num": 1, "sampler": sampler, "steps": max(5, min(s["steps"], steps // 5 * 5))}


def presets(gen: Generator) -> list:
    """A few one-click examples: (label, "generate" or "compare", classes, images per class, seed)."""
    if gen.num_classes == 1000:
        return [("golden retriever vs decoders", "compare", [207], 1, 0),
                ("macaw, panda", "generate", [88, 388], 1, 1), ("volcano, lakeside", "compare", [980, 975], 1, 2)]
    n = gen.num_classes
    few = list(range(min(n, 2)))
    if n >= 10:  # the Fashion-MNIST classes of the embedded model: sneaker, ankle boot; all shapes of garment
        return [("sneaker vs ankle boot", "compare", [7, 9], 4, 0), ("8 classes x 8", "compare", list(range(8)), 8, 1),
                ("bags, 8 seeds", "compare", [8], 8, 2)]
    return [(f"classes {few}", "compare", few, 4, 0), ("first class x 8", "generate", [0], 8, 1)]


# ----------------------------------------------------------------------------- the app


class Mode(NamedTuple):
    """One endpoint of the page: its handler and inputs (components and names), its outputs (hidden galleries for
    the API, the summary), the view the browser draws from them, and its tab."""
    handler: object
    inputs: list
    names: tuple
    galleries: list
    summary: object
    view: object
    tab: str


def build_app(gen: Generator, concurrency: int = 1, max_queue: int = 16,
              client_slots: int = guard.DEFAULT_CLIENT_SLOTS, max_cost: int = DEFAULT_MAX_COST,
              time_limit: float = DEFAULT_TIME_LIMIT, results_mb: float = DEFAULT_MAX_MB,
              rates: Rates | None = None) -> gr.Blocks:
    """The Blocks app on a loaded generator (shared by every request), with its queue configured; its
    `server_state` holds what `launch` puts in front of it."""
    state = ServerState(policy=guard.Policy(client_slots=client_slots), store=ImageStore(int(results_mb * 2**20)),
                        rates=rates or Rates(), max_cost=max_cost, time_limit=time_limit)
    install_hooks(gen)
    names = gen.display_names()
    default_decoder, _, default_decoder_steps = gen.pick_decoder(None)
    start = page_defaults(gen, state.rates)

    with gr.Blocks(title="SSDD class-to-image", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(f"## Class-to-image: {gen.name} on SSDD latents\n"
                    f"{gen.num_classes} classes · decoders: {', '.join(gen.decoder_names)} · device `{gen.device}` · "
                    f"at most {max_cost:,} image-steps (classes x images x steps) and {time_limit:g} s per request")
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                classes = gr.Dropdown([(f"{name} ({i})", i) for i, name in enumerate(names)], value=start["classes"],
                                      multiselect=True, filterable=True, max_choices=LIMITS["classes"],
                                      label="Classes (type to search; several allowed)", elem_id="classes")
                num = gr.Slider(1, LIMITS["num"], value=start["num"], step=1, label="Images per class", elem_id="num")
                with gr.Row(equal_height=True):
                    seed = gr.Number(start["seed"], precision=0, step=1, minimum=0, maximum=LIMITS["seed"],
                                     label=f"Seed (0..{LIMITS['seed']})", elem_id="seed", scale=3)
                    random_seed = gr.Button("Random seed", size="sm", scale=1, elem_id="random-seed")
                cfg_scale = gr.Slider(*LIMITS["cfg_scale"], value=start["cfg_scale"], step=0.1, label="CFG scale",
                                      elem_id="cfg")
                with gr.Row():
                    sampler = gr.Dropdown(list(FAMILY_METHODS[gen.family]), value=start["sampler"],
                                          label="DiT sampler", elem_id="sampler")
                    steps = gr.Slider(1, LIMITS["steps"], value=start["steps"], step=1, label="DiT steps",
                                      elem_id="steps")
                decoder = gr.Dropdown(gen.decoder_names, value=default_decoder, label="Decoder (Generate)",
                                      elem_id="decoder")
                decoder_steps = gr.Slider(1, LIMITS["decoder_steps"], value=default_decoder_steps, step=1,
                                          label="Decoder steps (1 for a distilled decoder)", elem_id="decoder-steps")
                with gr.Row():
                    generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
                    compare_button = gr.Button("Compare decoders", elem_id="compare")
                gr.Markdown("**Examples** (one click: fill in and run)")
                with gr.Row():
                    preset_buttons = [(gr.Button(label, size="sm", elem_id=f"preset-{i}"), mode, values)
                                      for i, (label, mode, *values) in enumerate(presets(gen))]
            with gr.Column(scale=2):
                with gr.Tabs():
                    with gr.Tab("Generate", id="generate-tab", elem_id="generate-tab"):
                        view = gr.HTML(page.EMPTY_VIEW, elem_id="view", elem_classes="ssdd-result")
                        gallery = gr.Gallery(label="Samples", visible=False, elem_id="gallery")
                        timings = gr.Markdown(elem_id="timings")
                    with gr.Tab("Compare decoders", id="compare-tab", elem_id="compare-tab"):
                        compare_view = gr.HTML(page.EMPTY_VIEW, elem_id="compare-view", elem_classes="ssdd-result")
                        compared = [gr.Gallery(label=name, visible=False, elem_id=f"compare-{i}")
                                    for i, name in enumerate(gen.decoder_names)]
                        compare_table = gr.Markdown(elem_id="compare-timings")
                with gr.Accordion("Timings (JSON)", open=False):
                    details = gr.JSON(label="timings", elem_id="details")

        dit_inputs = [classes, num, seed, cfg_scale, steps, sampler]

        def run_job(args: dict, request, progress, decoders: list, call):
            images = len(args["class_ids"]) * args["num"]
            evals = dit_evaluations(gen.family, args["sampler"], args["steps"])
            job = Job(state.rates, images, args["steps"], evals, decoders,
                      report=lambda fraction, text: progress(fraction, desc=text),
                      gone=lambda: state.gone(getattr(request, "session_hash", None)), time_limit=state.time_limit)
            with job:  # one batch, as sample/generate.py's (stochastic samplers draw per batch)
                result, t = call(batch_size=LIMITS["classes"] * LIMITS["num"], progress=job.stage_done)
            state.rates.record(t, evals)
            return result, t

        @errors_in_page
        def on_generate(classes, num, seed, cfg_scale, steps, sampler, decoder, decoder_steps,
                        request: gr.Request, progress=gr.Progress()):
            args = validate(gen, classes, num, seed, cfg_scale, steps, sampler, decoder, decoder_steps,
                            max_cost=state.max_cost)
            decoders = [(args["decoder"], decoder_steps_of(gen, args["decoder"], args["decoder_steps"]))]
            images, t = run_job(args, request, progress, decoders, lambda **kw: gen.generate(**args, **kw))
            t["per_class"] = args["num"]
            items = gallery_items(gen, state.store, results_base(request), images, args["class_ids"], args["num"])
            return items, generate_summary(gen, t), t

        @errors_in_page
        def on_compare(classes, num, seed, cfg_scale, steps, sampler, request: gr.Request, progress=gr.Progress()):
            args = validate(gen, classes, num, seed, cfg_scale, steps, sampler, max_cost=state.max_cost)
            decoders = [(name, decoder_steps_of(gen, name, None)) for name in gen.decoder_names]
            by_decoder, t = run_job(args, request, progress, decoders, lambda **kw: gen.compare(**args, **kw))
            add_speedups(t)["per_class"] = args["num"]
            base = results_base(request)
            galleries = [gallery_items(gen, state.store, base, by_decoder[name], args["class_ids"], args["num"])
                         for name in gen.decoder_names]
            return *galleries, compare_summary(gen, t), t

        modes = {"generate": Mode(on_generate, [*dit_inputs, decoder, decoder_steps], GENERATE_INPUTS, [gallery],
                                  timings, view, "generate-tab"),
                 "compare": Mode(on_compare, dit_inputs, COMPARE_INPUTS, compared, compare_table, compare_view,
                                 "compare-tab")}

        def clear(mode):
            """A JS-only event: the results of `mode` cleared (at each new request, and with an error)."""
            m = modes[mode]
            empty = [[] for _ in m.galleries] + ["", None, page.EMPTY_VIEW]
            return dict(fn=None, inputs=None, outputs=[*m.galleries, m.summary, details, m.view],
                        js=page.set_values(empty))

        def wire(trigger, mode, api_name=None):
            """`mode`'s endpoint on `trigger` (a click, or a preset's .then), with its view drawn after it."""
            m = modes[mode]
            run = trigger(m.handler, m.inputs, [*m.galleries, m.summary, details], api_name=api_name,
                          api_visibility="public" if api_name else "private",
                          preprocess=False,  # the handlers (and validators) see the raw request values
                          concurrency_id="model", validator=validator(gen, state, m.names), js=page.show_tab(m.tab),
                          show_progress_on=[m.view])
            run.success(None, [*m.galleries, details], m.view, js=page.VIEW_JS)
            run.failure(**clear(mode))

        for button, mode in ((generate_button, "generate"), (compare_button, "compare")):
            button.click(**clear(mode))
            wire(button.click, mode, api_name=mode)
        for button, mode, (classes_, num_, seed_) in preset_buttons:
            num_ = max(1, min(num_, max_cost // (len(classes_) * start["steps"])))  # within the cost cap
            values = [classes_, num_, seed_, start["cfg_scale"], start["sampler"], start["steps"]]
            button.click(**clear(mode))
            wire(button.click(None, None, [classes, num, seed, cfg_scale, sampler, steps],
                              js=page.set_values(values)).then, mode)
        random_seed.click(None, None, seed, js=page.RANDOM_SEED_JS)
        seed.blur(None, seed, seed, js=page.WHOLE_SEED_JS)
        seed.submit(None, seed, seed, js=page.WHOLE_SEED_JS)
        steps_of = {name: gen.pick_decoder(name)[2] for name in gen.decoder_names}
        decoder.change(None, decoder, decoder_steps, js=f"(name) => ({json.dumps(steps_of)})[name] ?? 1")

    handlers = {on_generate: GENERATE_INPUTS, on_compare: COMPARE_INPUTS}
    state.endpoints = {i: guard.Endpoint(i, handlers[f.fn]) for i, f in demo.fns.items() if f.fn in handlers}
    state.api_names = {f.api_name: i for i, f in demo.fns.items() if f.fn in handlers and f.api_visibility == "public"}
    state.demo = demo
    demo.server_state = state
    return demo.queue(default_concurrency_limit=concurrency, max_size=max_queue, api_open=False)


def bind_address(host: str) -> tuple[str, bool]:
    """--host -> (the address as Gradio takes it: IPv6 literals in brackets, whether it is loopback only)."""
    text = (host or "").strip()
    if not text:
        raise UserError("--host is empty: give the address to bind (127.0.0.1 or ::1: this machine only; "
                        "0.0.0.0: every IPv4 interface; ::: every IPv6 one)")
    bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        ip = ipaddress.ip_address(bare)
    except ValueError:  # a host name
        return bare, bare.lower() == "localhost"
    return (f"[{bare}]" if ip.version == 6 else bare), ip.is_loopback


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, block: bool = True,
           monitoring: bool = False):
    """Serve the app behind its Guard, with its offline theme; returns (app, local URL, share URL) as Gradio does.
    Bound to a loopback address, the app answers only Host headers naming loopback (no DNS rebinding)."""
    server_name, loopback = bind_address(host)
    state = demo.server_state
    state.policy.allowed_hosts = (guard.LOOPBACK_HOSTS | {server_name.lower()}) if loopback else None
    try:
        return demo.launch(server_name=server_name, server_port=port, share=False, theme=page.THEME, css=page.CSS,
                           ssr_mode=False, mcp_server=False, pwa=False, run_history=False,
                           show_error=False,  # only the app's own one-line errors reach clients, never Gradio's text
                           enable_monitoring=monitoring, max_file_size=1,
                           app_kwargs={"middleware": [Middleware(guard.Guard, state=state)]},
                           prevent_thread_lock=not block, quiet=not block)
    except OSError as e:
        raise UserError(f"cannot serve on {host}:{port}: {one_line(e)}") from None


def warm_up(gen: Generator, rates: Rates | None = None) -> None:
    """Tiny generations through every decoder, so that the first request's timings hold no one-off set-up
    (2 steps: the fewest every family's default sampler takes; SiT's SDE needs 2 time points); the second one
    measures this machine's rates for the ETA and the page's defaults."""
    gen.compare([0], num=1, seed=0, steps=2)
    _, t = gen.compare([0], num=1, seed=0, steps=2)
    if rates is not None:
        rates.record(t, dit_evaluations(gen.family, t["sampler"], 2))


def serve(args) -> None:
    host, loopback = bind_address(args.host)
    gen = load_generator(args.ckpt, device=check_device(args.device), decoder=args.decoder)
    print(f"loaded {gen.name} ({gen.source}) with the decoders {', '.join(gen.decoder_names)} on {gen.device}; "
          f"warming up", flush=True)
    rates = Rates()
    warm_up(gen, rates)
    if not loopback:
        print(f"note: serving on {host}: the app is reachable from other machines", file=sys.stderr)
    demo = build_app(gen, args.concurrency, args.max_queue, args.client_slots, args.max_cost, args.time_limit,
                     args.results_mb, rates)
    launch(demo, args.host, args.port, monitoring=args.monitoring)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", default=None, help=f"bundle directory or DiT checkpoint (default: {BUNDLE_DIR})")
    ap.add_argument("--decoder", nargs="+", action="extend", default=None,
                    help="decoders (SSDD or KL-VAE checkpoints, sdvae[:file], ssdd:file) replacing the generator's; "
                         "repeat the flag or list several; Compare decodes with each")
    ap.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    ap.add_argument("--host", default="127.0.0.1",
                    help="address to bind (default: loopback only; 0.0.0.0: every IPv4 interface, ::: every IPv6 one)")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--concurrency", type=int, default=1, help="generations running at the same time")
    ap.add_argument("--max-queue", type=int, default=16, help="waiting requests beyond which new ones are refused")
    ap.add_argument("--client-slots", type=int, default=guard.DEFAULT_CLIENT_SLOTS,
                    help=f"requests one client address may have queued or running (default "
                         f"{guard.DEFAULT_CLIENT_SLOTS})")
    ap.add_argument("--max-cost", type=int, default=DEFAULT_MAX_COST,
                    help=f"image-steps (classes x images x DiT steps) one request may ask for (default "
                         f"{DEFAULT_MAX_COST:,})")
    ap.add_argument("--time-limit", type=float, default=DEFAULT_TIME_LIMIT,
                    help=f"seconds one request may run before it is stopped (default {DEFAULT_TIME_LIMIT:g})")
    ap.add_argument("--results-mb", type=float, default=DEFAULT_MAX_MB,
                    help=f"memory for the latest results, served from there (default {DEFAULT_MAX_MB} MB)")
    ap.add_argument("--monitoring", action="store_true", help="open Gradio's /monitoring page (off by default)")
    args = ap.parse_args(argv)
    for name in ("concurrency", "max_queue", "client_slots", "max_cost"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if not args.time_limit > 0 or not args.results_mb > 0:
        ap.error("--time-limit and --results-mb must be > 0")
    return run_cli(serve, args)


if __name__ == "__main__":
    sys.exit(main())
