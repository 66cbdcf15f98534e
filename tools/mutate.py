"""Mutation testing for owngpt's core modules: plant one small bug at a time, run that module's tests, count kills.

    nice python tools/mutate.py quantize                      # every mutant of one module
    nice python tools/mutate.py train --functions lr_at --max-mutants 30
    nice python tools/mutate.py --list                         # the modules and the tests each one runs
    nice python tools/mutate.py engine --fork --max-mutants 25  # torch imported once, each mutant in a forked child
    nice python tools/mutate.py engine --fork --ids ID,ID        # re-run chosen mutants (after writing a test)

A mutant is one edit of the source: a comparison flipped (< to <=, == to !=, in to not in), an arithmetic or boolean
operator swapped (+ to -, * to /, and to or), a `not` removed, an integer constant moved by one, True/False swapped,
`+=` to `-=`, or a statement that is a bare call (`optimizer.zero_grad()`) replaced by `pass`. Strings (messages) are
not mutated. Each mutant runs only its module's tests (MODULES below), in a copy of src/ on PYTHONPATH, so the
subprocesses tests start (`python -m owngpt`, torchrun) load the mutant too; the worktree is never modified.
A mutant is killed when the tests fail or run past the timeout (3x the unmutated run, at least +60 s).
score = killed / (mutants run - equivalent); equivalent mutants are listed with the reason in tools/equivalent.txt.
An id is module:line:col:kind, so an edit above a listed mutant moves it: every run (and --list) names the listed ids
of its modules that match no mutant any more; fix them, or the mutant they were written for runs again.

Why not mutmut or cosmic-ray: mutmut 3.8 was tried here first (docs/testing.md): it rewrote the whole of src/
(39 MB of trampolines, 17 minutes) before running anything, made 342 mutants of quantize.py alone, mostly of
message strings, and each of the first 7 timed out under its fork-based runner after torch was imported; cosmic-ray
mutates the working tree in place, which a shared worktree cannot allow, and samples nothing. This script is small,
deterministic (a seeded sample when --max-mutants is given) and maps each module to its own tests.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# module (under src/owngpt) -> the tests that say what it must do (pytest paths or node ids, relative to ROOT).
# The two-process torchrun tests are left out (a few minutes per mutant on a loaded machine), except for train.
MODULES: dict[str, list[str]] = {
    "train": [
        "tests/test_mutation_kills_train_run.py",  # --out against the inputs, the overwrite note, NaN patience, merged
        "tests/test_train.py::test_refuses_a_data_dir_from_another_tokenizer",
        "tests/test_classify_e2e.py::test_frozen_body_through_the_loop",  # the task's prepare_model applied by train
        "tests/test_lora.py::test_lora_resume_is_exact",  # a LoRA run's adapter read back on resume
        "tests/test_mutation_kills_train_loop.py",  # the run record, best and last, overwrite, resume, generation config
        "tests/test_mutation_kills_train.py",
        # the speed logged (a clock stood in for), eval without dropout, seeds, temp dirs, patience at the end (12-01)
        "tests/test_mutation_kills_train_edges.py",
        # train()'s own rollback: a failed --overwrite gives the old run back
        "tests/test_keep_user_work.py::test_an_overwrite_that_fails_before_a_checkpoint_gives_the_old_run_back",
        "tests/test_train_oracles.py",
        "tests/test_train.py::test_loop_equals_a_textbook_adamw_loop",
        "tests/test_train.py::test_overfits_and_writes_the_run_dir",
        "tests/test_resume.py::test_stopped_and_resumed_equals_uninterrupted",
        "tests/test_optim.py::test_muon_run_stopped_and_resumed_is_bitwise_equal",
        # the two-process tests (DDP, FSDP with a resume, each rank's seeds): they alone see the multi-process code;
        # the whole selection took 33 s unmutated on a quiet moment of 12-01, 274 s under load 9
        "tests/test_distributed.py",
    ],
    # the modules split out of train.py: the same tests see them (through the loop, and their own helpers)
    "distributed": [
        "tests/test_mutation_kills_distributed.py",  # Dist's collectives and setup, torch.distributed stood in for
        "tests/test_mutation_kills_train_loop.py",
        "tests/test_distributed.py",
    ],
    "trainer_state": [
        "tests/test_mutation_kills_trainer_state.py",  # each rank's generators, optimizer state by name, refusals
        "tests/test_mutation_kills_train.py",  # the RNG state's JSON round trip, corrupt or missing state
        "tests/test_mutation_kills_train_loop.py",
        "tests/test_resume.py::test_stopped_and_resumed_equals_uninterrupted",
        "tests/test_optim.py::test_muon_run_stopped_and_resumed_is_bitwise_equal",
        "tests/test_distributed.py",
    ],
    "run_dir": [
        "tests/test_mutation_kills_run_dir.py",  # --out made, saves cut short put back, which best a resume keeps
        "tests/test_mutation_kills_train_run.py",
        "tests/test_mutation_kills_train_loop.py",
        "tests/test_mutation_kills_train.py",
        "tests/test_keep_user_work.py",
    ],
    "run_log": [
        "tests/test_mutation_kills_run_log.py",  # metrics.jsonl on resume, TensorBoard scalars, loss.png, write errors
        "tests/test_mutation_kills_train_loop.py",
        "tests/test_train.py::test_overfits_and_writes_the_run_dir",
    ],
    "tasks/lm": [
        "tests/test_mutation_kills.py",
        "tests/test_train_oracles.py",
        "tests/test_train.py::test_loop_equals_a_textbook_adamw_loop",
    ],
    # test_chat.py is the chat REPL (owngpt.chat), not the chat task: these three are the task's own tests
    "tasks/chat": [
        "tests/test_mutation_kills_tasks.py",
        "tests/test_train.py::test_chat_labels_cover_exactly_the_assistant_tokens",
        "tests/test_train.py::test_mmi_examples_are_reversed_dialogues",
        "tests/test_train.py::test_chat_and_mmi_train_with_the_chat_template",
    ],
    "tasks/classify": [
        "tests/test_mutation_kills_classify.py",  # settings, predictions alone in eval mode, metrics, EOS readout
        "tests/test_mutation_kills_tasks.py",
        "tests/test_split_scales_weights.py::test_balanced_weights_with_an_absent_class_match_sklearn_on_the_classes_present",
        "tests/test_classify.py",
    ],
    "tasks/base": [
        "tests/test_mutation_kills_tasks.py",
        "tests/test_mutation_kills.py",
        "tests/test_train_oracles.py",
        "tests/test_train.py::test_loop_equals_a_textbook_adamw_loop",
        "tests/test_train.py::test_chat_labels_cover_exactly_the_assistant_tokens",
    ],
    "chat_format": [
        "tests/test_mutation_kills_chat_format.py",
        "tests/test_chat_format_contract.py",
        "tests/test_chat_format.py",
        "tests/test_chat_segments.py",  # the segment rule (pieces tokenized as the whole string is)
        "tests/test_chat_render_parity.py",
    ],
    "generation": [
        "tests/test_mutation_kills_generation_contract.py",  # bounds, flags, unescape, results, batched beams
        "tests/test_mutation_kills_generation.py",
        "tests/test_engine.py::test_loading_for_generation_prints_no_progress_bars",
        "tests/test_generate.py",
        "tests/test_sampling_oracles.py",
    ],
    # the one decode engine (rows, sampling through transformers' processors, stop strings, the window)
    "engine": [
        "tests/test_mutation_kills_engine_contract.py",  # default shift, a wide head past the cache, a failed step
        "tests/test_mutation_kills_engine.py",
        "tests/test_decode_stream.py",
        "tests/test_sampling_oracles.py",
        "tests/test_engine.py",
        "tests/test_generate.py",
    ],
    "serve/engine": [
        "tests/test_mutation_kills_serve_contract.py",  # stats, defaults, continuous batching, failures, classifier
        "tests/test_mutation_kills_serve.py",
        "tests/test_serve.py",
        "tests/test_frontends.py",
    ],
    # the request-to-engine bridge of the server (prompts, settings, chunks, usage); test_serve.py drives it over HTTP
    "serve/bridge": [
        "tests/test_mutation_kills_serve_bridge.py",  # health without an engine, no model named, a failed row's 500
        "tests/test_serve_bridge.py",
        "tests/test_frontends.py",
        "tests/test_serve.py",
    ],
    # the sampling and device flags of the commands (moved out of generation.py and device.py)
    "commands/flags": [
        "tests/test_mutation_kills_generation_contract.py",  # every flag and its default, unescape
        "tests/test_mutation_kills_generation.py",
        "tests/test_generate.py",
    ],
    "data/prepare": [
        "tests/test_mutation_kills_prepare.py",  # the contract: bounds, report and meta counts, refusals, progress
        "tests/test_mutation_kills_data.py",
        "tests/test_hostile_inputs.py::test_safe_pieces_tokenize_exactly_as_the_whole",
        "tests/test_split_scales_weights.py::test_the_validation_documents_depend_on_the_seed_and_only_on_it",
        "tests/test_prepare.py",
    ],
    "data/datadir": [
        "tests/test_mutation_kills_datadir.py",  # every check open_data_dir makes, the accessors, the writers
        "tests/test_mutation_kills_data.py",
        "tests/test_hostile_inputs.py::test_a_damaged_data_dir_is_refused",
        "tests/test_hostile_inputs.py::test_an_intact_data_dir_passes_every_check",
        "tests/test_prepare.py",
        "tests/test_mutation_kills_tasks.py",
    ],
    "data/privacy": [
        "tests/test_mutation_kills_privacy.py",  # every kind's count, where a CJK name ends
        "tests/test_privacy_properties.py",
        "tests/test_mutation_kills.py",
        "tests/test_mutation_kills_data.py",
        "tests/test_privacy.py",
    ],
    # the engine's one-token decode step over packed (fp32) or int8 projections, and the packing itself
    "decode_step": [
        "tests/test_mutation_kills_decode.py",  # the kernel each batch size reads, unfused activations, scaled RoPE
        "tests/test_decode_kernels.py",
        "tests/test_engine.py",
    ],
    "decode_kernels": [
        "tests/test_mutation_kills_decode.py",  # the cache-resident bound, frozen biases, models off the CPU
        "tests/test_decode_kernels.py",
        "tests/test_engine.py",
    ],
    # the screened LM head of greedy and top-k steps (its C half, owngpt_greedy_head, is not mutated here)
    "greedy_head": [
        "tests/test_greedy_head.py",
    ],
    "quantize": [
        "tests/test_mutation_kills_quantize.py",
        "tests/test_split_scales_weights.py",
        "tests/test_quantize.py",
        "tests/test_mutation_kills.py",
    ],
}

_CMP_SWAP = {
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
}
_BIN_SWAP = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.Div,
    ast.Div: ast.Mult,
    ast.FloorDiv: ast.Mult,
    ast.Mod: ast.FloorDiv,
    ast.Pow: ast.Mult,
    ast.BitAnd: ast.BitOr,
    ast.BitOr: ast.BitAnd,
}


@dataclass
class Mutant:
    id: str  # module:line:col:kind, stable while the line does not move
    line: int
    kind: str
    before: str
    after: str
    status: str = ""  # killed, survived, timeout, equivalent
    seconds: float = 0.0


def _segment(lines: list[bytes], node: ast.AST) -> tuple[int, int, int, int]:
    return node.lineno, node.col_offset, node.end_lineno, node.end_col_offset  # type: ignore[attr-defined]


def _replace(lines: list[bytes], seg: tuple[int, int, int, int], text: str) -> str:
    """The source with the byte range `seg` (1-based lines, byte columns as ast gives them) replaced by `text`."""
    l0, c0, l1, c1 = seg
    out = lines[: l0 - 1] + [lines[l0 - 1][:c0] + text.encode() + lines[l1 - 1][c1:]] + lines[l1:]
    return b"".join(out).decode()


def _docstring_nodes(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0]))
    return ids


def _annotation_nodes(tree: ast.AST) -> set[int]:
    """Nodes inside type annotations (mutating them changes nothing at run time under `from __future__`)."""
    ids: set[int] = set()
    for node in ast.walk(tree):
        anns = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            anns.append(node.returns)
            a = node.args
            anns += [x.annotation for x in a.args + a.posonlyargs + a.kwonlyargs]
            anns += [x.annotation for x in (a.vararg, a.kwarg) if x is not None]
        elif isinstance(node, ast.AnnAssign):
            anns.append(node.annotation)
        for ann in anns:
            if ann is not None:
                ids.update(id(n) for n in ast.walk(ann))
    return ids


def _parents(tree: ast.AST) -> dict[int, ast.AST]:
    return {id(child): node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


def _in_functions(node: ast.AST, parents: dict[int, ast.AST], names: set[str] | None) -> bool:
    if names is None:
        return True
    cur: ast.AST | None = node
    while cur is not None:
        if isinstance(cur, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and cur.name in names:
            return True
        cur = parents.get(id(cur))
    return False


def mutants_of(path: Path, module: str, functions: set[str] | None = None) -> list[tuple[Mutant, str]]:
    """Every mutant of a source file: (description, mutated source). Deterministic order (by position)."""
    source = path.read_text(encoding="utf-8")
    lines = source.encode().splitlines(keepends=True)
    tree = ast.parse(source)
    skip = _docstring_nodes(tree) | _annotation_nodes(tree)
    parents = _parents(tree)
    no_mutate = {i + 1 for i, ln in enumerate(lines) if b"pragma: no mutate" in ln}
    out: list[tuple[Mutant, str]] = []

    def add(node: ast.AST, kind: str, new_text: str) -> None:
        seg = _segment(lines, node)
        if seg[0] in no_mutate:
            return
        before = ast.get_source_segment(source, node) or ""
        mutated = _replace(lines, seg, new_text)
        try:
            compile(mutated, str(path), "exec")
        except SyntaxError:
            return
        m = Mutant(f"{module}:{seg[0]}:{seg[1]}:{kind}", seg[0], kind, " ".join(before.split())[:120], new_text[:120])
        out.append((m, mutated))

    for node in ast.walk(tree):
        if id(node) in skip or not hasattr(node, "lineno") or not _in_functions(node, parents, functions):
            continue
        if isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                if type(op) in _CMP_SWAP:
                    new = ast.Compare(node.left, list(node.ops), node.comparators)
                    new.ops[i] = _CMP_SWAP[type(op)]()
                    add(node, f"cmp{i}:{type(op).__name__}", f"({ast.unparse(new)})")
        elif isinstance(node, ast.BinOp) and type(node.op) in _BIN_SWAP:
            if isinstance(node.left, ast.Constant) and isinstance(node.left.value, str):
                continue  # "%" formatting and string concatenation
            new = ast.BinOp(node.left, _BIN_SWAP[type(node.op)](), node.right)
            add(node, f"bin:{type(node.op).__name__}", f"({ast.unparse(new)})")
        elif isinstance(node, ast.BoolOp):
            new = ast.BoolOp(ast.Or() if isinstance(node.op, ast.And) else ast.And(), node.values)
            add(node, f"bool:{type(node.op).__name__}", f"({ast.unparse(new)})")
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            add(node, "not", f"({ast.unparse(node.operand)})")
        elif isinstance(node, ast.Constant):
            if isinstance(node.value, bool):
                add(node, "const:bool", str(not node.value))
            elif isinstance(node.value, int):
                add(node, "const:int", str(node.value + 1))
        elif isinstance(node, ast.AugAssign) and type(node.op) in (ast.Add, ast.Sub):
            new = ast.AugAssign(node.target, ast.Sub() if isinstance(node.op, ast.Add) else ast.Add(), node.value)
            add(node, "augassign", ast.unparse(new))
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            add(node, "drop-call", "pass")
    out.sort(key=lambda mm: (mm[0].line, mm[0].id))
    return out


def run_tests(tests: list[str], src_copy: Path, timeout: float, log) -> tuple[int | None, float]:
    env = {**os.environ, "PYTHONPATH": str(src_copy), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
        log.write(p.stdout.decode(errors="replace")[-3000:] + "\n")
        return p.returncode, time.perf_counter() - t0
    except subprocess.TimeoutExpired:
        return None, time.perf_counter() - t0


# What every owngpt test imports before it imports owngpt: loaded once by the --fork runner's parent.
_PRELOAD = (
    "numpy",
    "torch",
    "transformers",
    "tokenizers",
    "safetensors.torch",
    "pytest",
    "hypothesis",
    "yaml",
)


def preload() -> float:
    """Import the heavy libraries once (never owngpt itself: each mutant's child imports its own copy), return s."""
    import importlib

    t0 = time.perf_counter()
    for name in _PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    # transformers imports lazily: touch the model classes the tests build
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: F401

    leaked = [m for m in sys.modules if m == "owngpt" or m.startswith("owngpt.")]
    if leaked:
        raise RuntimeError(f"--fork: owngpt was imported before the fork ({leaked[:3]}): mutants would not load")
    return time.perf_counter() - t0


def run_tests_forked(tests: list[str], src_copy: Path, timeout: float, log) -> tuple[int | None, float]:
    """run_tests in a forked child of a process that already imported torch and transformers (about 5 s saved per
    mutant here). Safe because the parent never runs a torch op (no OpenMP threads exist at the fork) and never
    imports owngpt (the child imports the mutated copy first on sys.path). Subprocesses that tests start get the
    mutant through PYTHONPATH as before. On timeout the child's whole process group is killed."""
    import signal

    log.flush()
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        rc = 98
        try:
            os.setpgid(0, 0)
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            os.chdir(ROOT)
            os.environ["PYTHONPATH"] = str(src_copy)
            own_src = str(ROOT / "src")
            sys.path[:] = [str(src_copy)] + [p for p in sys.path if os.path.abspath(p or ".") != own_src]
            import pytest

            rc = int(pytest.main(["-x", "-q", "-p", "no:cacheprovider", *tests]))
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), time.perf_counter() - t0
        if time.perf_counter() - t0 > timeout:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
            return None, time.perf_counter() - t0
        time.sleep(0.05)


def load_equivalent(path: Path) -> dict[str, str]:
    """tools/equivalent.txt: `mutant-id  reason` per line (# comments)."""
    out = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                mid, _, reason = line.partition(" ")
                out[mid] = reason.strip()
    return out


def stale_equivalents(module: str, equivalent: dict[str, str]) -> list[str]:
    """The ids tools/equivalent.txt lists for `module` that name no mutant of its source now: the line moved or the
    code changed, so the mutant the reason was written for is no longer skipped (and another may be)."""
    ids = {m.id for m, _ in mutants_of(ROOT / "src" / "owngpt" / f"{module}.py", module)}
    return sorted(i for i in equivalent if i.split(":", 1)[0] == module and i not in ids)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("modules", nargs="*", help=f"modules to mutate (default: all): {', '.join(MODULES)}")
    ap.add_argument("--functions", default=None, help="only mutants inside these functions/classes (comma-separated)")
    ap.add_argument("--max-mutants", type=int, default=0, help="a seeded sample of this many per module (0 = all)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the sample (default 0)")
    ap.add_argument("--ids", default=None, help="only these mutant ids (comma-separated): re-run a run's survivors")
    ap.add_argument("--tests", default=None, help="run these tests instead of the module's (comma-separated)")
    ap.add_argument(
        "--fork",
        action="store_true",
        help="run each mutant's pytest in a forked child of one process that imported torch and transformers once\n"
        "(saves the import, about 5 s a mutant here; POSIX only)",
    )
    ap.add_argument("--list", action="store_true", help="list the modules, their tests and mutant counts; run nothing")
    ap.add_argument("--out", default="mutation-report", help="directory for report.json and the pytest log")
    ap.add_argument("--equivalent", default=str(ROOT / "tools" / "equivalent.txt"), help="equivalent mutants file")
    args = ap.parse_args()

    modules = args.modules or list(MODULES)
    unknown = [m for m in modules if m not in MODULES]
    if unknown:
        ap.error(f"unknown modules {unknown}; known: {', '.join(MODULES)}")
    functions = set(args.functions.split(",")) if args.functions else None
    if args.tests:
        for m in modules:
            MODULES[m] = args.tests.split(",")
    equivalent = load_equivalent(Path(args.equivalent))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    for m in modules:
        stale = stale_equivalents(m, equivalent)
        if stale:
            print(f"{m}: tools/equivalent.txt lists ids that match no mutant (moved lines? fix them): {stale}")
    if args.list:
        for m in modules:
            n = len(mutants_of(ROOT / "src" / "owngpt" / f"{m}.py", m, functions))
            print(f"{m:16} {n:4} mutants   tests: {' '.join(MODULES[m])}")
        return 0

    runner = run_tests
    if args.fork:
        # no stale bytecode: a mutant written in the same second with the same size must not reuse the last .pyc
        sys.dont_write_bytecode = True
        os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
        print(f"--fork: libraries imported once in {preload():.1f} s", flush=True)
        runner = run_tests_forked
    report = {}
    with tempfile.TemporaryDirectory(prefix="owngpt-mutate-") as tmp, open(out_dir / "pytest.log", "w") as log:
        src_copy = Path(tmp) / "src"
        shutil.copytree(ROOT / "src", src_copy, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        for m in modules:
            target = src_copy / "owngpt" / f"{m}.py"
            original = target.read_text(encoding="utf-8")
            candidates = mutants_of(ROOT / "src" / "owngpt" / f"{m}.py", m, functions)
            chosen = candidates
            if args.ids:
                wanted = set(args.ids.split(","))
                chosen = [c for c in candidates if c[0].id in wanted]
            elif args.max_mutants and len(candidates) > args.max_mutants:
                idx = sorted(random.Random(args.seed).sample(range(len(candidates)), args.max_mutants))
                chosen = [candidates[i] for i in idx]
            log.write(f"==== {m}: baseline\n")
            rc, base_s = runner(MODULES[m], src_copy, 3600, log)
            if rc != 0:
                print(f"{m}: the unmutated tests fail (rc {rc}); see {out_dir / 'pytest.log'}", file=sys.stderr)
                return 1
            timeout = max(3 * base_s, base_s + 60)
            print(f"{m}: {len(chosen)} of {len(candidates)} mutants; tests take {base_s:.0f} s", flush=True)
            results = []
            for k, (mut, source) in enumerate(chosen, 1):
                if mut.id in equivalent:
                    mut.status = "equivalent"
                    results.append(mut)
                    continue
                target.write_text(source, encoding="utf-8")
                log.write(f"==== {mut.id}: {mut.before} -> {mut.after}\n")
                try:
                    rc, mut.seconds = runner(MODULES[m], src_copy, timeout, log)
                finally:
                    target.write_text(original, encoding="utf-8")
                mut.status = "timeout" if rc is None else ("survived" if rc == 0 else "killed")
                results.append(mut)
                print(f"  [{k}/{len(chosen)}] {mut.status:8} {mut.id}  {mut.before!r} -> {mut.after!r}", flush=True)
            counted = [r for r in results if r.status != "equivalent"]
            killed = sum(r.status in ("killed", "timeout") for r in counted)
            score = killed / len(counted) if counted else float("nan")
            report[m] = {
                "tests": MODULES[m],
                "mutants_total": len(candidates),
                "mutants_run": len(results),
                "killed": killed,
                "equivalent": len(results) - len(counted),
                "score": score,
                "baseline_s": base_s,
                "mutants": [asdict(r) for r in results],
            }
            print(f"{m}: score {killed}/{len(counted)} = {score:.0%}", flush=True)
            for r in counted:
                if r.status == "survived":
                    print(f"  SURVIVED {r.id}: {r.before!r} -> {r.after!r}")
    (out_dir / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
