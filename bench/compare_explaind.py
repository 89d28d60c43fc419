"""Side-by-side benchmark against the published ``explaind`` package (0.1.0) on modular addition.

Usage::

    .venv/bin/python bench/compare_explaind.py                 # all sizes, writes bench/results/compare_explaind.md
    .venv/bin/python bench/compare_explaind.py --only S-adamw  # one configuration

For every configuration the script

1. trains the package's ``SingleLayerTransformerClassifier`` with its wrappers
   (``ModelPath``, ``AdamWOptimizerPath`` / ``SGDOptimizerPath``, ``DataPath``) as its README
   shows, saving the three checkpoint files and the CSV dataset, and cuts the files to the
   first ``explain`` steps (a complete run in the package's format: the package needs
   about 0.3 s per test example and quadrature node, too slow for whole runs here);
2. computes the package's EPK predictions of the validation examples on that run as its
   README does (``ExactPathKernelModel`` with ``integral_eps=0.01``,
   ``keep_param_wise_kernel=True``, ``param_wise_kernel_keep_out_dims=True``,
   ``keep_kernel_matrices=True``, test batches of 100) with ``early_steps=0``, so that every
   step uses the same 100 midpoint nodes (the package's default integrates the first four
   steps with 1000 nodes);
3. imports the full run and the cut run (``engine.importers.explaind``, which replays every
   update) and explains the same validation examples and all outputs of the cut run with
   ``engine.decompose.explain``: the components view at ``midpoint:100`` and at the
   default ``adaptive`` quadrature, and the per-element importance view at ``adaptive``
   (element granularity like the package's parameter-wise kernel; stopped after
   ``ELEMENT_TIMEOUT`` seconds), all at the package's granularity (``decay_split=False``:
   its kernel does not split off weight decay); the whole imported run at ``adaptive``
   with and without our weight-decay split.

Every measured computation runs in its own process with one thread (``OMP_NUM_THREADS=1``
and ``torch.set_num_threads(1)``) and the same glibc heap setting for both sides
(``same_heap``: what ``engine.decompose.heap.retained_heap`` sets, from process start): wall time of
the computation, peak resident memory of the process, and the increase of resident memory
over the process before computing.
The package runs in its own virtual environment (created on first use, see
``ensure_venv``); our side imports the package's model class from that environment's
package folder, put on ``PYTHONPATH`` alone.

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
VENV = Path(os.environ.get("EXPLAIND_BENCH_VENV", "/work/bench-venv"))
OURS_PYTHON = ROOT / ".venv" / "bin" / "python"
RESULTS = ROOT / "bench" / "results" / "compare_explaind.md"
MODEL = "explaind.modulo_model.model:SingleLayerTransformerClassifier"

# name: trained steps, training examples, test (validation) examples, batch size, optimizer, and the
# number of leading steps both sides explain (the package needs ~0.3 s per test example and node).
CONFIGS: dict[str, dict[str, Any]] = {
    "S-adamw": {"steps": 50, "n_train": 100, "n_test": 10, "batch": 50, "optimizer": "adamw", "explain": 3},
    "S-sgd": {"steps": 50, "n_train": 100, "n_test": 10, "batch": 50, "optimizer": "sgd", "explain": 3},
    "L-adamw": {"steps": 500, "n_train": 2000, "n_test": 10, "batch": 200, "optimizer": "adamw", "explain": 2},
    "T-adamw": {"steps": 50, "n_train": 1000, "n_test": 30, "batch": 100, "optimizer": "adamw", "explain": 1},
}
MODEL_SIZE = {"p": 113, "d_model": 32, "nhead": 4, "dim_mlp": 128}
ADAMW = {"lr": 1e-3, "betas": (0.9, 0.98), "weight_decay": 1.0}
SGD = {"lr": 0.01, "momentum": 0.9, "dampening": 0.0, "weight_decay": 1e-3}
SEED = 0
ELEMENT_TIMEOUT = 90.0   # seconds allowed for our element-granularity (importance) run per configuration


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
def model_kwargs() -> dict[str, Any]:
    m = MODEL_SIZE
    return {
        "n_token": m["p"] + 2,
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
        num_samples=cfg["n_train"], val_num_samples=cfg["n_test"], test_num_samples=0, P=MODEL_SIZE["p"]
    )
    train, val, _ = gen.generate_data()
    (directory / "dataset").mkdir(parents=True, exist_ok=True)
    write_csv(directory / "dataset" / "train.csv", *train)
    write_csv(directory / "dataset" / "val.csv", *val)
    loader = torch.utils.data.DataLoader(ClassificationDataset(*train), batch_size=cfg["batch"], shuffle=True)

    model = ModelPath(
        SingleLayerTransformerClassifier(**model_kwargs()),
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
            SingleLayerTransformerClassifier(**model_kwargs()),
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
        run = import_explaind(source, MODEL, model_kwargs(), out=source / "run", optimizer=opt, overwrite=True,
                              progress=False)
        manifest = _json.loads((run / "manifest.json").read_text())
        result[key] = {"seconds": time.perf_counter() - start, "replay": manifest["import"]["replay"],
                       "data_axis_reason": manifest["optimizer"].get("data_axis_reason")}
    return result


def role_ours(directory: Path, cfg: dict[str, Any], quadrature: str, views: tuple[str, ...],
              whole: bool = False, decay_split: bool = False) -> dict[str, Any]:
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
                "residual": float(np.abs(recon - true).max()), "mean_nodes": summary["mean_nodes"]}
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
    for key, quadrature, views, timeout, flags in (
        ("mid", "midpoint:100", "components", None, ()),
        ("adaptive", "adaptive", "components", None, ()),
        ("whole", "adaptive", "components", None, ("--whole",)),
        ("whole_split", "adaptive", "components", None, ("--whole", "--decay-split")),
        ("elements", "adaptive", "components,importance", ELEMENT_TIMEOUT, ()),
    ):
        row[key] = worker(OURS_PYTHON, "ours", directory, name, ours_path, "--quadrature", quadrature,
                          "--views", views, *flags, timeout=timeout)
        print(f"  {name}: ours {key} {row[key].get('seconds', row[key].get('timeout'))} s", flush=True)
    return row


def fmt(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}e}" if value and (abs(value) < 1e-2 or abs(value) >= 1e4) else f"{value:.{digits}f}"


def write_table(rows: list[dict[str, Any]], total: float) -> str:
    m = MODEL_SIZE
    lines = [
        "# ExPLAIND Studio vs the published explaind 0.1.0 — modular addition",
        "",
        "Generated by `.venv/bin/python bench/compare_explaind.py`: one CPU thread for both sides "
        "(`OMP_NUM_THREADS=1`, `torch.set_num_threads(1)`) and the same glibc heap setting (`engine.decompose.heap`'s "
        "thresholds from process start), every computation in its own process, on a "
        "shared 2-core machine: the same computation varies by up to about 25 % in time between runs, "
        "so a ratio near a target carries that uncertainty.",
        "",
        f"Model: the package's `SingleLayerTransformerClassifier` (p = {m['p']}, {m['p'] + 2} tokens and outputs, "
        f"d_model {m['d_model']}, {m['nhead']} heads, MLP {m['dim_mlp']}), trained with the package's wrappers "
        f"for the listed steps; AdamW lr {ADAMW['lr']}, betas {ADAMW['betas']}, weight decay "
        f"{ADAMW['weight_decay']}; SGD lr {SGD['lr']}, momentum {SGD['momentum']}, weight decay "
        f"{SGD['weight_decay']} (`buffer_float16=False`: the package's float16 momentum buffers would cost it "
        "accuracy). Explained: every validation example, all outputs (the model's log-probabilities).",
        "",
        "The package needs about 0.3 s per test example and quadrature node on this machine (one reverse pass "
        "per output, 100 nodes per step) and more under load, so whole runs are out of reach (10 test examples × "
        "50 steps ≈ 30–60 min). Both sides therefore explain the same leading steps of each run (`explained`), "
        "which form a complete run in the package's format (its three files cut to those steps). "
        "`theirs full (extrap.)` scales the measured time to all trained steps (its cost per step is constant). "
        "The replay error is our import's check over all trained steps.",
        "",
        "- **theirs**: `ExactPathKernelModel.predict` as in the package README (integral_eps 0.01 → 100 midpoint "
        "nodes, `keep_param_wise_kernel=True`, `param_wise_kernel_keep_out_dims=True`, "
        "`keep_kernel_matrices=True`, test batches of 100), with `early_steps=0` so every step uses 100 nodes "
        "(the default integrates the first four steps with 1000).",
        "- **ours mid-100 / default**: `explain(quadrature='midpoint:100' / 'adaptive', views=components, "
        "decay_split=False)` — per step, test example, output and parameter tensor, the package's granularity "
        "(its kernel does not split off weight decay; ours would cost a second forward-mode direction per tensor "
        "and the optimizer-residual measurement). **elements**: adaptive with the per-element importance "
        f"view added (element granularity like the package's parameter-wise kernel), stopped after "
        f"{ELEMENT_TIMEOUT:.0f} s.",
        "- **ours all steps**: the default on the whole imported run (every trained step), against the package's "
        "extrapolated time for the same steps: the speed-up at equal work, without our fixed cost of opening a "
        "run dominating a few steps. **+ decay split**: the same with our default `decay_split=True` (each "
        "tensor's weight-decay share and the optimizer residual as well).",
        "- time: the computation only (the package's files already loaded; ours includes opening the run). "
        "Peak: peak resident memory of the process in MiB, in brackets its growth during the computation.",
        "- |Δ pred|: max over tests × outputs of |theirs − ours| reconstructed predictions at the end of the "
        "explained steps. Residual: max |reconstructed − true| prediction of each side.",
        "",
        "| run | trained steps | train | test | opt | explained | theirs s | theirs full (extrap.) s | "
        "ours mid-100 s | ours default s | speed-up mid / default | ours elements s | peak MiB theirs | "
        "peak MiB ours mid / default | \\|Δ pred\\| mid | \\|Δ pred\\| default | residual theirs | "
        "residual mid | residual default | nodes/step default | ours all steps s | speed-up all steps | "
        "residual all steps | ours all steps + decay split s | speed-up + decay split | replay error |",
        "|" + "---|" * 26,
    ]
    for r in rows:
        t, mid, ada, el = r["theirs"], r["mid"], r["adaptive"], r["elements"]
        whole, split = r["whole"], r["whole_split"]

        def peak(x: dict) -> str:
            return f"{x['peak_mib']:.0f} (+{x['peak_mib'] - x['rss_before_mib']:.0f})"

        elements = f"> {el['timeout']:.0f}" if "timeout" in el else f"{el['seconds']:.1f}"
        extrap = t["seconds"] / r["explain"] * r["steps"]
        lines.append(
            f"| {r['name']} | {r['steps']} | {r['n_train']} | {r['n_test']} | {r['optimizer']} | {r['explain']} | "
            f"{t['seconds']:.1f} | {extrap:.0f} | {mid['seconds']:.2f} | {ada['seconds']:.2f} | "
            f"{t['seconds'] / mid['seconds']:.1f}× / {t['seconds'] / ada['seconds']:.1f}× | {elements} | "
            f"{peak(t)} | {peak(mid)} / {peak(ada)} | "
            f"{fmt(mid['max_abs_diff_vs_theirs'])} | {fmt(ada['max_abs_diff_vs_theirs'])} | "
            f"{fmt(mid['their_residual'])} | {fmt(mid['residual'])} | {fmt(ada['residual'])} | "
            f"{ada['mean_nodes']:.1f} | {whole['seconds']:.1f} | {extrap / whole['seconds']:.0f}× | "
            f"{fmt(whole['residual'])} | {split['seconds']:.1f} | {extrap / split['seconds']:.0f}× | "
            f"{fmt(r['import']['full']['replay']['max_rel_error'])} |"
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
                               args.decay_split)
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
