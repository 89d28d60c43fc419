"""A tiny GPT-2 language model trained on sentences of a small English grammar, saved as checkpoints.

The grammar has agreement that is local (``a`` before a singular noun, ``some`` before a
plural one) and agreement that is not: the verb agrees with the subject's head noun across a
prepositional phrase or a relative clause, whose own noun may differ in number (``the dog
near the cats runs``). Sentences are generated from a seeded generator, joined into one
stream and cut into blocks of ``block`` words; a second seed gives the held-out blocks.
The model is a ``transformers`` GPT-2 (a few hundred thousand parameters) trained with
AdamW on CPU; every ``save_every`` steps (and at step 0) it is saved as the ``Trainer``
does, ``checkpoint-<step>/`` with ``config.json``, ``model.safetensors``, the word-level
tokenizer and ``trainer_state.json`` (the logged training loss and learning rate), so the
same reader serves this sample and checkpoints written by ``transformers.Trainer``.
``heldout.txt`` beside them holds the held-out blocks, one per line, and ``agreement.txt``
as many probes of long-range agreement (explain their ``next-logprob``: the verb's).
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from engine.errors import BadInputError
from engine.model.hf import transformers
from engine.tasks.common import deterministic_algorithms

DETERMINERS = {"sg": ("the", "a"), "pl": ("the", "some")}
NOUNS = {"sg": ("cat", "dog", "bird", "fox", "child", "teacher"),
         "pl": ("cats", "dogs", "birds", "foxes", "children", "teachers")}
TRANSITIVE = {"sg": ("sees", "likes", "chases", "finds"), "pl": ("see", "like", "chase", "find")}
INTRANSITIVE = {"sg": ("runs", "sleeps", "sings"), "pl": ("run", "sleep", "sing")}
ADJECTIVES = ("big", "small", "red", "old", "happy")
PREPOSITIONS = ("near", "behind", "with")
UNKNOWN = "[UNK]"
HELDOUT = "heldout.txt"
AGREEMENT = "agreement.txt"


def vocabulary() -> list[str]:
    """Every word of the grammar, in a fixed order (the token ids)."""
    words = [UNKNOWN, ".", "that", *ADJECTIVES, *PREPOSITIONS]
    for table in (DETERMINERS, NOUNS, TRANSITIVE, INTRANSITIVE):
        for number in ("sg", "pl"):
            words += [w for w in table[number] if w not in words]
    return words


def _noun_phrase(rng: random.Random, number: str) -> list[str]:
    adjective = [rng.choice(ADJECTIVES)] if rng.random() < 0.3 else []
    return [rng.choice(DETERMINERS[number]), *adjective, rng.choice(NOUNS[number])]


def sentence(rng: random.Random) -> list[str]:
    """``NP [PP | that V NP] (V_intr | V_tr NP) .`` — the verb agrees with the subject's head noun."""
    number = rng.choice(("sg", "pl"))
    words = _noun_phrase(rng, number)
    kind = rng.random()
    if kind < 0.35:
        words += [rng.choice(PREPOSITIONS), *_noun_phrase(rng, rng.choice(("sg", "pl")))]
    elif kind < 0.6:
        words += ["that", rng.choice(TRANSITIVE[number]), *_noun_phrase(rng, rng.choice(("sg", "pl")))]
    if rng.random() < 0.5:
        words.append(rng.choice(INTRANSITIVE[number]))
    else:
        words += [rng.choice(TRANSITIVE[number]), *_noun_phrase(rng, rng.choice(("sg", "pl")))]
    return [*words, "."]


def agreement(seed: int, count: int) -> list[list[str]]:
    """Probes of long-range agreement: a subject, a phrase whose noun has the other number
    (``near some cats``, ``that chases the cats``), then the verb agreeing with the subject."""
    rng = random.Random(seed)
    probes = []
    for _ in range(count):
        number = rng.choice(("sg", "pl"))
        other = "pl" if number == "sg" else "sg"
        words = [".", rng.choice(DETERMINERS[number]), rng.choice(NOUNS[number])]
        if rng.random() < 0.5:
            words.append(rng.choice(PREPOSITIONS))
        else:
            words += ["that", rng.choice(TRANSITIVE[number])]
        words += [rng.choice(DETERMINERS[other]), rng.choice(NOUNS[other]), rng.choice(INTRANSITIVE[number])]
        probes.append(words)
    return probes


def blocks(seed: int, count: int, block: int) -> list[list[str]]:
    """``count`` blocks of ``block`` words cut from one stream of sentences."""
    rng = random.Random(seed)
    stream: list[str] = []
    while len(stream) < count * block:
        stream += sentence(rng)
    return [stream[i * block:(i + 1) * block] for i in range(count)]


@dataclass(frozen=True)
class TinyLMConfig:
    """Everything that determines the data, the model and the training of the tiny language model."""

    n_layer: int = 4
    n_embd: int = 64
    n_head: int = 4
    block: int = 32
    steps: int = 400
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 40
    weight_decay: float = 0.01
    save_every: int = 20
    train_blocks: int = 4096
    heldout_blocks: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (min(self.n_layer, self.n_embd, self.n_head, self.steps, self.batch_size) >= 1, "sizes must be positive"),
            (self.n_embd % self.n_head == 0, "n_embd must be divisible by n_head"),
            (self.block >= 2, "block must hold at least 2 words"),
            (1 <= self.save_every <= self.steps, "save_every must lie in 1..steps"),
            (self.lr > 0 and self.warmup >= 0 and self.weight_decay >= 0, "lr must be positive, warmup and "
             "weight_decay non-negative"),
            (self.train_blocks >= self.batch_size and self.heldout_blocks >= 1, "too few blocks"),
        ]
        for ok, message in checks:
            if not ok:
                raise BadInputError(f"tiny-lm config: {message} (got {self})")


def tokenizer(words: list[str]) -> object:
    """A word-level ``PreTrainedTokenizerFast`` over ``words`` (split at whitespace)."""
    package = transformers()
    from tokenizers import Tokenizer, models, pre_tokenizers

    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token=UNKNOWN))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return package.PreTrainedTokenizerFast(tokenizer_object=core, unk_token=UNKNOWN)


def train(config: TinyLMConfig, out_dir: Path, progress: bool = True, overwrite: bool = True) -> Path:
    """Train and save ``checkpoint-<step>/`` folders and ``heldout.txt`` into ``out_dir``.

    An existing ``out_dir`` is replaced (with ``overwrite``) only when it holds nothing but what
    this function writes; any other folder is refused before training.
    """
    package = transformers()
    out_dir = Path(out_dir)
    if out_dir.exists():
        if not overwrite:
            raise BadInputError(f"{out_dir} exists; choose another folder or overwrite it")
        if not out_dir.is_dir():
            raise BadInputError(f"{out_dir} is a file; the checkpoints need a new folder or one this sample wrote")
        foreign = sorted(e.name for e in out_dir.iterdir()
                         if e.name not in (HELDOUT, AGREEMENT) and not re.fullmatch(r"checkpoint-\d+", e.name))
        if foreign:
            raise BadInputError(f"{out_dir} holds {', '.join(foreign[:3])}, which training the sample does not "
                                "write; overwriting would delete them: move them away or choose another folder")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    package.utils.logging.disable_progress_bar()
    words = vocabulary()
    tok = tokenizer(words)
    ids = {w: i for i, w in enumerate(words)}
    data = torch.tensor([[ids[w] for w in b] for b in blocks(config.seed, config.train_blocks, config.block)])
    heldout = blocks(config.seed + 1, config.heldout_blocks, config.block)
    (out_dir / HELDOUT).write_text("".join(" ".join(b) + "\n" for b in heldout))
    probes = agreement(config.seed + 2, config.heldout_blocks)
    (out_dir / AGREEMENT).write_text("".join(" ".join(p) + "\n" for p in probes))

    hf_config = package.GPT2Config(vocab_size=len(words), n_positions=config.block, n_embd=config.n_embd,
                                   n_layer=config.n_layer, n_head=config.n_head, bos_token_id=ids["."],
                                   eos_token_id=ids["."], use_cache=False)
    torch.manual_seed(config.seed)
    model = package.GPT2LMHeadModel(hf_config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.98),
                                  weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, config.warmup)))
    order = torch.Generator().manual_seed(config.seed)
    log: list[dict[str, float]] = []
    with deterministic_algorithms():
        for step in tqdm(range(config.steps + 1), desc="tiny-lm", disable=not progress):
            if step % config.save_every == 0 or step == config.steps:
                _save(model, tok, log, step, config, out_dir / f"checkpoint-{step}")
            if step == config.steps:
                break
            model.train()
            batch = data[torch.randint(len(data), (config.batch_size,), generator=order)]
            logits = model(input_ids=batch).logits                                      # (batch, block, vocab)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
            optimizer.zero_grad()
            loss.backward()
            lr = schedule.get_last_lr()[0]
            optimizer.step()
            schedule.step()
            log.append({"step": step + 1, "loss": float(loss.detach()), "learning_rate": lr})
    return out_dir


def _save(model: torch.nn.Module, tok: object, log: list[dict[str, float]], step: int, config: TinyLMConfig,
          folder: Path) -> None:
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    state = {"global_step": step, "max_steps": config.steps, "save_steps": config.save_every,
             "log_history": list(log), "config": asdict(config)}
    (folder / "trainer_state.json").write_text(json.dumps(state, indent=1))


__all__ = ["TinyLMConfig", "agreement", "blocks", "sentence", "train", "vocabulary"]
