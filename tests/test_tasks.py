"""Built-in tasks: deterministic data and models, specs, errors, recorded training."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, replace

import pytest
import torch
from sklearn.datasets import load_digits

from engine.errors import BadInputError
from engine.model.task import BUILTIN_TASKS, GREY_RAMP, Dataset, data_fingerprint
from engine.run.history import History
from engine.tasks import (
    TASKS,
    DigitsCNNConfig,
    DigitsCNNTask,
    ImportedTask,
    ModularAdditionConfig,
    ModularAdditionTask,
    digits_cnn,
    get_task,
    make_config,
    modular_addition,
    train_task,
)
from engine.tasks.common import deterministic_algorithms
from tests.helpers import tiny_spec

SMALL_MODULAR = ModularAdditionConfig(p=13, train_frac=0.5, d_model=16, n_heads=2, d_mlp=32, steps=20)
SMALL_DIGITS = DigitsCNNConfig(steps=20, batch_size=32, eval_every=5)


def rows(x: torch.Tensor) -> Counter:
    return Counter(bytes(r.contiguous().view(torch.uint8).numpy()) for r in x.reshape(x.shape[0], -1))


# ---------------------------------------------------------------------------- data
def test_modular_splits_are_deterministic_disjoint_and_complete():
    task = ModularAdditionTask(SMALL_MODULAR)
    train, val = task.dataset("train"), task.dataset("val")
    again = ModularAdditionTask(SMALL_MODULAR).dataset("train")
    assert torch.equal(train.inputs, again.inputs) and torch.equal(train.labels, again.labels)
    p = SMALL_MODULAR.p
    assert len(train) == round(SMALL_MODULAR.train_frac * p * p) and len(train) + len(val) == p * p
    pairs = [tuple(r[:2].tolist()) for r in torch.cat([train.inputs, val.inputs])]
    assert sorted(pairs) == [(a, b) for a in range(p) for b in range(p)]
    for data in (train, val):
        assert data.inputs.dtype == torch.int64 and data.inputs.shape[1] == 3
        assert torch.all(data.inputs[:, 2] == p)
        assert torch.equal(data.labels, (data.inputs[:, 0] + data.inputs[:, 1]) % p)
    other_seed = ModularAdditionTask(replace(SMALL_MODULAR, seed=1)).dataset("train")
    assert not torch.equal(train.inputs, other_seed.inputs)


def test_digits_splits_are_deterministic_disjoint_and_complete():
    task = DigitsCNNTask()
    train, val = task.dataset("train"), task.dataset("val")
    again = DigitsCNNTask().dataset("val")
    assert torch.equal(val.inputs, again.inputs) and torch.equal(val.labels, again.labels)
    digits = load_digits()
    assert len(train) + len(val) == len(digits.target)
    assert len(val) == round(DigitsCNNConfig().val_frac * len(digits.target))
    everything = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    assert rows(torch.cat([train.inputs, val.inputs])) == rows(everything)
    assert train.inputs.shape[1:] == (1, 8, 8) and float(train.inputs.min()) == 0.0
    assert float(train.inputs.max()) == 1.0
    assert sorted(Counter(train.labels.tolist())) == list(range(10))


def test_fingerprint_is_stable_and_matches_the_recorder():
    train = ModularAdditionTask(SMALL_MODULAR).dataset("train")
    val = ModularAdditionTask(SMALL_MODULAR).dataset("val")
    assert train.fingerprint() == ModularAdditionTask(SMALL_MODULAR).dataset("train").fingerprint()
    assert train.fingerprint() != val.fingerprint()
    assert train.fingerprint() == data_fingerprint(train.inputs, train.labels)
    assert len(train.fingerprint()) == 64


def test_render_modular_example():
    data = Dataset(inputs=torch.tensor([[37, 52, 97]]), labels=torch.tensor([89]), kind="modular", meta={"p": 97})
    assert data.render(0) == "37 + 52 = 89 (mod 97)"
    task_data = ModularAdditionTask(SMALL_MODULAR).dataset("val")
    a, b, _ = task_data.inputs[0].tolist()
    assert task_data.render(0) == f"{a} + {b} = {(a + b) % 13} (mod 13)"


def test_render_digit_image():
    image = torch.zeros(1, 1, 8, 8)
    image[0, 0, 2, :] = 1.0
    image[0, 0, 5, 3] = 0.5
    text = Dataset(inputs=image, labels=torch.tensor([3]), kind="digits").render(0)
    lines = text.split("\n")
    assert len(lines) == 9 and lines[-1] == "label 3"
    assert all(len(line) == 8 and set(line) <= set(GREY_RAMP) for line in lines[:8])
    assert lines[2] == "@" * 8 and lines[0] == " " * 8
    assert lines[5][3] not in (" ", "@")
    real = DigitsCNNTask().dataset("train")
    assert real.render(0).endswith(f"label {int(real.labels[0])}")


def test_dataset_rejects_bad_labels():
    with pytest.raises(BadInputError, match="int64 class ids or floating-point targets"):
        Dataset(inputs=torch.zeros(2, 3), labels=torch.zeros(2, dtype=torch.int32), kind="generic")
    with pytest.raises(BadInputError, match="int64 class ids"):
        Dataset(inputs=torch.zeros(2, 3), labels=torch.zeros(2, 2, dtype=torch.int64), kind="generic")
    assert Dataset(inputs=torch.zeros(2, 3), labels=torch.zeros(2), kind="generic").regression
    with pytest.raises(BadInputError, match="2 inputs but 3 labels"):
        Dataset(inputs=torch.zeros(2, 3), labels=torch.zeros(3, dtype=torch.int64), kind="generic")


# ---------------------------------------------------------------------------- models
@pytest.mark.parametrize(
    ("task", "classes", "layers"),
    [
        (ModularAdditionTask(SMALL_MODULAR), 13, {"embed", "pos_embed", "attn", "mlp", "unembed"}),
        (DigitsCNNTask(), 10, {"conv1", "conv2", "fc1", "fc2"}),
    ],
)
def test_model_shapes_losses_and_layers(task, classes, layers):
    model = task.build_model()
    data = task.dataset("val")
    out = model(data.inputs[:7])
    assert out.shape == (7, classes)
    losses = task.per_example_loss(out, data.labels[:7])
    assert losses.shape == (7,) and torch.all(losses > 0)
    names = [n for n, _ in model.named_parameters()]
    assert {task.layer_of(n) for n in names} == layers


def test_default_layer_is_the_top_level_module():
    task = get_task(tiny_spec())
    assert task.layer_of("hidden.weight") == "hidden"
    assert task.layer_of("blocks.3.attn.q.weight") == "blocks.3"
    assert task.layer_of("0.weight") == "0"
    assert task.layer_of("scale") == "scale"
    assert task.layer_of("transformer.h.1.attn.c_attn.weight") == "transformer.h.1"
    assert task.layer_of("transformer.wte.weight") == "transformer"


def test_attention_projections_are_separate_tensors():
    names = {n for n, _ in ModularAdditionTask(SMALL_MODULAR).build_model().named_parameters()}
    assert {"attn.q.weight", "attn.k.weight", "attn.v.weight", "attn.o.weight", "pos_embed.weight"} <= names


@pytest.mark.parametrize("task_cls", [ModularAdditionTask, DigitsCNNTask])
def test_build_model_is_seeded_and_leaves_global_rng_alone(task_cls):
    config = SMALL_MODULAR if task_cls is ModularAdditionTask else DigitsCNNConfig()
    state = torch.random.get_rng_state()
    first = task_cls(config).build_model().state_dict()
    assert torch.equal(torch.random.get_rng_state(), state)
    second = task_cls(config).build_model().state_dict()
    third = task_cls(replace(config, seed=5)).build_model().state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], third[k]) for k in first)


# ---------------------------------------------------------------------------- specs
@pytest.mark.parametrize("task", [ModularAdditionTask(SMALL_MODULAR), DigitsCNNTask(SMALL_DIGITS)])
def test_spec_round_trips_through_json(task):
    spec = task.spec()
    assert spec == {"task": task.name, "config": json.loads(json.dumps(asdict(task.config)))}
    rebuilt = get_task(json.loads(json.dumps(spec)))
    assert type(rebuilt) is type(task) and rebuilt.config == task.config
    assert rebuilt.spec() == spec
    assert rebuilt.dataset("train").fingerprint() == task.dataset("train").fingerprint()


def test_missing_config_keys_take_defaults():
    task = get_task({"task": "digits-cnn", "config": {"steps": 7}})
    assert task.config == replace(DigitsCNNConfig(), steps=7)
    assert get_task({"task": "modular-addition"}).config == ModularAdditionConfig()
    assert set(TASKS) == set(BUILTIN_TASKS) == {"modular-addition", "digits-cnn"}
    assert all(get_task({"task": name}).__class__ is cls for name, cls in TASKS.items())


def test_import_spec_builds_the_users_model_and_data():
    task = get_task(tiny_spec(hidden=5))
    assert isinstance(task, ImportedTask)
    assert task.spec() == tiny_spec(hidden=5)
    model = task.build_model()
    assert model.hidden.out_features == 5
    train = task.dataset("train")
    assert len(train) == 24 and train.labels.dtype == torch.int64 and train.kind == "generic"
    assert model(train.inputs).shape == (24, 3)
    assert "→" in train.render(0)
    assert torch.equal(get_task(tiny_spec(hidden=5)).build_model().out.weight, model.out.weight)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"task": "mnist"}, "unknown task 'mnist'; choose one of modular-addition, digits-cnn"),
        ({"task": "digits-cnn", "config": {"stepz": 3}}, "no config key.*stepz.*valid keys: val_frac"),
        ({"task": "digits-cnn", "config": {"lr": -1.0}}, "lr must be positive"),
        ({"task": "modular-addition", "config": {"d_model": 30, "n_heads": 4}}, "divisible by n_heads"),
        ({"task": "modular-addition", "config": {"p": "97"}}, "modular-addition"),
        ({"task": "digits-cnn", "config": [1]}, "'config' must be a dict"),
        ({"task": "digits-cnn", "extra": 1}, "unexpected key"),
        ({"weights": "x"}, "names neither a built-in task"),
        ({**tiny_spec(), "model": "tests.nowhere:TinyMLP"}, "cannot import module 'tests.nowhere'"),
        ({**tiny_spec(), "model": "tests.helpers:Missing"}, "no attribute 'Missing'.*tests.helpers:Missing"),
        ({**tiny_spec(), "data": "not a path"}, "'not a path' is not an import path"),
        ({**tiny_spec(), "loss": "hinge"}, "loss 'hinge' is not supported"),
        ({**tiny_spec(), "optimizer": "adam"}, "unknown: optimizer"),
    ],
)
def test_bad_specs_raise_bad_input(spec, message):
    with pytest.raises(BadInputError, match=message):
        get_task(spec)


def test_bad_import_targets_are_reported_when_used():
    task = get_task({**tiny_spec(), "model_kwargs": {"width": 3}})
    with pytest.raises(BadInputError, match="rejected model_kwargs"):
        task.build_model()
    task = get_task({**tiny_spec(), "data": "tests.helpers:TinyMLP"})
    with pytest.raises(BadInputError, match="must return a dict with keys 'train' and 'val'"):
        task.dataset("train")
    with pytest.raises(BadInputError, match="unknown split 'test'"):
        task.dataset("test")


def test_make_config_validates_overrides():
    assert make_config("modular-addition", {"betas": [0.8, 0.9]}).betas == (0.8, 0.9)
    with pytest.raises(BadInputError, match="config 'channels' must be a list of 2 integers, got"):
        make_config("digits-cnn", {"channels": (8.5, 16)})
    with pytest.raises(BadInputError, match="channels must be two positive whole numbers"):
        make_config("digits-cnn", {"channels": (8, 0)})
    for key, value in (("lr", float("inf")), ("lr", float("nan")), ("p", "97"), ("betas", [0.9]), ("seed", True)):
        with pytest.raises(BadInputError, match=f"config '{key}' must be"):
            make_config("modular-addition", {key: value})


# ---------------------------------------------------------------------------- training
def test_deterministic_mode_is_restored():
    before = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    with deterministic_algorithms():
        assert torch.are_deterministic_algorithms_enabled()
    assert torch.are_deterministic_algorithms_enabled() == before
    assert torch.utils.deterministic.fill_uninitialized_memory == fill


@pytest.mark.parametrize(("module", "config"), [(modular_addition, SMALL_MODULAR), (digits_cnn, SMALL_DIGITS)])
def test_recorded_training_is_bit_identical_across_runs(tmp_path, module, config):
    runs = [History.open(module.train(config, tmp_path / name, progress=False)) for name in ("a", "b")]
    a, b = runs
    task = get_task(a.model_spec)
    assert task.config == config
    assert a.num_steps == b.num_steps == config.steps
    assert a.manifest["data"]["fingerprint"] == task.dataset("train").fingerprint()
    for s in range(config.steps + 1):
        pa, pb = a.params(s), b.params(s)
        assert all(torch.equal(pa[n], pb[n]) for n in a.param_names), s
    for s in range(config.steps):
        ids_a, w_a = a.batch(s)
        ids_b, w_b = b.batch(s)
        assert torch.equal(ids_a, ids_b) and torch.equal(w_a, w_b)
    assert a.metrics().equals(b.metrics())
    assert {"train_loss", "train_acc", "val_loss", "val_acc"} <= set(a.metrics().columns)
    assert not torch.equal(a.params(0)[a.param_names[0]], a.params(config.steps)[a.param_names[0]])


def test_modular_training_uses_the_full_batch_and_logs_every_step(tmp_path):
    history = History.open(train_task("modular-addition", tmp_path / "r", asdict(SMALL_MODULAR), progress=False))
    n_train = len(ModularAdditionTask(SMALL_MODULAR).dataset("train"))
    ids, weights = history.batch(3)
    assert torch.equal(ids, torch.arange(n_train))
    assert torch.allclose(weights, torch.full((n_train,), 1.0 / n_train, dtype=torch.float64))
    metrics = history.metrics()
    assert metrics.height == SMALL_MODULAR.steps
    assert metrics["val_acc"].null_count() == 0 and metrics["train_loss"].null_count() == 0
    assert history.optimizer_family == "adam"


def test_digits_batches_are_seeded_epochs():
    first = digits_cnn.batches(100, 32, 7, seed=3)
    again = digits_cnn.batches(100, 32, 7, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(first, again, strict=True))
    assert [len(b) for b in first] == [32] * 7
    epoch = torch.cat(first[:3])
    assert len(set(epoch.tolist())) == 96
    assert not torch.equal(first[0], digits_cnn.batches(100, 32, 1, seed=4)[0])


def test_digits_reaches_a_sane_accuracy_quickly():
    config = DigitsCNNConfig(steps=150, eval_every=50)
    _, metrics = digits_cnn.fit(config, progress=False)
    assert metrics["val_acc"][-1] > 0.9
    assert metrics["train_acc"][-1] > 0.9
    assert metrics["batch_loss"][-1] < metrics["batch_loss"][0] / 5


def test_digits_uses_sgd_with_momentum_and_a_schedule(tmp_path):
    history = History.open(train_task("digits-cnn", tmp_path / "r", {"steps": 6}, progress=False))
    assert history.optimizer_family == "sgd"
    lrs = history.hparams_table().sort("step")["lr"].to_list()
    assert lrs[0] == DigitsCNNConfig().lr and lrs[-1] < lrs[0]
    assert len(history.batch(0)[0]) == DigitsCNNConfig().batch_size


# ---------------------------------------------------------------------------- presets
def test_paper_preset_uses_pairs_with_a_at_least_b_and_fixed_split_sizes():
    task = ModularAdditionTask(ModularAdditionConfig(**modular_addition.PRESETS["paper"]))
    train, val = task.dataset("train"), task.dataset("val")
    assert (len(train), len(val)) == (4000, 2000)
    for data in (train, val):
        assert bool((data.inputs[:, 0] >= data.inputs[:, 1]).all()) and bool((data.inputs[:, 2] == 113).all())
        assert torch.equal(data.labels, (data.inputs[:, 0] + data.inputs[:, 1]) % 113)
    assert not set(map(tuple, train.inputs.tolist())) & set(map(tuple, val.inputs.tolist()))
    config = task.config
    assert (config.d_model, config.n_heads, config.d_mlp, config.lr, config.weight_decay) == (64, 4, 512, 1e-3, 4.0)
    assert config.betas == (0.9, 0.98) and config.pair_count() == 113 * 114 // 2


def test_nanda_preset_holds_out_seventy_percent_of_the_ordered_pairs():
    config = ModularAdditionConfig(**modular_addition.PRESETS["nanda"])
    task = ModularAdditionTask(config)
    train, val = task.dataset("train"), task.dataset("val")
    assert len(train) == round(0.3 * 113**2) and len(train) + len(val) == 113**2
    assert (config.d_model, config.n_heads, config.d_mlp, config.weight_decay, config.warmup_steps) == (
        128, 4, 512, 1.0, 10)


def test_warm_up_raises_the_learning_rate_linearly(tmp_path):
    config = replace(SMALL_MODULAR, steps=5, warmup_steps=3)
    history = History.open(modular_addition.train(config, tmp_path / "r", progress=False))
    lrs = history.hparams_table().sort("step")["lr"].to_list()
    assert lrs == pytest.approx([config.lr / 3, 2 * config.lr / 3, config.lr, config.lr, config.lr])


def test_train_cli_applies_a_preset_and_lets_flags_override_it(tmp_path, capsys):
    from engine.cli import main

    out = tmp_path / "paper"
    code = main(["train", "modular-addition", "--preset", "paper", "--p", "11", "--train-size", "30",
                 "--val-size", "10", "--d-mlp", "8", "--d-model", "8", "--steps", "2", "--out", str(out), "--json"])
    assert code == 0
    config = get_task(History.open(out).model_spec).config
    assert (config.p, config.pairs, config.train_size, config.d_mlp, config.weight_decay) == (11, "a>=b", 30, 8, 4.0)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "modular-addition", "--preset", "missing", "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2 and "invalid choice: 'missing'" in capsys.readouterr().err


@pytest.mark.parametrize(("overrides", "message"), [
    ({"pairs": "a<b"}, "pairs must be one of all, a>=b"),
    ({"p": 5, "train_size": 25}, "train_size must leave validation pairs among the 25 pairs"),
    ({"p": 5, "pairs": "a>=b", "train_size": 10, "val_size": 6}, "val_size must be positive and fit"),
    ({"warmup_steps": -1}, "warmup_steps must be non-negative"),
])
def test_bad_split_and_warm_up_settings_are_refused(overrides, message):
    with pytest.raises(BadInputError, match=message):
        ModularAdditionConfig(**overrides)
