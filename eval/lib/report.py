"""What every evaluation script writes: the machine it ran on, a Markdown table, and <out>.json + <out>.md.

Benchmarks and quality tables record the machine, the date and the exact command beside their numbers, so a figure
can be traced and re-measured (docs/RESULTS.md quotes them). Every report and figure is written atomically: a
reader (or a killed run) sees the previous complete file or the new one, never half of one.
"""

import datetime
import os
import platform
import sys

import torch

from tokenizer.common.atomic import atomic_file, atomic_json


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def machine_info(device) -> dict:
    """CPU model, GPU name, torch version and threads, host name and load average (a shared CPU skews timings)."""
    device = torch.device(device)
    return {"cpu": cpu_model(), "cpus": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "host": platform.node(),
            "device": str(device), "load_average": load_average()}


def today() -> str:
    return datetime.datetime.now().strftime("%Y-%m-%d %H:%M")


def command_line(script: str, argv=None) -> str:
    """`python <script> <args>` as typed (argv defaults to this process's arguments)."""
    return f"python {script} " + " ".join(sys.argv[1:] if argv is None else argv)


def run_script(parser, fn, argv=None) -> int:
    """Parse the command line, keep it in `args.argv` (reports record it), and run `fn(args)` with one-line errors."""
    from tokenizer.common.errors import run_cli

    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return run_cli(fn, args)


def markdown_table(rows: list, columns: list, lead: list = ()) -> list:
    """Lines of a Markdown table: `lead` columns [(key, title)] shown as they are, then `columns`
    [(key, title, format)]; a missing or None value shows as n/a."""
    titles = [title for _, title in lead] + [c[1] for c in columns]
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    for r in rows:
        cells = [str(r[k]) for k, _ in lead]
        cells += [fmt.format(r[k]) if r.get(k) is not None else "n/a" for k, _, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def row_notes(rows: list) -> list:
    """The distinct `notes` of the rows (e.g. why a metric is n/a), sorted."""
    return sorted({n for r in rows for n in (r.get("notes") or [])})


def write_json(path: str, record: dict) -> str:
    """Write `record` as indented JSON to `path` (its folder created), atomically; returns the path."""
    atomic_json(path, record)
    return path


def write_text(path: str, text: str) -> str:
    """Write `text` to `path` (its folder created), atomically; returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    atomic_file(path, write)
    return path


def write_report(out: str, record: dict, markdown: str) -> list:
    """Write <out>.json (the record) and <out>.md (the text), each atomically; returns the two paths."""
    return [write_json(out + ".json", record), write_text(out + ".md", markdown)]


def save_figure(fig, path: str, dpi: int = 120) -> str:
    """Save a matplotlib figure to `path` (format from its extension, folder created) atomically, and close it."""
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fmt = os.path.splitext(path)[1].lstrip(".") or "png"
    atomic_file(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format=fmt))
    plt.close(fig)
    return path
