"""Command line: ``python -m engine {train,verify,explain,progress,info,prune} ...``.

Every command prints a human summary, or one JSON object with ``--json`` (valid JSON: a
value that is not a finite number is printed as ``null``). Errors the user can fix are
printed as one ``error:`` line (exit status 2), never as a traceback. SIGINT (Ctrl-C) and
SIGTERM stop a command cleanly at any point, with one line and exit status 130 or 143;
output cut short by the reader (``| head``) ends the command quietly. ``docs/errors.md``
states the whole promise.

This module imports only the standard library at load time, so that a signal that arrives
while the engine's libraries load is handled like any other.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import signal
import sys
import threading
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, get_args, get_type_hints

from engine.errors import BadInputError, ExplaindError

Handler = Callable[[argparse.Namespace], dict[str, Any]]
TRUST_HELP = "import the model and data code the run names (needed unless it is a built-in task)"


def _config_options(parser: argparse.ArgumentParser, config_cls: type) -> None:
    """One ``--field-name`` option per field of a task's frozen config dataclass."""
    hints = get_type_hints(config_cls)
    for field in dataclasses.fields(config_cls):
        flag = "--" + field.name.replace("_", "-")
        kind = hints[field.name]
        if isinstance(kind, types.UnionType):  # ``int | None``: the flag gives the number
            kind = next(k for k in get_args(kind) if k is not type(None))
        default = field.default
        if kind is bool:
            parser.add_argument(flag, dest=field.name, type=_parse_bool, default=None,
                                help=f"true/false (default {default})")
        elif kind in (int, float, str):
            parser.add_argument(flag, dest=field.name, type=kind, default=None, help=f"default {default}")
        else:  # tuples such as betas or channels: comma-separated numbers of the element type
            parser.add_argument(flag, dest=field.name, type=_tuple_parser(get_args(kind)[0]), default=None,
                                help=f"comma-separated (default {','.join(map(str, default))})")


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _tuple_parser(element: type) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        try:
            return tuple(element(v) for v in text.split(","))
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected comma-separated {element.__name__} values, got {text!r}") \
                from exc
    return parse


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


# ---------------------------------------------------------------------------- commands
def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    from engine.run.history import History
    from engine.tasks import TASKS, make_config, train_task

    task_cls = TASKS[args.task]
    preset = dict(task_cls.presets[args.preset]) if args.preset else {}
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(task_cls.config_cls)
                 if getattr(args, f.name) is not None}
    make_config(args.task, {**preset, **overrides})  # every option checked before anything is written
    out = train_task(args.task, Path(args.out), {**preset, **overrides}, progress=not args.json,
                     overwrite=args.overwrite)
    history = History.open(out)
    metrics = history.metrics()
    last = metrics.tail(1).to_dicts()[0] if metrics.height else {}
    return {"run": str(out), "task": args.task, "steps": history.num_steps, "final": last}


def cmd_verify(args: argparse.Namespace) -> dict[str, Any]:
    from engine.run.verify import verify

    report = verify(args.run, allow_incomplete=args.allow_incomplete, progress=not args.json,
                    trust_run=args.trust_run)
    return report.to_json()


def cmd_explain(args: argparse.Namespace) -> dict[str, Any]:
    import polars as pl

    from engine.decompose import ExplainConfig, parse_test
    from engine.model.outputs import imported_quantity
    from engine.parallel import explain_all, from_arguments, remove_shards
    from engine.run.history import History
    from engine.store import check_target, validate_run_name, write_run

    out = Path(args.out)
    validate_run_name(out.stem)
    check_target(out, protect=(args.run,))
    # an import path on the command line is the user's own choice of code to run (no --trust-run)
    quantity = imported_quantity(args.quantity) if ":" in args.quantity else args.quantity
    common = {**parse_test(args.test), "dtype": args.dtype, "device": args.device, "subsample": args.subsample}
    config = ExplainConfig(**common, quantity=quantity, quadrature=args.quadrature, views=args.views,
                           window=args.window, rtol=args.rtol, decay_split=not args.no_decay_split,
                           engine=args.engine, memory_mb=args.memory_mb, block=args.block,
                           partitions=(*_split(args.partitions), *_partition_specs(args.partition_spec)))
    # prediction-level exactness (agreement, KL) needs every logit reconstructed
    checks = [ExplainConfig(**common, quantity="logits", quadrature=q, views=()) for q in _split(args.exactness)]
    workers = from_arguments(args)
    history = History.open(args.run, allow_incomplete=args.allow_incomplete)
    task = history.task(args.trust_run)
    if checks and task.dataset("train").regression:
        raise BadInputError(f"--exactness compares predicted classes (agreement, KL); {history.path} has "
                            "floating-point targets")
    shards = out.with_name(out.name + ".shards")
    (explanation, *checked), parallel = explain_all(history, task, [config, *checks], workers, shards,
                                                    progress=not args.json, allow_incomplete=args.allow_incomplete)
    exactness = [e.exactness() for e in (explanation, *checked) if e.exactness() is not None]
    table = pl.concat(exactness).unique("quadrature", keep="first", maintain_order=True) if exactness else None
    write_run(out, explanation.to_bundle(history, task, exactness=table))
    remove_shards(shards)
    summary = explanation.summary()
    summary["out"] = str(out)
    if parallel is not None:
        summary["parallel"] = parallel
    if table is not None:
        summary["exactness"] = table.to_dicts()
    return summary


def cmd_explain_checkpoints(args: argparse.Namespace) -> dict[str, Any]:
    from engine.decompose.checkpoints import checkpoint_config, explain_checkpoints, work_folder
    from engine.parallel import explain_intervals, from_arguments
    from engine.run.series import SeriesSource, open_series
    from engine.store import check_target, validate_run_name

    out = Path(args.out)
    validate_run_name(out.stem)
    inputs = [*args.source, args.inputs, *(p for p in (args.model, args.tokenizer) if p and not p.startswith("{"))]
    check_target(out, protect=inputs)
    parallel = from_arguments(args)
    # the model is the user's own --model or a Hugging Face config.json (data that names no code):
    # no --trust-run is asked for
    source = SeriesSource(tuple(args.source), args.inputs, args.model, args.steps, args.tokenizer, args.max_inputs)
    opened = open_series(source)
    options = {"quantity": args.quantity, "quadrature": args.quadrature, "dtype": args.dtype, "rtol": args.rtol,
               "device": args.device}
    config = checkpoint_config(opened, **options)
    report = None
    if parallel is not None:  # every interval as a task, saved where explain_checkpoints reads it back
        report = explain_intervals(source, options, work_folder(out, opened, config), parallel,
                                   progress=not args.json)
    summary = explain_checkpoints(opened, config, out, progress=not args.json).summary()
    return {**summary, "out": str(out), **({"parallel": report} if report is not None else {})}


def _partition_specs(paths: list[str]) -> list[dict]:
    """The partition specs in JSON files (one spec, or a list of them, per file)."""
    from engine.errors import BadInputError

    specs: list[dict] = []
    for path in paths:
        try:
            loaded = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise BadInputError(f"cannot read the partition spec {path}: {exc}") from None
        specs.extend(loaded if isinstance(loaded, list) else [loaded])
    return specs


def cmd_prune(args: argparse.Namespace) -> dict[str, Any]:
    from engine.analysis.prune import cmd_prune as run

    return run(args)


def cmd_progress(args: argparse.Namespace) -> dict[str, Any]:
    from engine.analysis.progress import cmd_progress as run

    return run(args)


def cmd_import_explaind(args: argparse.Namespace) -> dict[str, Any]:
    from engine.importers.explaind import cmd_import_explaind as run

    return run(args)


def cmd_sample(args: argparse.Namespace) -> dict[str, Any]:
    from engine.parallel import from_arguments
    from engine.samples import build_sample

    return build_sample(args.name, Path(args.out), Path(args.work), progress=not args.json,
                        parallel=from_arguments(args))


def cmd_info(args: argparse.Namespace) -> dict[str, Any]:
    from engine.store import info

    return info(Path(args.path))


COMMANDS: dict[str, tuple[Handler, str]] = {
    "train": (cmd_train, "train a built-in task and record it"),
    "verify": (cmd_verify, "replay every recorded update from the record (MATH.md §3)"),
    "explain": (cmd_explain, "decompose a recorded run into influences and write a run database"),
    "explain-checkpoints": (cmd_explain_checkpoints, "decompose the changes between consecutive checkpoints "
                            "(MATH.md §7) and write a run database"),
    "prune": (cmd_prune, "prune the final model by kernel importance and its variants vs Taylor, magnitude and "
              "random (MATH.md §5)"),
    "progress": (cmd_progress, "add modular addition's progress measures (restricted and excluded loss, key "
                 "frequencies) to a run database"),
    "info": (cmd_info, "summarize a run database"),
    "import-explaind": (cmd_import_explaind, "convert a run recorded with the published explaind package"),
    "sample": (cmd_sample, "rebuild a shipped sample run from scratch (train, verify, explain, prune)"),
}
# what each command writes: a run database (published atomically) or a run directory (recorded chunk by chunk)
_DATABASE_OUT: dict[str, Callable[[argparse.Namespace], Path]] = {
    "explain": lambda args: Path(args.out),
    "explain-checkpoints": lambda args: Path(args.out),
    "prune": lambda args: Path(args.db),
    "sample": lambda args: Path(args.out) / f"{args.name}.duckdb",
}
_RUN_OUT: dict[str, Callable[[argparse.Namespace], Path]] = {
    "train": lambda args: Path(args.out),
    "import-explaind": lambda args: Path(args.out),
}


def _state(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def _left_behind(args: argparse.Namespace | None, before: tuple[int, int] | None) -> str:
    """What an interrupted command leaves: its database as it was (or completely replaced), its run incomplete."""
    if args is None:
        return "nothing was written"
    if args.command in _DATABASE_OUT:
        out = _DATABASE_OUT[args.command](args)
        if _state(out) != before:
            return f"{out} had already been published completely"
        return f"nothing was published; {out} is as it was" if before else "nothing was published"
    if args.command in _RUN_OUT:
        out = _RUN_OUT[args.command](args)
        try:
            status = json.loads((out / "manifest.json").read_text()).get("status")
        except (OSError, ValueError, AttributeError):
            return "nothing was recorded"
        if status == "complete":
            return f"the run directory {out} is complete"
        return f"the run directory {out} keeps its finished chunks and is marked incomplete"
    return "nothing was written"


@functools.cache
def build_parser() -> argparse.ArgumentParser:
    from engine.decompose.checkpoints import QUADRATURE as SERIES_QUADRATURE
    from engine.tasks import TASKS

    parser = argparse.ArgumentParser(prog="python -m engine",
                                     description="Record, verify, explain and prune training runs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help=COMMANDS["train"][1])
    tasks = train.add_subparsers(dest="task", required=True)
    for name, task_cls in TASKS.items():
        config_cls = task_cls.config_cls
        task = tasks.add_parser(name, help=(config_cls.__doc__ or name).splitlines()[0])
        task.add_argument("--out", required=True, help="run directory to create")
        task.add_argument("--overwrite", action="store_true",
                          help="replace an existing run directory (never a folder that is not one)")
        task.add_argument("--json", action="store_true", help="print one JSON object")
        if task_cls.presets:
            task.add_argument("--preset", choices=sorted(task_cls.presets), default=None,
                              help="a named set-up; flags given beside it override its values")
        else:
            task.set_defaults(preset=None)
        _config_options(task, config_cls)

    verify = sub.add_parser("verify", help=COMMANDS["verify"][1])
    verify.add_argument("run", help="run directory")
    verify.add_argument("--allow-incomplete", action="store_true", help="verify the steps of an unfinished run")
    verify.add_argument("--trust-run", action="store_true", help=TRUST_HELP)
    verify.add_argument("--json", action="store_true", help="print one JSON object")

    explain = sub.add_parser("explain", help=COMMANDS["explain"][1])
    explain.add_argument("run", help="run directory")
    explain.add_argument("--out", required=True, help="run database to write (.duckdb), replaced atomically")
    explain.add_argument("--test", default="val:16", help="explained examples: SPLIT, SPLIT:N, SPLIT:all, "
                         "SPLIT:ids=I,J (default %(default)s)")
    explain.add_argument("--views", default="components", help="comma-separated from components,data,importance; "
                         "completeness is always computed (default %(default)s)")
    explain.add_argument("--quantity", default="logits",
                         help="logits, true-logit, logprob, loss (the run's training loss), margin, or the import "
                         "path package.module:function of fn(output, labels) -> (batch,) or (batch, out) "
                         "(default %(default)s)")
    explain.add_argument("--quadrature", default="adaptive",
                         help="adaptive, adaptive:N, gauss:N or midpoint:N (default %(default)s)")
    explain.add_argument("--window", type=int, default=1, help="steps per stored window (default %(default)s)")
    explain.add_argument("--partitions", default="", help="comma-separated built-in partitions finer than a tensor "
                         "(modular-addition: heads, neurons, tokens, embed-fourier, unembed-fourier; 'all')")
    explain.add_argument("--partition-spec", action="append", default=[], metavar="FILE.json",
                         help="a JSON file with a partition spec (or a list of them); repeatable")
    explain.add_argument("--subsample", type=float, default=1.0,
                         help="fraction of steps computed, by |loss change|; the rest is residual (default 1)")
    explain.add_argument("--exactness", default="", help="extra quadratures for the exactness table, "
                         "e.g. midpoint:100,midpoint:10 (all logits, completeness only)")
    explain.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    explain.add_argument("--rtol", type=float, default=None,
                         help="error budget of the adaptive rule: each example's summed residual within RTOL of "
                         "its change; float32 steps that cannot meet it are recomputed in float64 "
                         "(default: every step to round-off)")
    explain.add_argument("--no-decay-split", action="store_true", help="do not split components into their "
                         "weight-decay share (half the forward-mode directions; no data view)")
    explain.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    explain.add_argument("--engine", default="auto", choices=("auto", "jvp", "vjp"),
                         help="derivatives by forward-mode directions (jvp) or per-output reverse passes (vjp); "
                         "auto counts both and takes the cheaper (default %(default)s)")
    explain.add_argument("--memory-mb", type=_positive_int, default=1024,
                         help="budget for the vectorised batches' Jacobians, accumulators and (a quarter) "
                         "activations, in MiB (default %(default)s)")
    explain.add_argument("--block", type=_positive_int, default=None,
                         help="steps evaluated together in one vectorised call (default: from the budgets, at most "
                         "32); fewer lower peak memory at some speed")
    explain.add_argument("--allow-incomplete", action="store_true", help="explain the steps of an unfinished run")
    explain.add_argument("--trust-run", action="store_true", help=TRUST_HELP)
    explain.add_argument("--json", action="store_true", help="print one JSON object")
    from engine.parallel import add_arguments as parallel_arguments

    parallel_arguments(explain)

    series = sub.add_parser("explain-checkpoints", help=COMMANDS["explain-checkpoints"][1])
    series.add_argument("source", nargs="+", help="a folder of checkpoint-<step> folders, or checkpoints (state-dict "
                        "files or save_pretrained folders) in training order")
    series.add_argument("--inputs", required=True, help="explained inputs: token ids (.npy, .parquet, .jsonl) or texts "
                        "(.txt, .jsonl/.parquet 'text') for a language model; a split (val, val:16, val:ids=3,7) for "
                        "a task's model")
    series.add_argument("--out", required=True, help="run database to write (.duckdb), replaced atomically")
    series.add_argument("--model", default=None, help="model spec as JSON or a .json file: a Hugging Face config, "
                        "{\"task\": ...} or {\"model\": \"pkg.mod:Class\", \"model_kwargs\": {...}} "
                        "(default: the checkpoints' config.json)")
    series.add_argument("--steps", type=_tuple_parser(int), default=None, help="training step of each checkpoint, "
                        "comma-separated (default: from the names)")
    series.add_argument("--tokenizer", default=None, help="tokenizer folder for text inputs (default: the "
                        "checkpoints')")
    series.add_argument("--max-inputs", type=_positive_int, default=None, help="explain the first N sequences only")
    series.add_argument("--quantity", default="loss", help="language models: loss (per sequence), token-loss, "
                        "next-logprob; classifiers: logits, true-logit, logprob, loss, margin (default %(default)s)")
    series.add_argument("--quadrature", default=SERIES_QUADRATURE, help="adaptive:N (Gauss rules up to N nodes per "
                        "interval and input, as each needs), gauss:N or midpoint:N (default %(default)s)")
    series.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    series.add_argument("--rtol", type=float, default=None,
                        help="error budget per interval and input, relative to its change; float32 units that "
                        "cannot meet it are recomputed in float64 (default: every interval to round-off)")
    series.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    series.add_argument("--json", action="store_true", help="print one JSON object")
    parallel_arguments(series)

    from engine.analysis.prune import add_arguments as prune_arguments

    prune_arguments(sub.add_parser("prune", help=COMMANDS["prune"][1]))

    from engine.analysis.progress import add_arguments as progress_arguments

    progress_arguments(sub.add_parser("progress", help=COMMANDS["progress"][1]))

    info = sub.add_parser("info", help=COMMANDS["info"][1])
    info.add_argument("path", help="run database (.duckdb)")
    info.add_argument("--json", action="store_true", help="print one JSON object")

    from engine.importers.explaind import add_arguments as import_arguments

    import_arguments(sub.add_parser("import-explaind", help=COMMANDS["import-explaind"][1]))

    from engine.samples import SAMPLES

    sample = sub.add_parser("sample", help=COMMANDS["sample"][1])
    sample.add_argument("name", choices=sorted(SAMPLES), help="which sample run")
    sample.add_argument("--out", default="sample_runs", help="folder of the published database (default %(default)s)")
    sample.add_argument("--work", default="runs", help="folder of the recorded run directory, replaced when it is "
                        "one (default %(default)s)")
    parallel_arguments(sample)
    sample.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


# ---------------------------------------------------------------------------- output
def _finite(value: Any) -> Any:
    """``value`` with every float that is not finite replaced by None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _human(result: dict[str, Any]) -> str:
    lines = []
    for key, value in result.items():
        if isinstance(value, dict):
            lines.append(f"{key}:")
            lines += [f"  {k}: {v}" for k, v in value.items()]
        else:
            lines.append(f"{key}: {value}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- signals
class _Signals:
    """SIGINT and SIGTERM raise KeyboardInterrupt once and remember which signal came.

    Libraries may turn the KeyboardInterrupt into an error of their own (DuckDB raises
    "Query interrupted"); what counts is that a signal arrived. Later signals are ignored
    while the command cleans up. Handlers are installed only in the main thread.
    """

    CAUGHT = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.CAUGHT:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
            raise KeyboardInterrupt


def _quiet_stdout() -> None:
    """After a broken pipe: send what is left of stdout to /dev/null so that exit does not complain."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def _signal_of(exc: BaseException, signals: _Signals) -> int | None:
    """The signal that stopped the command, or None when ``exc`` is an error of its own."""
    if signals.received is not None:
        return signals.received
    if isinstance(exc, KeyboardInterrupt):  # from a handler of the engine's own (explain defers the first Ctrl-C)
        return signal.SIGINT
    return getattr(exc, "signum", None)     # an error that stands for a signal (ExplainInterrupted)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (0, 2 for an error, 128 + N after signal N)."""
    with _Signals() as signals:
        args: argparse.Namespace | None = None
        before: tuple[int, int] | None = None
        try:
            from engine.decompose.heap import retained_heap

            args = build_parser().parse_args(argv)
            if signals.received is not None:  # its KeyboardInterrupt was swallowed by a module while importing
                raise KeyboardInterrupt
            logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
            if args.command in _DATABASE_OUT:
                before = _state(_DATABASE_OUT[args.command](args))
            handler = COMMANDS[args.command][0]
            # with --json stdout carries the one JSON object: what libraries print while the command
            # runs (Ray's notes on a worker that died) goes to stderr
            keep_stdout = contextlib.redirect_stdout(sys.stderr) if getattr(args, "json", False) \
                else contextlib.nullcontext()
            with retained_heap(), keep_stdout:  # the heap from the start: later, it is already fragmented
                result = handler(args)
            if getattr(args, "json", False):
                text = json.dumps(_finite(result), default=str, allow_nan=False)
            else:
                text = _human(result)
            print(text, flush=True)
        except BrokenPipeError:
            if signals.received is None:
                _quiet_stdout()
                return 128 + signal.SIGPIPE
            raise
        except BaseException as exc:
            received = _signal_of(exc, signals)
            if received is None:
                if isinstance(exc, ExplaindError):
                    print(f"error: {exc}", file=sys.stderr)
                    return 2
                raise
            name = signal.Signals(received).name
            print(f"interrupted by {name}: {_left_behind(args, before)}", file=sys.stderr)
            return 128 + received
    return 0
