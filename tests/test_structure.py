"""The repository's structure and the shared run machinery: one-way dependencies, no imports of another package's
command-line module, UserError as a ValueError, atomic writes, the step plan, the one time grid."""

import ast
import os
import subprocess
import sys

import pytest
import torch

from tokenizer.common.atomic import atomic_directory, existing_version
from tokenizer.common.errors import UserError, one_line
from tokenizer.common.training import plan_steps
from tokenizer.flow import time_grid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("tokenizer", "dit", "eval", "sample", "app")
COMMAND_LINE_MODULES = {"tokenizer.train", "dit.train"}  # entry points only: nothing else may import them


def imports_of(path: str) -> set:
    tree = ast.parse(open(path).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def source_files(package: str):
    for folder, _, files in os.walk(os.path.join(ROOT, package)):
        for f in files:
            if f.endswith(".py"):
                yield os.path.join(folder, f)


def test_dependencies_run_one_way_and_no_command_line_module_is_imported():
    offenders = []
    for package in PACKAGES:
        for path in source_files(package):
            for name in imports_of(path):
                top = name.split(".")[0]
                if package == "tokenizer" and top in ("dit", "eval", "sample", "app"):
                    offenders.append(f"{path}: {name} (tokenizer must not depend on it)")
                if name in COMMAND_LINE_MODULES and not path.endswith(name.replace(".", "/") + ".py"):
                    offenders.append(f"{path}: imports the command-line module {name}")
    assert not offenders, offenders


EVAL = os.path.join(ROOT, "eval")
EVAL_SCRIPTS = {f"eval.{f[:-3]}" for f in os.listdir(EVAL) if f.endswith(".py") and f != "__init__.py"}


def modules_named(path: str) -> set:
    """Every module an import in `path` names; `from eval import gfid` names eval and eval.gfid."""
    names = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_no_eval_script_is_imported_and_the_stress_harnesses_only_by_tests():
    """eval/<name>.py are command lines: nothing imports one (what scripts share lives in eval.lib); the stress
    harnesses in eval/stress are imported by nothing outside that folder (the tests run them)."""
    assert {"eval.gfid", "eval.decoder_benchmark", "eval.sampling_speed", "eval.generation"} <= EVAL_SCRIPTS
    stress = os.path.join(EVAL, "stress")
    offenders = []
    for package in PACKAGES:
        for path in source_files(package):
            names = modules_named(path)
            offenders += [f"{path} imports the script {name}" for name in sorted(names & EVAL_SCRIPTS)]
            if os.path.dirname(path) != stress:
                offenders += [f"{path} imports the stress harness {name}" for name in sorted(names)
                              if name == "eval.stress" or name.startswith("eval.stress.")]
    assert not offenders, offenders


MACHINERY = os.path.join(ROOT, "tokenizer", "common")


def test_the_run_machinery_imports_nothing_outside_itself_and_has_no_cycle():
    graph, offenders = {}, []
    for path in source_files("tokenizer/common"):
        module = "tokenizer.common." + os.path.basename(path)[:-3]
        ours = {name for name in imports_of(path) if name.split(".")[0] in PACKAGES}
        offenders += [f"{module} imports {name}" for name in ours if not name.startswith("tokenizer.common")]
        graph[module] = {name for name in ours if name in graph or name.startswith("tokenizer.common.")}
    assert not offenders, offenders

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n))) for n in graph.get(start, ()))

    cycles = [m for m in graph if reaches(m, m)]
    assert not cycles, f"import cycle through {cycles}"


@pytest.mark.slow
def test_importing_the_machinery_loads_no_model_code():
    modules = sorted("tokenizer.common." + f[:-3] for f in os.listdir(MACHINERY) if f.endswith(".py"))
    code = (f"import sys; import {', '.join(modules)}; print(sorted(m for m in sys.modules "
            "if m.startswith('tokenizer.') and not m.startswith('tokenizer.common')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
    # the package's public names still work, loaded on first use
    code = ("import tokenizer, sys; a = 'tokenizer.ssdd' in sys.modules; tokenizer.SSDD; "
            "print(a, 'tokenizer.ssdd' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False True"


@pytest.mark.slow
def test_importing_the_cache_loads_neither_trainer_nor_gan():
    code = ("import dit.cache, sys; "
            "print(sorted(m for m in ('tokenizer.train', 'tokenizer.losses') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_user_error_is_a_value_error_and_one_line():
    assert issubclass(UserError, ValueError)
    with pytest.raises(ValueError):
        time_grid(0)
    assert one_line(OSError("disk full\nmore detail")) == "disk full"
    assert one_line(KeyError("z_mean"), with_type=True) == "KeyError: 'z_mean'"
    wrapped = RuntimeError("Caught UserError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                           "last):\n  File ...\ntokenizer.errors.UserError: cannot read image a.png: truncated")
    assert one_line(wrapped) == "cannot read image a.png: truncated"


def test_atomic_directory_keeps_the_old_version_on_failure(tmp_path):
    d = str(tmp_path / "state")
    with atomic_directory(d) as tmp:
        open(os.path.join(tmp, "marker"), "w").write("1")
    with pytest.raises(RuntimeError):
        with atomic_directory(d) as tmp:
            open(os.path.join(tmp, "marker"), "w").write("2")
            raise RuntimeError("killed mid-write")
    assert open(os.path.join(d, "marker")).read() == "1"
    assert sorted(os.listdir(tmp_path)) == ["state"]  # no temporary directory left
    with pytest.raises(UserError, match="previous version is kept"):
        with atomic_directory(d):
            raise OSError(28, "No space left on device")
    assert existing_version(d, "marker") == d and open(os.path.join(d, "marker")).read() == "1"


def test_plan_steps_counts_and_refuses():
    plan = plan_steps(1000, 64, 2, epochs=3, max_steps=None)
    assert (plan.per_rank_batch, plan.steps_per_epoch, plan.total_steps) == (32, 15, 45)
    assert plan_steps(1000, 64, 1, epochs=3, max_steps=7).total_steps == 7
    with pytest.raises(UserError, match="training.batch_size=63 must be divisible"):
        plan_steps(1000, 63, 2, 1, None, batch_key="training.batch_size")
    with pytest.raises(UserError, match="smaller than one batch"):
        plan_steps(10, 64, 1, 1, None)


def test_one_time_grid_serves_decoder_and_dit():
    assert torch.equal(time_grid(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    assert time_grid(2, power=2).tolist() == [1.0, 0.25, 0.0]
    shifted = time_grid(4, shift=3.0)
    assert shifted[0] == 1 and shifted[-1] == 0 and bool((shifted[1:-1] > time_grid(4)[1:-1]).all())


@pytest.mark.lint
def test_ruff_check_is_clean():
    """LINT: `ruff check .` over the whole tree (rules in pyproject.toml; ruff comes with the `test` extra) finds
    nothing. It fails on the first new long line or unused import: fix the line, or run `ruff check --fix` for the
    fixable kinds."""
    res = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
