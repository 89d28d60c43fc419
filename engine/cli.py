"""Command line: ``python -m engine {train,verify,explain,progress,info,prune} ...``.

Every command prints a human summary, or one JSON object with ``--json``. Errors the
user can fix are printed as one ``error:`` line (exit status 2), never as a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, get_args, get_type_hints

import polars as pl

from engine.decompose.heap import retained_heap
from engine.errors import BadInputError, ExplaindError

Handler = Callable[[argparse.Namespace], dict[str, Any]]


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
        else:  # tuples such as betas: comma-separated numbers
            parser.add_argument(flag, dest=field.name, type=_parse_floats, default=None,
                                help=f"comma-separated (default {','.join(map(str, default))})")


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parse_ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from exc


def _parse_floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc


# ---------------------------------------------------------------------------- commands
def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    from engine.tasks import TASKS, train_task

    task_cls = TASKS[args.task]
    preset = dict(task_cls.presets[args.preset]) if args.preset else {}
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(task_cls.config_cls)
                 if getattr(args, f.name) is not None}
    out = train_task(args.task, Path(args.out), {**preset, **overrides}, progress=not args.json,
                     overwrite=args.overwrite)
    from engine.run.history import History

    history = History.open(out)
    metrics = history.metrics()
    last = metrics.tail(1).to_dicts()[0] if metrics.height else {}
    return {"run": str(out), "task": args.task, "steps": history.num_steps, "final": last}


def cmd_verify(args: argparse.Namespace) -> dict[str, Any]:
    from engine.run.verify import verify

    report = verify(args.run, allow_incomplete=args.allow_incomplete, progress=not args.json)
    return report.to_json()


def cmd_explain(args: argparse.Namespace) -> dict[str, Any]:
    from engine.decompose import ExplainConfig, parse_test
    from engine.model.outputs import imported_quantity
    from engine.parallel import explain_all, from_arguments, remove_shards
    from engine.run.history import History
    from engine.store import validate_run_name, write_run
    from engine.tasks import get_task

    out = Path(args.out)
    validate_run_name(out.stem)
    # an import path on the command line is the user's own choice of code to run
    quantity = imported_quantity(args.quantity) if ":" in args.quantity else args.quantity
    history = History.open(args.run, allow_incomplete=args.allow_incomplete)
    task = get_task(history.model_spec)
    if _split(args.exactness) and task.dataset("train").regression:
        raise BadInputError(f"--exactness compares predicted classes (agreement, KL); {history.path} has "
                            "floating-point targets")
    common = {**parse_test(args.test), "dtype": args.dtype, "device": args.device, "subsample": args.subsample}
    config = ExplainConfig(**common, quantity=quantity, quadrature=args.quadrature, views=args.views,
                           window=args.window, rtol=args.rtol, decay_split=not args.no_decay_split,
                           partitions=(*_split(args.partitions), *_partition_specs(args.partition_spec)))
    # prediction-level exactness (agreement, KL) needs every logit reconstructed
    checks = [ExplainConfig(**common, quantity="logits", quadrature=q, views=()) for q in _split(args.exactness)]
    shards = out.with_name(out.name + ".shards")
    (explanation, *checked), parallel = explain_all(history, task, [config, *checks], from_arguments(args), shards,
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
    from engine.decompose.checkpoints import checkpoint_config, explain_checkpoints
    from engine.run.series import SeriesSource, open_series
    from engine.store import validate_run_name

    out = Path(args.out)
    validate_run_name(out.stem)
    opened = open_series(SeriesSource(tuple(args.source), args.inputs, args.model, args.steps, args.tokenizer,
                                      args.max_inputs))
    config = checkpoint_config(opened, args.quantity, quadrature=args.quadrature, dtype=args.dtype, rtol=args.rtol,
                               device=args.device)
    summary = explain_checkpoints(opened, config, out, progress=not args.json).summary()
    return {**summary, "out": str(out)}


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


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


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
        task.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
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
    explain.add_argument("--allow-incomplete", action="store_true", help="explain the steps of an unfinished run")
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
    series.add_argument("--steps", type=_parse_ints, default=None, help="training step of each checkpoint, "
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
    sample.add_argument("--work", default="runs", help="folder of the recorded run directory (default %(default)s)")
    parallel_arguments(sample)
    sample.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _print_human(result: dict[str, Any]) -> None:
    for key, value in result.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k}: {v}")
        else:
            print(f"{key}: {value}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    handler, _ = COMMANDS[args.command]
    try:
        with retained_heap():  # from the start of the command: later, the heap is already fragmented
            result = handler(args)
    except ExplaindError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was published", file=sys.stderr)
        return 130
    if getattr(args, "json", False):
        print(json.dumps(result, default=str))
    else:
        _print_human(result)
    return 0

