"""Causal language models: next-token log-probabilities, their explained quantities, their inputs.

A causal LM is explained through ``NextTokenLogProbs``, the function
``tokens (n, L) → log p(token_{t+1} | tokens_≤t) (n, L − 1)``; it adopts the wrapped model's
submodules, so its parameter names are the model's own (as in its checkpoints). Sequences
of different lengths are right-padded: with causal attention a padded position changes
nothing before it, and the quantities mask it out by each sequence's length (the labels of
the inputs' ``Dataset``). ``LM_QUANTITIES``:

- ``loss`` — the sequence's mean next-token loss (one output per sequence);
- ``token-loss`` — the loss of every predicted position (``L − 1`` outputs, 0 after the end);
- ``next-logprob`` — log-probability of the sequence's last token given the tokens before it.

``read_token_inputs`` reads token ids (``.npy``, ``.parquet``, ``.jsonl``) or raw text
(``.txt``, or ``text`` fields, with a tokenizer) into a padded ``TokenInputs``.
``transformer_layer`` labels a tensor with its block (``transformer.h.3``) or its module.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from engine.errors import BadInputError
from engine.model.outputs import Quantity
from engine.model.task import Dataset

TOKEN_FIELDS = ("input_ids", "tokens")  # the field or column holding a sequence's token ids
TEXT_FIELD = "text"
PAD_ID = 0  # token id at padded positions (masked out of every quantity)


class NextTokenLogProbs(nn.Module):
    """``tokens (n, L) → log p(tokens[:, t + 1] | tokens[:, :t + 1]) (n, L − 1)`` of a causal LM.

    ``lm(tokens)`` must return logits ``(n, L, vocab)`` or an object with ``.logits`` (a Hugging
    Face model). The wrapped model's children become this module's children, so
    ``named_parameters`` and ``functional_call`` use the model's own names; a model holding
    parameters or buffers directly (not in a submodule) is refused.
    """

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        direct = [n for n, _ in lm.named_parameters(recurse=False)] + [n for n, _ in lm.named_buffers(recurse=False)]
        if direct:
            raise BadInputError(f"{type(lm).__name__} holds tensors outside its submodules ({', '.join(direct)}); "
                                "wrap them in a submodule to explain the model")
        for name, child in lm.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "lm", lm)  # not registered: its submodules are this module's own
        self.lm.train(self.training)

    def train(self, mode: bool = True) -> NextTokenLogProbs:
        super().train(mode)
        self.lm.train(mode)  # the model's own flag (its forward may read it)
        return self

    def forward(self, tokens: Tensor) -> Tensor:
        out = self.lm(tokens)
        logits = out if isinstance(out, Tensor) else out.logits     # (n, L, V)
        logp = logits[:, :-1].log_softmax(-1)                       # (n, L − 1, V)
        return logp.gather(-1, tokens[:, 1:, None])[..., 0]         # (n, L − 1)


def _valid(logp: Tensor, lengths: Tensor) -> Tensor:
    """``(n, L − 1)`` 1.0 where position ``t`` predicts a real token (``t + 1 < length``), else 0.0."""
    positions = torch.arange(logp.shape[1], device=logp.device)
    return (positions[None] < (lengths - 1)[:, None]).to(logp.dtype)


def _sequence_loss(logp: Tensor, lengths: Tensor) -> Tensor:
    return -(logp * _valid(logp, lengths)).sum(1, keepdim=True) / (lengths - 1)[:, None].to(logp.dtype)


def _token_loss(logp: Tensor, lengths: Tensor) -> Tensor:
    return -logp * _valid(logp, lengths)


def _next_logprob(logp: Tensor, lengths: Tensor) -> Tensor:
    return logp.gather(1, (lengths - 2)[:, None])


LM_QUANTITIES: dict[str, Quantity] = {
    q.name: q
    for q in (
        Quantity("loss", _sequence_loss, False, "mean next-token loss of the sequence"),
        Quantity("token-loss", _token_loss, False, "next-token loss at every position (0 after the sequence ends)"),
        Quantity("next-logprob", _next_logprob, False, "log-probability of the sequence's last token"),
    )
}


def lm_quantity(name: str) -> Quantity:
    if name not in LM_QUANTITIES:
        raise BadInputError(f"quantity {name!r} is not one for language models; choose one of "
                            f"{', '.join(LM_QUANTITIES)}")
    return LM_QUANTITIES[name]


def transformer_layer(tensor_name: str) -> str:
    """A tensor's layer: its block up to the block index (``transformer.h.3.mlp.c_fc.weight`` →
    ``transformer.h.3``), else its module (``transformer.wte.weight`` → ``transformer.wte``)."""
    parts = tensor_name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[:i + 1])
    return ".".join(parts[:-1]) or tensor_name


# ---------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class TokenInputs:
    """Right-padded token sequences: ``tokens (n, L)`` int64, ``lengths (n,)``, one text per sequence."""

    tokens: Tensor
    lengths: Tensor
    texts: tuple[str, ...]
    source: str

    def dataset(self) -> Dataset:
        """The sequences as a ``Dataset`` whose labels are their lengths (what the quantities mask by)."""
        return Dataset(inputs=self.tokens, labels=self.lengths, kind="tokens", meta={"source": self.source})

    def digest(self) -> str:
        """SHA-256 of the padded token ids and the lengths."""
        digest = hashlib.sha256()
        for t in (self.tokens, self.lengths):
            digest.update(t.numpy().tobytes())
        return digest.hexdigest()


Tokenizer = Callable[[str], list[int]]


def read_token_inputs(path: Path, vocab_size: int, tokenize: Tokenizer | None = None,
                      decode: Callable[[list[int]], str] | None = None, max_length: int | None = None,
                      limit: int | None = None) -> TokenInputs:
    """Sequences of ``path`` as token ids checked against the model's vocabulary and length.

    ``.npy``: a 2-D integer array, one row per sequence. ``.parquet``: a column ``input_ids`` or
    ``tokens`` of integer lists, or ``text``. ``.jsonl``: per line a list of ids or an object with
    one of those fields. ``.txt``: one text per non-empty line. Texts need ``tokenize``.
    """
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"inputs file {path} does not exist")
    rows = _read_rows(path)
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        raise BadInputError(f"inputs file {path} holds no sequences")
    sequences, texts = [], []
    for i, row in enumerate(rows):
        if isinstance(row, str):
            if tokenize is None:
                raise BadInputError(f"inputs file {path} holds text but there is no tokenizer: give --tokenizer DIR "
                                    "or token ids")
            ids = list(tokenize(row))
            texts.append(row)
        else:
            ids = row
            texts.append(decode(ids) if decode is not None else " ".join(map(str, ids)))
        sequences.append(_check_sequence(ids, i, path, vocab_size, max_length))
    width = max(len(s) for s in sequences)
    tokens = torch.full((len(sequences), width), PAD_ID, dtype=torch.int64)
    for i, s in enumerate(sequences):
        tokens[i, :len(s)] = torch.tensor(s, dtype=torch.int64)
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.int64)
    return TokenInputs(tokens, lengths, tuple(texts), str(path))


def _check_sequence(ids: Any, i: int, path: Path, vocab_size: int, max_length: int | None) -> list[int]:
    if not isinstance(ids, (list, tuple)) or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                                                     for v in ids):
        raise BadInputError(f"sequence {i} of {path} is not a list of integer token ids")
    ids = [int(v) for v in ids]
    if len(ids) < 2:
        raise BadInputError(f"sequence {i} of {path} has {len(ids)} token(s); a next-token loss needs at least 2")
    bad = [v for v in ids if not 0 <= v < vocab_size]
    if bad:
        raise BadInputError(f"sequence {i} of {path} has token id {bad[0]} outside the model's vocabulary "
                            f"0..{vocab_size - 1}")
    if max_length is not None and len(ids) > max_length:
        raise BadInputError(f"sequence {i} of {path} has {len(ids)} tokens; the model takes at most {max_length}")
    return ids


def _read_rows(path: Path) -> list[Any]:
    """Token-id lists or texts, one per sequence."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            array = np.load(path, allow_pickle=False)
            if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
                raise BadInputError(f"{path} must hold a 2-D integer array (sequence, position) of token ids, "
                                    f"got {array.dtype} with shape {array.shape}")
            return [list(map(int, row)) for row in array]
        if suffix == ".parquet":
            import polars as pl

            try:
                frame = pl.read_parquet(path)
            except pl.exceptions.PolarsError as exc:
                raise BadInputError(f"inputs file {path} cannot be read as Parquet: {exc}") from exc
            for name in (*TOKEN_FIELDS, TEXT_FIELD):
                if name in frame.columns:
                    return frame[name].to_list()
            raise BadInputError(f"{path} has columns {frame.columns}; name the token ids "
                                f"{' or '.join(TOKEN_FIELDS)}, or the texts {TEXT_FIELD!r}")
        if suffix == ".jsonl":
            return [_json_row(line, n, path) for n, line in enumerate(path.read_text().splitlines(), 1)
                    if line.strip()]
        if suffix == ".txt":
            return [line for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise BadInputError(f"inputs file {path} cannot be read: {exc}") from exc
    raise BadInputError(f"inputs file {path} must be .npy, .parquet, .jsonl or .txt (token ids or text)")


def _json_row(line: str, number: int, path: Path) -> Any:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise BadInputError(f"line {number} of {path} is not JSON: {exc}") from exc
    if isinstance(row, dict):
        for name in (*TOKEN_FIELDS, TEXT_FIELD):
            if name in row:
                return row[name]
        raise BadInputError(f"line {number} of {path} has keys {sorted(row)}; give "
                            f"{', '.join(TOKEN_FIELDS)} or {TEXT_FIELD!r}")
    return row
