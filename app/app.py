"""Gradio demo: class-to-image generation with a DiT on SSDD latents, and the same latents decoded by every decoder.

    python app/app.py                                   # the embedded Fashion-MNIST bundle on http://127.0.0.1:7860
    python -m app --ckpt runs/jobs/dit_fmnist/checkpoints/last --port 8000
    python app/app.py --ckpt dit.safetensors --decoder distilled.safetensors teacher.safetensors kl.safetensors

"Generate" samples latents with the DiT and decodes them with the chosen decoder; "Compare decoders" decodes the
very same latents (and decoder noise) with every decoder the generator offers (the distilled one-step SSDD, its
multi-step teacher, the KL-VAE baseline), side by side, each with its decode time and its speed-up. The DiT time
and the decoder time are shown separately.

Serving: one model, loaded once and shared by all requests; Gradio's queue runs at most --concurrency generations
at a time and holds at most --max-queue waiting ones (more are refused with "queue is full"). Every input is
checked on the server by `validate` (the page's sliders are a convenience: the API takes any JSON), so bad input
gets a one-line error in the page or in the API client, and the app keeps serving. The endpoints `/generate` and
`/compare` serve `gradio_client`. Offline: no analytics, system fonts, no remote asset; binds 127.0.0.1 unless
--host says otherwise.
"""

import argparse
import functools
import logging
import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no phoning home
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gradio as gr  # noqa: E402

from dit.pipeline import BUNDLE_DIR, FAMILY_METHODS, Generator, load_generator  # noqa: E402
from tokenizer.common.devices import check_device  # noqa: E402
from tokenizer.common.errors import UserError, one_line, run_cli  # noqa: E402
from tokenizer.common.validation import SAMPLING_LIMITS, real_number, whole_number  # noqa: E402
from tokenizer.metrics import to_uint8  # noqa: E402

log = logging.getLogger("ssdd.app")

# What one request may ask for (the sliders show the same ranges; `validate` enforces them for API calls too).
# Sampling arguments obey the limits of every entry point (tokenizer.common.validation.SAMPLING_LIMITS).
LIMITS = {"classes": 8, "num": 8, "seed": SAMPLING_LIMITS["seed"][1], "cfg_scale": SAMPLING_LIMITS["cfg_scale"],
          "steps": SAMPLING_LIMITS["steps"][1], "decoder_steps": SAMPLING_LIMITS["decoder_steps"][1]}

# System fonts: the page loads no font file at all (Gradio 6 serves its theme fonts itself, older releases and some
# themes fetch Google Fonts); the browser test fails on any request that leaves 127.0.0.1.
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "SFMono-Regular", "monospace"])
# Small images (the embedded model makes 32-px ones) are enlarged by the browser with nearest-neighbour sampling;
# the files behind the gallery (and its download button) stay at the real size.
CSS = ".pixelated img { image-rendering: pixelated; }"


# ----------------------------------------------------------------------------- validation


def validate(gen: Generator, classes, num, seed, cfg_scale, steps, sampler, decoder=None,
             decoder_steps=None) -> dict:
    """The inputs of one request, checked on the server -> keyword arguments of `Generator.generate` (with
    `decoder`) or `Generator.compare` (without). Classes are ids or names. A bad input raises a one-line UserError
    that names the input and its valid range."""
    if isinstance(classes, (str, int)) and not isinstance(classes, bool):
        classes = [classes]
    if not isinstance(classes, (list, tuple)) or any(isinstance(c, bool) or not isinstance(c, (str, int))
                                                     for c in classes):
        raise UserError(f"classes must be a list of names or ids, got {classes!r}"[:200])
    if not 1 <= len(classes) <= LIMITS["classes"]:
        raise UserError(f"choose 1 to {LIMITS['classes']} classes (names or ids), got {len(classes)}")
    args = {"class_ids": gen.resolve_classes(list(classes)),
            "num": whole_number("the number of images per class", num, 1, LIMITS["num"]),
            "seed": whole_number("the seed", seed, 0, LIMITS["seed"]),
            "cfg_scale": real_number("the CFG scale", cfg_scale, *LIMITS["cfg_scale"]),
            "steps": whole_number("the DiT steps", steps, 1, LIMITS["steps"]),
            "sampler": sampler}
    gen.sampler_settings(args["cfg_scale"], args["steps"], sampler)  # the sampler of the model's family
    if decoder is not None or decoder_steps is not None:
        if not isinstance(decoder, str):
            raise UserError(f"decoder must be one of: {', '.join(gen.decoder_names)}")
        args["decoder"] = gen.pick_decoder(decoder)[0]
        args["decoder_steps"] = whole_number("the decoder steps", decoder_steps, 1, LIMITS["decoder_steps"])
    return args


def errors_in_page(handler):
    """A handler whose errors reach the page (and API clients) as one line, never a traceback; the app goes on."""
    @functools.wraps(handler)
    def wrapper(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except UserError as e:
            raise gr.Error(one_line(e), print_exception=False) from None
        except Exception as e:  # a bug or an exhausted resource: the server log keeps the traceback
            log.exception("generation failed")
            raise gr.Error(f"generation failed: {one_line(e, with_type=True)}", print_exception=False) from None
    return wrapper


# ----------------------------------------------------------------------------- what the page shows


def gallery_items(gen: Generator, images, class_ids: list, num: int) -> list:
    """[(H x W x 3 uint8 image, caption)], class after class, as Generator.generate orders them."""
    captions = [f"{gen.class_name(cid)} ({cid})" for cid in class_ids for _ in range(num)]
    return list(zip(to_uint8(images), captions))


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


# ----------------------------------------------------------------------------- the app


def build_app(gen: Generator, concurrency: int = 1, max_queue: int = 16) -> gr.Blocks:
    """The Blocks app on a loaded generator (shared by every request), with its queue configured."""
    names = gen.display_names()
    default_decoder, _, default_decoder_steps = gen.pick_decoder(None)
    sample = gen.sampler_settings()

    with gr.Blocks(title="SSDD class-to-image", analytics_enabled=False) as demo:
        gr.Markdown(f"## Class-to-image: {gen.name} on SSDD latents\n"
                    f"{gen.num_classes} classes · decoders: {', '.join(gen.decoder_names)} · device `{gen.device}`")
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                classes = gr.Dropdown([(f"{name} ({i})", i) for i, name in enumerate(names)], value=[0],
                                      multiselect=True, filterable=True, max_choices=LIMITS["classes"],
                                      label="Classes (type to search; several allowed)", elem_id="classes")
                num = gr.Slider(1, LIMITS["num"], value=4, step=1, label="Images per class", elem_id="num")
                with gr.Row(equal_height=True):
                    seed = gr.Number(0, precision=0, minimum=0, maximum=LIMITS["seed"], label="Seed",
                                     elem_id="seed", scale=3)
                    random_seed = gr.Button("Random seed", size="sm", scale=1, elem_id="random-seed")
                cfg_scale = gr.Slider(*LIMITS["cfg_scale"], value=sample["cfg_scale"], step=0.1, label="CFG scale")
                with gr.Row():
                    sampler = gr.Dropdown(list(FAMILY_METHODS[gen.family]), value=sample["sampler"], label="DiT sampler")
                    steps = gr.Slider(1, LIMITS["steps"], value=sample["steps"], step=1, label="DiT steps")
                decoder = gr.Dropdown(gen.decoder_names, value=default_decoder, label="Decoder (Generate)")
                decoder_steps = gr.Slider(1, LIMITS["decoder_steps"], value=default_decoder_steps, step=1,
                                          label="Decoder steps (1 for a distilled decoder)")
                with gr.Row():
                    generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
                    compare_button = gr.Button("Compare decoders", elem_id="compare")
            with gr.Column(scale=2):
                with gr.Tabs() as tabs:
                    with gr.Tab("Generate", id="generate-tab"):
                        gallery = gr.Gallery(label="Samples (one row per class)", columns=4, format="png",
                                             object_fit="contain", elem_id="gallery", elem_classes="pixelated")
                        timings = gr.Markdown(elem_id="timings")
                    with gr.Tab("Compare decoders", id="compare-tab"):
                        with gr.Row():
                            compared = [gr.Gallery(label=name, columns=2, format="png", object_fit="contain",
                                                   elem_id=f"compare-{i}", elem_classes="pixelated")
                                        for i, name in enumerate(gen.decoder_names)]
                        compare_table = gr.Markdown(elem_id="compare-timings")
                with gr.Accordion("Timings (JSON)", open=False):
                    details = gr.JSON(label="timings", elem_id="details")

        dit_inputs = [classes, num, seed, cfg_scale, steps, sampler]

        @errors_in_page
        def on_generate(classes, num, seed, cfg_scale, steps, sampler, decoder, decoder_steps,
                        progress=gr.Progress()):
            args = validate(gen, classes, num, seed, cfg_scale, steps, sampler, decoder, decoder_steps)
            images, t = gen.generate(**args, progress=lambda stage, done, total: progress(done / total, desc=stage))
            t["per_class"] = args["num"]
            return gallery_items(gen, images, args["class_ids"], args["num"]), generate_summary(gen, t), t

        @errors_in_page
        def on_compare(classes, num, seed, cfg_scale, steps, sampler, progress=gr.Progress()):
            args = validate(gen, classes, num, seed, cfg_scale, steps, sampler)
            by_decoder, t = gen.compare(**args, progress=lambda stage, done, total: progress(done / total, desc=stage))
            add_speedups(t)["per_class"] = args["num"]
            galleries = [gallery_items(gen, by_decoder[name], args["class_ids"], args["num"])
                         for name in gen.decoder_names]
            return *galleries, compare_summary(gen, t), t

        def lay_out(t):
            """Page only: one gallery row per class; each compared decoder's time and speed-up in its title."""
            if "decoders" not in t:
                return gr.Gallery(columns=t["per_class"]), *(gr.Gallery() for _ in compared)
            return gr.Gallery(), *(gr.Gallery(columns=t["per_class"], label=f"{name}: {d['decoder_s']:.3f} s, "
                                                                             f"{d['speedup_vs_slowest']:.1f}x")
                                   for name, d in t["decoders"].items())

        # preprocess=False: the handlers (and `validate`) see the raw request values, whatever a client sends
        endpoint = {"preprocess": False, "concurrency_id": "model", "api_visibility": "public"}
        page_only = {"queue": False, "api_visibility": "private"}
        generate_button.click(on_generate, [*dit_inputs, decoder, decoder_steps], [gallery, timings, details],
                              api_name="generate", **endpoint).success(lay_out, details, [gallery, *compared],
                                                                       **page_only)
        compare_button.click(on_compare, dit_inputs, [*compared, compare_table, details], api_name="compare",
                             **endpoint).success(lay_out, details, [gallery, *compared], **page_only)
        generate_button.click(lambda: gr.Tabs(selected="generate-tab"), None, tabs, **page_only)
        compare_button.click(lambda: gr.Tabs(selected="compare-tab"), None, tabs, **page_only)
        random_seed.click(None, None, seed, js="() => Math.floor(Math.random() * 2147483647)")
        decoder.change(lambda name: gen.pick_decoder(name)[2], decoder, decoder_steps, **page_only)

    return demo.queue(default_concurrency_limit=concurrency, max_size=max_queue)


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, block: bool = True):
    """Serve the app with its offline theme; returns (app, local URL, share URL) as Gradio does."""
    try:
        return demo.launch(server_name=host, server_port=port, share=False, theme=THEME, css=CSS, ssr_mode=False,
                           mcp_server=False, pwa=False,
                           show_error=True,  # Gradio's own checks (e.g. too few values) reach clients as one message
                           prevent_thread_lock=not block, quiet=not block)
    except OSError as e:
        raise UserError(f"cannot serve on {host}:{port}: {one_line(e)}") from None


def warm_up(gen: Generator) -> None:
    """One tiny generation through every decoder, so that the first request's timings hold no one-off set-up
    (2 steps: the fewest every family's default sampler takes; SiT's SDE needs 2 time points)."""
    gen.compare([0], num=1, seed=0, steps=2)


def serve(args) -> None:
    gen = load_generator(args.ckpt, device=check_device(args.device), decoder=args.decoder)
    print(f"loaded {gen.name} ({gen.source}) with the decoders {', '.join(gen.decoder_names)} on {gen.device}; "
          f"warming up", flush=True)
    warm_up(gen)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"note: serving on {args.host}: the app is reachable from other machines", file=sys.stderr)
    launch(build_app(gen, args.concurrency, args.max_queue), args.host, args.port)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", default=None, help=f"bundle directory or DiT checkpoint (default: {BUNDLE_DIR})")
    ap.add_argument("--decoder", nargs="+", default=None,
                    help="decoder checkpoints (SSDD or KL-VAE) replacing the bundle's; Compare decodes with each")
    ap.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--concurrency", type=int, default=1, help="generations running at the same time")
    ap.add_argument("--max-queue", type=int, default=16, help="waiting requests beyond which new ones are refused")
    args = ap.parse_args(argv)
    if args.concurrency < 1 or args.max_queue < 1:
        ap.error("--concurrency and --max-queue must be >= 1")
    return run_cli(serve, args)


if __name__ == "__main__":
    sys.exit(main())
