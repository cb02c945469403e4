"""Share a generator on the Hugging Face Hub, and load one back by its repository id.

    python -m dit.export --dit dit_fmnist --decoder fmnist_f8c4_XS_distill --out runs/hub/dit_fmnist \
        --hub --results docs/reports/generation_table.json --push-to-hub user/dit-fmnist
    gen = load_generator(resolve_generator("user/dit-fmnist"))   # through the Hub's cache; offline from it

`--hub` makes the export folder what the Hub expects beside the bundle (dit_ema.safetensors, the decoder
files, bundle.json): a model card README.md whose YAML header carries the Hub's metadata (library_name, license,
tags, pipeline_tag, datasets, base_model where a released SSDD model was the decoder, and model-index with the
measured figures) and whose text gives the run's own figures (the class accuracy, classifier FD, gFID, images/s
of eval/generation_table.py or eval/gfid.py results given with --results); config.json (what the bundle is, for
Hub tooling); samples.png, a grid drawn from the folder itself with load_generator (which also proves it loads).
`--push-to-hub REPO` uploads that folder with one `upload_folder` call (after `create_repo(exist_ok=True)`).
"""

from __future__ import annotations

import json
import os
import time

import yaml

from dit.official import is_official_spec
from dit.pipeline import DIT_FILE, INFO_FILE, load_generator
from tokenizer.common.downloads import SSDD_REPO, hub_repo_id, hub_snapshot, released_name
from tokenizer.common.errors import UserError, one_line
from tokenizer.common.runs import save_grid

CARD_FILE, CONFIG_FILE, GRID_FILE = "README.md", "config.json", "samples.png"
LIBRARY_NAME = "ssdd-suite"
PIPELINE_TAG = "unconditional-image-generation"  # the Hub's image-generation task without a text prompt
TAGS = ["ssdd", "dit", "class-conditional", "latent-diffusion", "flow-matching", "image-generation"]
HUB_DATASETS = {"fmnist": ("zalando-datasets/fashion_mnist", "Fashion-MNIST")}  # dataset.name -> (Hub id, name)
# (key in a results row, label in the card, model-index metric type, scale for display)
FIGURES = [("accuracy", "class accuracy (%)", "accuracy", 100.0), ("fd_classifier", "classifier FD", "fd", 1.0),
           ("fid", "FID", "fid", 1.0), ("sfid", "sFID", "sfid", 1.0), ("inception_score", "IS", "is", 1.0),
           ("precision", "precision", "precision", 1.0), ("recall", "recall", "recall", 1.0),
           ("images_per_s", "images/s", None, 1.0), ("latency_ms", "latency ms (batch 1)", None, 1.0)]


# ----------------------------------------------------------------------------- loading by repository id


def resolve_generator(spec) -> str | None:
    """A Hub repository id ('owner/name', 'owner/name@revision' or 'hf:owner/name') that is not a local path ->
    the local folder of its files (huggingface_hub's cache; downloaded where allowed, else one line saying what is
    missing); anything else (a path, a published DiT/SiT name) -> None, for the caller to load as before."""
    if spec is None or os.path.exists(str(spec)) or is_official_spec(spec):
        return None
    repo = hub_repo_id(spec)
    if repo is None:
        return None
    folder = hub_snapshot(*repo, what=f"the generator {spec}")
    if not os.path.isfile(os.path.join(folder, DIT_FILE)):
        raise UserError(f"the Hub repository {repo[0]} holds no generator bundle (no {DIT_FILE}; "
                        f"`python -m dit.export --push-to-hub` makes one)")
    return folder


# ----------------------------------------------------------------------------- measured figures


def read_results(paths) -> list[dict]:
    """The rows of eval/generation_table.py or eval/gfid.py JSON files: [{source, cfg, decoder, steps, <figures>}]."""
    rows = []
    for path in paths or []:
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise UserError(f"--results {path}: cannot read it as JSON ({one_line(e)})") from None
        found = data.get("rows") if isinstance(data.get("rows"), list) else [data]
        for r in found:
            figures = {k: float(r[k]) for k, *_ in FIGURES if isinstance(r.get(k), (int, float))}
            if not figures:
                continue
            rows.append({"source": os.path.basename(path), "cfg": r.get("cfg_scale", r.get("cfg")),
                         "decoder": r.get("decoder"), "decoder_steps": r.get("decoder_steps"),
                         "samples": r.get("n", data.get("num_samples")), **figures})
        if not any(row["source"] == os.path.basename(path) for row in rows):
            raise UserError(f"--results {path} holds no figures ({', '.join(k for k, *_ in FIGURES)}): give the "
                            f"JSON of eval/generation_table.py or eval/gfid.py")
    return rows


def figures_table(rows: list[dict]) -> str:
    """A markdown table of the measured rows (only the columns some row has)."""
    cols = [(k, label, scale) for k, label, _, scale in FIGURES if any(k in r for r in rows)]
    head = "| cfg | decoder | steps | " + " | ".join(label for _, label, _ in cols) + " | samples | source |"
    lines = [head, "|" + "---|" * (len(cols) + 5)]
    for r in rows:
        vals = [f"{r[k] * s:.4g}" if k in r else "" for k, _, s in cols]
        lines.append(f"| {r['cfg'] if r['cfg'] is not None else ''} | {r['decoder'] or ''} | "
                     f"{r['decoder_steps'] or ''} | " + " | ".join(vals) + f" | {r['samples'] or ''} | {r['source']} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the folder's Hub files


def default_license(info: dict) -> str:
    """cc-by-nc-4.0 when a decoder is a released facebook/SSDD model (its licence is CC-BY-NC), else mit (the
    licence of this project's code; the trainer chooses the weights' licence with --license)."""
    sources = [info.get("provenance", {}).get("decoder_source")] + [d.get("source") for d in info.get("decoders", [])]
    return "cc-by-nc-4.0" if any(s and _is_released(s) for s in sources) else "mit"


def _is_released(source: str) -> bool:
    return f"models--{SSDD_REPO.replace('/', '--')}" in source or released_name(os.path.basename(source)) is not None


def card_metadata(info: dict, rows: list[dict], license: str, name: str) -> dict:
    """The YAML header of the model card (the Hub's metadata keys)."""
    meta = {"library_name": LIBRARY_NAME, "license": license, "tags": list(TAGS), "pipeline_tag": PIPELINE_TAG}
    dataset = HUB_DATASETS.get(info.get("dataset") or "")
    if dataset:
        meta["datasets"] = [dataset[0]]
    if any(_is_released(s) for s in [info.get("provenance", {}).get("decoder_source") or ""]):
        meta["base_model"] = SSDD_REPO
    metrics = []
    for r in rows:
        where = f"cfg {r['cfg']}, {r['decoder']}" if r["decoder"] else f"cfg {r['cfg']}"
        metrics += [{"type": mtype, "value": round(r[k] * scale, 4), "name": f"{label} ({where})"}
                    for k, label, mtype, scale in FIGURES if mtype and k in r]
    if metrics:
        result = {"task": {"type": PIPELINE_TAG, "name": "Class-conditional image generation"}, "metrics": metrics}
        if dataset:
            result["dataset"] = {"type": dataset[0], "name": dataset[1]}
        else:
            result["dataset"] = {"type": info.get("dataset") or "custom", "name": info.get("dataset") or "custom"}
        meta["model-index"] = [{"name": name, "results": [result]}]
    return meta


def hub_config(info: dict) -> dict:
    """config.json: what the bundle is, for Hub tooling and readers (bundle.json stays the loader's source)."""
    return {"model_type": "ssdd-dit-generator", "library_name": LIBRARY_NAME, "loader": "dit.pipeline.load_generator",
            "dit": info["dit"], "decoder": info["decoder"], "latent_shape": info["latent_shape"],
            "im_size": info["im_size"], "z_mean": info["z_mean"], "z_std": info["z_std"], "sample": info["sample"],
            "decoders": [d["name"] for d in info.get("decoders", [])] or [info["decoder"]["decoder"]],
            "bundle": INFO_FILE}


def draw_grid(folder: str, per_class: int, seed: int) -> dict:
    """Load the folder as a generator (what a user of the repository does) and save GRID_FILE: up to 10 classes,
    `per_class` images each, the bundle's default sampler and decoder; returns what was drawn and its timings."""
    gen = load_generator(folder, device="cpu")
    classes = list(range(min(gen.num_classes, 10)))
    images, timings = gen.generate(classes, num=per_class, seed=seed)
    # images come class after class; row j holds the j-th image of every class
    save_grid(os.path.join(folder, GRID_FILE), [images[j::per_class] for j in range(per_class)])
    return {"classes": [gen.class_names[c] for c in classes], "per_class": per_class, "seed": seed,
            "device": timings["device"], "dit_s": timings["dit_s"], "decoder_s": timings["decoder_s"],
            "images": timings["images"], "sampler": timings["sampler"], "steps": timings["steps"],
            "cfg_scale": timings["cfg_scale"], "decoder": timings["decoder"],
            "decoder_steps": timings["decoder_steps"]}


def model_card(info: dict, rows: list[dict], grid: dict | None, license: str, repo_id: str | None) -> str:
    """README.md: the YAML header (`card_metadata`) and the text."""
    d, dec = info["dit"], info["decoder"]
    name = repo_id or f"{d['model']} on SSDD-{dec['decoder']} latents"
    dataset = HUB_DATASETS.get(info.get("dataset") or "", (None, info.get("dataset") or "a custom dataset"))[1]
    where = repo_id or "<this repository, or its local folder>"
    classes = ", ".join(d["class_names"][:10]) + (", ..." if len(d["class_names"]) > 10 else "")
    steps = "1 step (distilled)" if dec.get("single_step") else f"{dec.get('default_steps')} steps"
    lines = ["---", yaml.safe_dump(card_metadata(info, rows, license, name), sort_keys=False).strip(), "---", "",
             f"# {name}", "",
             f"A class-conditional {d['model']} ({d['params'] / 1e6:.2f} M parameters) trained on {dataset} at "
             f"{info['im_size']} px, generating in the latent space of an SSDD tokenizer (encoder {dec['encoder']}, "
             f"latents {'x'.join(str(v) for v in info['latent_shape'])}), decoded by the SSDD-{dec['decoder']} "
             f"diffusion decoder in {steps}. {d['num_classes']} classes: {classes}.", "",
             "## Use", "", "```python",
             "from dit.hub import resolve_generator",
             "from dit.pipeline import load_generator",
             f'gen = load_generator(resolve_generator("{where}"))   # fetched once into the Hugging Face cache',
             f"images, timings = gen.generate(gen.resolve_classes([{d['class_names'][0]!r}]), num=4, seed=0)",
             "```", "",
             f"or `python sample/generate.py --ckpt {where} --class {d['class_names'][0]!r}` (this project's code).",
             "", "## Measured", ""]
    if rows:
        lines += ["Figures of this model, as the evaluation scripts wrote them (`--results`):", "", figures_table(rows)]
    else:
        lines += ["No evaluation was attached to this export (`python -m dit.export --results "
                  "<eval/generation_table.py or eval/gfid.py JSON>` adds one)."]
    if grid:
        n = grid["images"]
        lines += ["", f"Drawing the sample grid below at export: {n} images in {grid['dit_s']:.2f} s (DiT, "
                  f"{grid['sampler']} {grid['steps']} steps, cfg {grid['cfg_scale']}) + {grid['decoder_s']:.2f} s "
                  f"({grid['decoder']}, {grid['decoder_steps']} step(s)) on {grid['device']}, one batch including "
                  f"start-up costs: not a throughput figure.", "",
                  "## Samples", "", f"![samples]({GRID_FILE})", "",
                  f"One column per class ({', '.join(grid['classes'])}), {grid['per_class']} rows, seed "
                  f"{grid['seed']}."]
    lines += ["", "## Model", "",
              f"- DiT: {d['model']}, {d['params']:,} parameters, learn_sigma {d['learn_sigma']}, weights "
              f"{d['dtype']} ({DIT_FILE}).",
              f"- Latents: z_norm = (z - {info['z_mean']:.6g}) / {info['z_std']:.6g}; encoder sha256 "
              f"{info['encoder_sha256'][:16]}...",
              f"- Default sampler: {json.dumps(info['sample'])}."]
    for entry in info.get("decoders") or [{"name": f"SSDD-{dec['decoder']}", "file": "decoder.safetensors",
                                            "steps": dec.get("default_steps"), **dec}]:
        lines.append(f"- Decoder {entry['name']}: {entry['decoder']} on {entry['encoder']} latents, "
                     f"{entry['params']:,} parameters, {entry['steps']} step(s) by default ({entry['file']}).")
    prov = info.get("provenance", {})
    lines += ["", "## Files and provenance", "", "| file | bytes | sha256 |", "|---|---|---|"]
    lines += [f"| {f} | {r['bytes']:,} | {r['sha256'][:16]}... |" for f, r in info["files"].items()]
    lines += ["", f"DiT from {prov.get('dit_source')} (step {prov.get('dit_step')}), decoder from "
              f"{prov.get('decoder_source')}; exported {info.get('exported')}. `{INFO_FILE}` holds the whole "
              f"record; the loader checks every file against it.", "",
              "## Licence", "", f"{license}. Decoders derived from the facebook/SSDD release are CC-BY-NC; the "
              f"training data's terms also apply."]
    return "\n".join(lines) + "\n"


def write_hub_files(folder: str, info: dict, rows: list[dict], license: str | None = None,
                    repo_id: str | None = None, per_class: int = 4, seed: int = 0) -> list[str]:
    """Add config.json, samples.png (per_class > 0) and README.md to an exported bundle folder; returns the names."""
    license = license or default_license(info)
    with open(os.path.join(folder, CONFIG_FILE), "w") as f:
        json.dump(hub_config(info), f, indent=2)
    written = [CONFIG_FILE]
    grid = draw_grid(folder, per_class, seed) if per_class > 0 else None
    if grid:
        written.append(GRID_FILE)
    with open(os.path.join(folder, CARD_FILE), "w") as f:
        f.write(model_card(info, rows, grid, license, repo_id))
    return written + [CARD_FILE]


def push_to_hub(folder: str, repo_id: str, private: bool = False, message: str | None = None) -> str:
    """Upload `folder` to the Hub model repository `repo_id` (created if missing) in one commit; returns its URL.
    The token is huggingface_hub's (HF_TOKEN or `hf auth login`)."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type="model",
                                   commit_message=message or f"Upload generator bundle ({time.strftime('%Y-%m-%d')})")
    except Exception as err:  # offline, no token, no rights, ...: one line
        raise UserError(f"could not push {folder} to the Hub repository {repo_id}: "
                        f"{one_line(err, with_type=True)[:200]}") from None
    return str(getattr(commit, "commit_url", None) or f"https://huggingface.co/{repo_id}")
