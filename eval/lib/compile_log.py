"""What torch.compile did during a stretch of a run: recompiles with their reasons, graphs, graph breaks, warnings.

    log = CompileLog()                  # turns on torch's `recompiles` log (stderr) and listens to it
    mark = log.mark()
    ... compiled calls ...
    log.since(mark)                     # {"recompiles": 1, "reasons": [...], "graphs": 2, "graph_breaks": {...}, ...}

A recompile that happens while a benchmark times its calls makes that timing wrong, and one past Dynamo's
recompile limit silently falls back to eager code; both show here. Warnings of Dynamo and Inductor (the recompile
limit, a fallback) and Python warnings (e.g. FlexAttention run unfused) are kept too.
"""

import copy
import logging
import warnings

import torch
import torch._dynamo.utils

RECOMPILES_LOGGER = "torch._dynamo.guards.__recompiles"  # torch's artifact logger of the `recompiles` log
WARNING_LOGGERS = ("torch._dynamo", "torch._inductor")


class _Collect(logging.Handler):
    def __init__(self, sink: list, level=logging.NOTSET):
        super().__init__(level)
        self.sink = sink

    def emit(self, record):
        self.sink.append(record.getMessage())


class CompileLog:
    """Listens to torch's recompile log and Dynamo/Inductor warnings until `close()`."""

    def __init__(self):
        torch._logging.set_logs(recompiles=True)  # the reasons go to stderr as well
        self.recompiles: list = []
        self.warnings: list = []
        self._handlers = [(RECOMPILES_LOGGER, _Collect(self.recompiles))]
        self._handlers += [(name, _Collect(self.warnings, logging.WARNING)) for name in WARNING_LOGGERS]
        for name, handler in self._handlers:
            logging.getLogger(name).addHandler(handler)

    def close(self) -> None:
        """Stop listening (torch's recompile log stays on)."""
        for name, handler in self._handlers:
            logging.getLogger(name).removeHandler(handler)

    def mark(self) -> dict:
        return {"recompiles": len(self.recompiles), "warnings": len(self.warnings),
                "counters": copy.deepcopy({k: dict(v) for k, v in torch._dynamo.utils.counters.items()})}

    def since(self, mark: dict) -> dict:
        """Recompiles (count and the first line of each reason), graphs compiled, graph breaks by reason and
        Dynamo/Inductor warnings since `mark`."""
        now = {k: dict(v) for k, v in torch._dynamo.utils.counters.items()}
        before = mark["counters"]

        def delta(group: str) -> dict:
            old = before.get(group, {})
            return {k: v - old.get(k, 0) for k, v in now.get(group, {}).items() if v - old.get(k, 0)}

        reasons = self.recompiles[mark["recompiles"]:]
        return {"recompiles": len(reasons), "reasons": [one_reason(r) for r in reasons],
                "graphs": delta("stats").get("unique_graphs", 0), "frames": delta("frames"),
                "graph_breaks": delta("graph_break"), "warnings": self.warnings[mark["warnings"]:]}


def one_reason(message: str) -> str:
    """'Recompiling function forward in file:line ... - <guard failure>' -> 'forward: <guard failure>'."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    head = lines[0].removeprefix("Recompiling function ").split(" in ")[0] if lines else "?"
    failures = [line.removeprefix("- ") for line in lines[1:] if line.startswith("- ")]
    return f"{head}: {'; '.join(failures) or (lines[-1] if lines else '')}"


class PythonWarnings:
    """Python warnings raised inside the block, kept (and shown once each at the end of the block)."""

    def __enter__(self):
        self._catch = warnings.catch_warnings(record=True)
        self.caught = self._catch.__enter__()
        warnings.simplefilter("default")
        return self

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)
        self.messages = list(dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in self.caught))
        for m in self.messages:
            print(f"warning: {m}", flush=True)
        return False
