"""Side-by-side benchmark against the published ``explaind`` package (0.1.0) on modular addition.

Usage::

    .venv/bin/python bench/compare_explaind.py                        # the grid → bench/results/compare_explaind.md
    .venv/bin/python bench/compare_explaind.py --only p23-sgd-200x20  # one configuration

The grid (``CONFIGS``): outputs few and many (p = 23 and 113: 25 and 115 tokens), AdamW and SGD
with momentum, 200 or 20 training examples, 10–40 test examples, 50 trained steps. For every
configuration the script

1. trains the package's ``SingleLayerTransformerClassifier`` with its wrappers
   (``ModelPath``, ``AdamWOptimizerPath`` / ``SGDOptimizerPath``, ``DataPath``) as its README
   shows, saving the three checkpoint files and the CSV dataset, and cuts the files to the
   first ``explain`` step (a complete run in the package's format: the package needs
   0.07–0.3 s per test example and quadrature node, too slow for whole runs here);
2. computes the package's EPK predictions of the validation examples on that run as its
   README does (``ExactPathKernelModel`` with ``integral_eps=0.01``,
   ``keep_param_wise_kernel=True``, ``param_wise_kernel_keep_out_dims=True``,
   ``keep_kernel_matrices=True``, test batches of 100) with ``early_steps=0``, so that every
   step uses the same 100 midpoint nodes (the package's default integrates the first four
   steps with 1000 nodes); its time per step, times the trained steps, is its whole run;
3. imports the full run and the cut run (``engine.importers.explaind``, which replays every
   update) and explains the same validation examples and all outputs with
   ``engine.decompose.explain``, components view: the cut run at the adaptive rule (to compare
   predictions), and every trained step at parity (``midpoint:100``, ``decay_split=False``:
   the package's rule and granularity), headline (adaptive, ``decay_split=False``) and default
   (adaptive with the decay split).

Every measured computation runs in its own process with one thread (``OMP_NUM_THREADS=1``
and ``torch.set_num_threads(1)``) and the same glibc heap setting for both sides
(``same_heap``: what ``engine.decompose.heap.retained_heap`` sets, from process start): wall time of
the computation, peak resident memory of the process, and the increase of resident memory
over the process before computing.
The package runs in its own virtual environment (``.venv-explaind``, or
``$EXPLAIND_BENCH_VENV``; created on first use by ``ensure_venv``); our side imports the
package's model class from that environment's package folder, put on ``PYTHONPATH`` alone.

Worker roles (internal): ``--role train|theirs|import|ours`` with ``--dir``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("EXPLAIND_BENCH_VENV", ROOT / ".venv-explaind"))  # the package's own environment
OURS_PYTHON = ROOT / ".venv" / "bin" / "python"
RESULTS = ROOT / "bench" / "results" / "compare_explaind.md"
MODEL = "explaind.modulo_model.model:SingleLayerTransformerClassifier"

# The grid: outputs (p + 2 tokens: few and many), optimizer (AdamW, SGD with momentum), training set
# size and test examples. name: modulus, trained steps, training examples, test (validation)
# examples, batch size, optimizer; the package explains the first step only (its cost per step is
# constant: ~0.07 s per test example and node at 25 outputs, ~0.3 s at 115).
CONFIGS: dict[str, dict[str, Any]] = {
    f"p{p}-{opt}-{train}x{test}": {"p": p, "steps": 50, "n_train": train, "n_test": test,
                                   "batch": min(train, 100), "optimizer": opt, "explain": 1}
    for p, train, test in ((23, 200, 20), (23, 20, 40), (113, 200, 10))
    for opt in ("adamw", "sgd")
}
MODEL_SIZE = {"d_model": 32, "nhead": 4, "dim_mlp": 128}
ADAMW = {"lr": 1e-3, "betas": (0.9, 0.98), "weight_decay": 1.0}
SGD = {"lr": 0.01, "momentum": 0.9, "dampening": 0.0, "weight_decay": 1e-3}
SEED = 0
LEAN_BLOCK = 8  # steps per vectorised block of the default's leaner variant (`explain --block`)


def one_thread() -> None:
    import torch

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ============================================================================ package side
def model_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    m = MODEL_SIZE
    return {
        "n_token": cfg["p"] + 2,
        "d_model": m["d_model"],
        "nhead": m["nhead"],
        "dim_mlp": m["dim_mlp"],
        "dropout": 0.0,
    }


def write_csv(path: Path, rows: list, targets) -> None:
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["a", "add", "b", "eq", "target"])
        for row, target in zip(rows, targets, strict=True):
            out.writerow([int(v) for v in row] + [int(target)])


def role_train(directory: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """Train with the package's wrappers as its README shows; save checkpoints and the CSV dataset."""
    import numpy as np
    import torch
    from explaind.data_paths import DataPath
    from explaind.model_paths import ModelPath
    from explaind.modulo_model.data import ClassificationDataset, ModulusDataGenerator
    from explaind.modulo_model.loss import RegularizedCrossEntropyLoss
    from explaind.modulo_model.model import SingleLayerTransformerClassifier
    from explaind.optimizer_paths import AdamWOptimizerPath, SGDOptimizerPath

    np.random.seed(SEED)
    torch.manual_seed(SEED)
    gen = ModulusDataGenerator(
        num_samples=cfg["n_train"], val_num_samples=cfg["n_test"], test_num_samples=0, P=cfg["p"]
    )
    train, val, _ = gen.generate_data()
    (directory / "dataset").mkdir(parents=True, exist_ok=True)
    write_csv(directory / "dataset" / "train.csv", *train)
    write_csv(directory / "dataset" / "val.csv", *val)
    loader = torch.utils.data.DataLoader(ClassificationDataset(*train), batch_size=cfg["batch"], shuffle=True)

    model = ModelPath(
        SingleLayerTransformerClassifier(**model_kwargs(cfg)),
        output_dim=cfg["p"] + 2,  # the package's default is p = 113's 115
        device="cpu",
        checkpoint_path=str(directory / "model_checkpoint.pt"),
        overwrite=True,
    )
    if cfg["optimizer"] == "adamw":
        optimizer = AdamWOptimizerPath(
            model,
            lr=ADAMW["lr"],
            betas=ADAMW["betas"],
            weight_decay=ADAMW["weight_decay"],
            checkpoints=[],
            checkpoint_path=str(directory / "optimizer_checkpoint.pt"),
            overwrite=True,
            device="cpu",
        )
    else:
        optimizer = SGDOptimizerPath(
            model,
            lr=SGD["lr"],
            momentum=SGD["momentum"],
            dampening=SGD["dampening"],
            weight_decay=SGD["weight_decay"],
            checkpoints=[],
            checkpoint_path=str(directory / "optimizer_checkpoint.pt"),
            overwrite=True,
            device="cpu",
            buffer_float16=False,
        )
    data_path = DataPath(
        loader, checkpoint_path=str(directory / "data_checkpoint.pt"), overwrite=True, full_batch=False
    )
    loss_fn = RegularizedCrossEntropyLoss(alpha=0.0, device="cpu")
    step = 0
    start = time.perf_counter()
    while step < cfg["steps"]:
        for batch in data_path.dataloader:
            x, y = data_path.get_batch(batch)
            optimizer.zero_grad()
            loss, _ = loss_fn(model.forward(x), y, params=model.parameters(), output_reg=True)
            loss.backward()
            optimizer.step()
            model.log_checkpoint()
            optimizer.log_checkpoint()
            step += 1
            if step == cfg["steps"]:
                break
    seconds = time.perf_counter() - start
    optimizer.save_checkpoints()
    model.save_checkpoints()
    data_path.save_checkpoints()
    prefix = directory / "prefix"  # the first `explain` steps: itself a complete run in the package's format
    prefix.mkdir()
    k = cfg["explain"]
    torch.save(model.checkpoints[: k + 1], prefix / "model_checkpoint.pt")
    torch.save(optimizer.checkpoints[: k + 1], prefix / "optimizer_checkpoint.pt")
    torch.save(data_path.checkpoints[:k], prefix / "data_checkpoint.pt")
    shutil.copytree(directory / "dataset", prefix / "dataset")
    return {"train_seconds": seconds, "final_loss": float(loss)}


def role_theirs(directory: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """The package's EPK predictions of the validation set (README settings, 100 midpoint nodes everywhere)."""
    import contextlib

    import numpy as np
    import torch
    from explaind.data_paths import DataPath
    from explaind.epk_model import ExactPathKernelModel
    from explaind.model_paths import ModelPath
    from explaind.modulo_model.data import ClassificationDataset
    from explaind.modulo_model.loss import RegularizedCrossEntropyLoss
    from explaind.modulo_model.model import SingleLayerTransformerClassifier
    from explaind.optimizer_paths import AdamWOptimizerPath, SGDOptimizerPath

    def read(split: str) -> ClassificationDataset:
        rows = list(csv.DictReader((directory / "dataset" / f"{split}.csv").open()))
        data = [tuple(int(r[k]) for k in ("a", "add", "b", "eq")) for r in rows]
        return ClassificationDataset(data, np.array([int(r["target"]) for r in rows]))

    with contextlib.redirect_stdout(open(os.devnull, "w")):  # the package prints per step
        train_set, val_set = read("train"), read("val")
        loader = torch.utils.data.DataLoader(train_set, batch_size=cfg["batch"], shuffle=False)
        model = ModelPath(
            SingleLayerTransformerClassifier(**model_kwargs(cfg)),
            output_dim=cfg["p"] + 2,
            device="cpu",
            checkpoint_path=str(directory / "model_checkpoint.pt"),
        )
        path = str(directory / "optimizer_checkpoint.pt")
        if cfg["optimizer"] == "adamw":
            optimizer = AdamWOptimizerPath(
                model,
                lr=ADAMW["lr"],
                betas=ADAMW["betas"],
                weight_decay=ADAMW["weight_decay"],
                checkpoints=[],
                checkpoint_path=path,
                device="cpu",
            )
        else:
            optimizer = SGDOptimizerPath(
                model,
                lr=SGD["lr"],
                momentum=SGD["momentum"],
                dampening=SGD["dampening"],
                weight_decay=SGD["weight_decay"],
                checkpoints=[],
                checkpoint_path=path,
                device="cpu",
                buffer_float16=False,
            )
        data_path = DataPath(loader, checkpoint_path=str(directory / "data_checkpoint.pt"), full_batch=False)
        epk = ExactPathKernelModel(
            model=model,
            optimizer=optimizer,
            loss_fn=RegularizedCrossEntropyLoss(alpha=0.0),
            data_path=data_path,
            integral_eps=0.01,
            evaluate_predictions=True,
            keep_param_wise_kernel=True,
            param_wise_kernel_keep_out_dims=True,
            device="cpu",
            early_steps=0,
        )
        val_loader = torch.utils.data.DataLoader(val_set, batch_size=100, shuffle=False)
        before = rss_mib()
        start = time.perf_counter()
        reconstructed, true_final = [], []
        for x, y in val_loader:
            pred = epk.predict(x, y_test=y, keep_kernel_matrices=True)
            reconstructed.append(pred[0].detach())
        seconds = time.perf_counter() - start
        peak = peak_mib()
        for x, _ in val_loader:
            with torch.no_grad():
                true_final.append(model.forward(x, step=len(model.checkpoints) - 1).detach())
    torch.save(
        {"reconstructed": torch.cat(reconstructed), "true_final": torch.cat(true_final)}, directory / "theirs.pt"
    )
    return {"seconds": seconds, "peak_mib": peak, "rss_before_mib": before}


# ============================================================================ our side
def role_import(directory: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    import json as _json

    from engine.importers.explaind import ExplaindOptimizer, import_explaind

    opt = (
        ExplaindOptimizer(lr=ADAMW["lr"], weight_decay=ADAMW["weight_decay"], betas=ADAMW["betas"])
        if cfg["optimizer"] == "adamw"
        else ExplaindOptimizer(momentum=SGD["momentum"], dampening=SGD["dampening"])
    )
    result = {}
    for key, source in (("full", directory), ("prefix", directory / "prefix")):
        start = time.perf_counter()
        run = import_explaind(source, MODEL, model_kwargs(cfg), out=source / "run", optimizer=opt, overwrite=True,
                              progress=False)
        manifest = _json.loads((run / "manifest.json").read_text())
        result[key] = {"seconds": time.perf_counter() - start, "replay": manifest["import"]["replay"],
                       "data_axis_reason": manifest["optimizer"].get("data_axis_reason")}
    return result


def role_ours(directory: Path, cfg: dict[str, Any], quadrature: str, views: tuple[str, ...],
              whole: bool = False, decay_split: bool = False, engine: str = "auto",
              block: int | None = None) -> dict[str, Any]:
    import numpy as np
    import torch

    from engine.decompose import ExplainConfig, explain

    config = ExplainConfig(
        test_split="val",
        test_size=None,
        quantity="logits",
        quadrature=quadrature,
        views=views,
        device="cpu",
        dtype="float32",
        decay_split=decay_split,
        engine=engine,
        block=block,
    )
    before = rss_mib()
    start = time.perf_counter()
    # the run was imported here with the model this script names: its code is trusted
    result = explain(directory / ("run" if whole else "prefix/run"), config, progress=False, trust_run=True)
    seconds = time.perf_counter() - start
    peak = peak_mib()
    frame = result.predictions.sort(["test", "output"])
    tests = frame["test"].n_unique()
    recon = frame["reconstructed_final"].to_numpy().reshape(tests, -1)
    true = frame["true_final"].to_numpy().reshape(tests, -1)
    summary = result.summary()
    if whole:  # every trained step: no package result to compare with
        return {"seconds": seconds, "peak_mib": peak, "rss_before_mib": before,
                "residual": float(np.abs(recon - true).max()), "mean_nodes": summary["mean_nodes"],
                "max_rel_residual": summary["max_rel_residual"], "engine": summary["engine"]}
    theirs = torch.load(directory / "prefix" / "theirs.pt")
    their_recon = theirs["reconstructed"].double().numpy()
    their_true = theirs["true_final"].double().numpy()
    return {
        "seconds": seconds,
        "peak_mib": peak,
        "rss_before_mib": before,
        "max_abs_diff_vs_theirs": float(np.abs(recon - their_recon).max()),
        "residual": float(np.abs(recon - true).max()),
        "their_residual": float(np.abs(their_recon - their_true).max()),
        "true_final_diff": float(np.abs(true - their_true).max()),
        "mean_nodes": summary["mean_nodes"],
        "gradient_evaluations": summary["gradient_evaluations"],
        "max_rel_residual": summary["max_rel_residual"],
    }


# ============================================================================ orchestration
def ensure_venv() -> Path:
    """The package's virtual environment: torch 2.13 (as ours), numpy, tqdm and explaind 0.1.0."""
    python = VENV / "bin" / "python"
    probe = [str(python), "-c", "import explaind.epk_model"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(VENV / "bin" / "pip"), "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0", "tqdm", "numpy"], check=True)
    subprocess.run([*pip, "--no-deps", "--ignore-requires-python", "explaind==0.1.0"], check=True)
    subprocess.run(probe, check=True)
    return python


def package_dir(python: Path) -> Path:
    out = subprocess.run(
        [str(python), "-c", "import explaind, os; print(os.path.dirname(explaind.__file__))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(out.stdout.strip())


def same_heap() -> dict[str, str]:
    """glibc's environment form of what ``engine.decompose.heap.retained_heap`` sets, for every worker from
    its start: the package's processes get it too, so the comparison is of the implementations."""
    from engine.decompose import heap

    return {"MALLOC_MMAP_THRESHOLD_": str(heap.RETAINED_MMAP_THRESHOLD),
            "MALLOC_TRIM_THRESHOLD_": str(heap.RETAINED_TRIM_THRESHOLD)}


def worker(python: Path, role: str, directory: Path, name: str, pythonpath: str, *extra: str,
           timeout: float | None = None) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": pythonpath, **same_heap()}
    cmd = [str(python), str(Path(__file__).resolve()), "--role", role, "--dir", str(directory), "--only", name,
           *extra]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"timeout": timeout}
    if done.returncode != 0:
        raise RuntimeError(f"{role} for {name} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_config(name: str, cfg: dict[str, Any], theirs_python: Path, work: Path, shim: Path) -> dict[str, Any]:
    directory = work / name
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    ours_path = f"{ROOT}{os.pathsep}{shim}"
    row: dict[str, Any] = {"name": name, **cfg}
    row["train"] = worker(theirs_python, "train", directory, name, "")
    row["theirs"] = worker(theirs_python, "theirs", directory / "prefix", name, "")
    print(f"  {name}: package EPK {row['theirs']['seconds']:.1f} s", flush=True)
    row["import"] = worker(OURS_PYTHON, "import", directory, name, ours_path)
    for key, quadrature, flags in (
        ("agree", "adaptive", ()),                                 # the package's step: predictions compared
        ("parity", "midpoint:100", ("--whole",)),                   # its rule, its granularity
        ("headline", "adaptive", ("--whole",)),                     # our rule, its granularity
        ("default", "adaptive", ("--whole", "--decay-split")),      # our default: the decay split as well
        ("lean", "adaptive", ("--whole", "--decay-split", "--block", str(LEAN_BLOCK))),  # less memory
    ):
        row[key] = worker(OURS_PYTHON, "ours", directory, name, ours_path, "--quadrature", quadrature,
                          "--views", "components", *flags)
        print(f"  {name}: ours {key} {row[key]['seconds']:.1f} s", flush=True)
    return row


def fmt(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}e}" if value and (abs(value) < 1e-2 or abs(value) >= 1e4) else f"{value:.{digits}f}"


def write_table(rows: list[dict[str, Any]], total: float) -> str:
    m = MODEL_SIZE
    lines = [
        "# ExPLAIND Studio vs the published explaind 0.1.0 — modular addition, a grid",
        "",
        "Generated by `.venv/bin/python bench/compare_explaind.py`: one CPU thread for both sides "
        "(`OMP_NUM_THREADS=1`, `torch.set_num_threads(1)`) and the same glibc heap setting (`engine.decompose.heap`'s "
        "thresholds from process start), every computation in its own process, on a "
        "shared 2-core machine (ratios are taken within one run; the same computation varies by up to about "
        "25 % between runs).",
        "",
        f"Model: the package's `SingleLayerTransformerClassifier` (p + 2 tokens and outputs, d_model "
        f"{m['d_model']}, {m['nhead']} heads, MLP {m['dim_mlp']}), trained with the package's wrappers for "
        f"the listed steps; AdamW lr {ADAMW['lr']}, betas {ADAMW['betas']}, weight decay {ADAMW['weight_decay']}; "
        f"SGD lr {SGD['lr']}, momentum {SGD['momentum']}, weight decay {SGD['weight_decay']} "
        "(`buffer_float16=False`). Explained: every validation example, all outputs (log-probabilities).",
        "",
        "- **theirs**: `ExactPathKernelModel.predict` as in the package README (integral_eps 0.01 → 100 midpoint "
        "nodes, `keep_param_wise_kernel=True`, `param_wise_kernel_keep_out_dims=True`, "
        "`keep_kernel_matrices=True`, test batches of 100, `early_steps=0`) on the first step (its cost per "
        "step is constant: one reverse pass per output and node); **whole** scales it to every trained step.",
        "- **ours**, every trained step, components view: **parity** `midpoint:100` without the decay split "
        "(the package's rule and granularity), **headline** the adaptive rule without the decay split, "
        "**default** the adaptive rule with the decay split (each tensor's weight-decay share and the "
        "optimizer residual as well), **lean** the default in blocks of "
        f"{LEAN_BLOCK} steps (`--block {LEAN_BLOCK}`: smaller vectorised calls, less memory). Time includes opening "
        "the run.",
        "- Peak: peak resident memory of the process in MiB. Residual: our largest relative residual "
        "(`max_rel_residual`) at the default. |Δ pred|: max |theirs − ours| reconstructed prediction after "
        "the package's step (ours adaptive), beside the package's own residual there (max |reconstructed − true|): "
        "the two agree to within the package's quadrature error.",
        "",
        "| run | outputs | opt | train | test | steps | theirs s/step | theirs whole s (extrap.) | "
        "ours parity s | ours headline s | ours default s | ours lean s | "
        "speed-up parity / headline / default / lean | evaluation (default) | nodes/step (default) | "
        "peak MiB theirs / parity / default / lean | rel. residual default | \\|Δ pred\\| | residual theirs |",
        "|" + "---|" * 19,
    ]
    for r in rows:
        t, par, head, de, lean, ag = (r[key] for key in ("theirs", "parity", "headline", "default", "lean", "agree"))
        per_step = t["seconds"] / r["explain"]
        whole = per_step * r["steps"]
        lines.append(
            f"| {r['name']} | {r['p'] + 2} | {r['optimizer']} | {r['n_train']} | {r['n_test']} | {r['steps']} | "
            f"{per_step:.1f} | {whole:.0f} | {par['seconds']:.1f} | {head['seconds']:.1f} | {de['seconds']:.1f} | "
            f"{lean['seconds']:.1f} | {whole / par['seconds']:.0f}× / {whole / head['seconds']:.0f}× / "
            f"**{whole / de['seconds']:.0f}×** / {whole / lean['seconds']:.0f}× | "
            f"{de['engine']} | {de['mean_nodes']:.1f} | "
            f"{t['peak_mib']:.0f} / {par['peak_mib']:.0f} / {de['peak_mib']:.0f} / {lean['peak_mib']:.0f} | "
            f"{fmt(de['max_rel_residual'])} | {fmt(ag['max_abs_diff_vs_theirs'])} | {fmt(ag['their_residual'])} |"
        )
    lines += ["", f"Total benchmark wall time: {total / 60:.1f} min.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=sorted(CONFIGS), help="configurations to run")
    parser.add_argument("--role", choices=("train", "theirs", "import", "ours"), help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--quadrature", default="adaptive", help=argparse.SUPPRESS)
    parser.add_argument("--views", default="components,importance", help=argparse.SUPPRESS)
    parser.add_argument("--whole", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--decay-split", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--block", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS, help="markdown table to write")
    parser.add_argument("--work", type=Path, default=None, help="working directory (default: a temporary one)")
    args = parser.parse_args()
    if args.role:
        one_thread()
        cfg = CONFIGS[args.only[0]]
        if args.role == "train":
            result = role_train(args.dir, cfg)
        elif args.role == "theirs":
            result = role_theirs(args.dir, cfg)
        elif args.role == "import":
            result = role_import(args.dir, cfg)
        else:
            result = role_ours(args.dir, cfg, args.quadrature, tuple(args.views.split(",")), args.whole,
                               args.decay_split, args.engine, args.block)
        print(json.dumps(result))
        return

    theirs_python = ensure_venv()
    names = args.only or list(CONFIGS)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="compare-explaind-") as tmp:
        work = args.work or Path(tmp) / "work"
        shim = Path(tmp) / "shim"
        shim.mkdir()
        (shim / "explaind").symlink_to(package_dir(theirs_python))
        rows = []
        args.out.parent.mkdir(parents=True, exist_ok=True)
        for name in names:
            print(f"{name}: {CONFIGS[name]}", flush=True)
            rows.append(run_config(name, CONFIGS[name], theirs_python, work, shim))
            table = write_table(rows, time.perf_counter() - start)
            args.out.write_text(table)  # after every configuration, so an interrupted sweep keeps its rows
    print(table)


if __name__ == "__main__":
    main()
