"""The BERT tokenizer saved beside a converted model: WordPiece from the checkpoint's `vocab.txt`."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from tracer.errors import BadInputError, ConversionError
from tracer.families.bert.spec import BertSpec

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_LATIN_UPPER = re.compile(r"[A-Z]")
_BRACKETED = re.compile(r"^\[[^\]]+\]$|^<[^>]+>$")  # [CLS], [unused12], <S>: not words


def find_vocab(checkpoint_path: str, explicit: str | None = None) -> str:
    """`vocab.txt` beside the checkpoint, or the file given."""
    if explicit:
        if not os.path.isfile(explicit):
            raise BadInputError(f"vocabulary {explicit}: no such file; pass the vocab.txt saved with the checkpoint")
        return explicit
    base = Path(checkpoint_path)
    folder = base if base.is_dir() else base.parent
    path = folder / "vocab.txt"
    if not path.is_file():
        raise BadInputError(f"no vocab.txt beside the checkpoint in {folder}; pass the vocabulary it was trained "
                            "with (--vocab_file)")
    return str(path)


def read_vocab(vocab_file: str) -> dict[str, int]:
    """`token -> line index`, as BERT's vocab.txt is defined (one token a line)."""
    try:
        with open(vocab_file, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError) as err:
        raise BadInputError(f"cannot read vocabulary {vocab_file}: {err}; pass a UTF-8 vocab.txt") from err
    if lines and lines[-1] == "":
        lines.pop()
    vocab: dict[str, int] = {}
    for index, token in enumerate(lines):
        token = token.rstrip("\r")
        if token in vocab:
            raise BadInputError(f"vocabulary {vocab_file}: token {token!r} repeats on lines {vocab[token] + 1} and "
                                f"{index + 1}; it is not a BERT vocab.txt")
        vocab[token] = index
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise BadInputError(f"vocabulary {vocab_file} lacks {', '.join(missing)}: not a BERT vocab.txt")
    return vocab


def guess_lower_case(vocab: dict[str, int]) -> bool:
    """An uncased vocabulary has no upper-case Latin word pieces (special tokens aside). Only A-Z count: uncased
    vocabularies keep symbols Unicode calls upper case (bert-base-uncased has `ℝ`)."""
    return not any(_LATIN_UPPER.search(token) for token in vocab if not _BRACKETED.match(token))


def tokenizer_lower_case(checkpoint_path: str) -> bool | None:
    """`do_lower_case` of a `tokenizer_config.json` saved beside the checkpoint, if any."""
    base = Path(checkpoint_path)
    path = (base if base.is_dir() else base.parent) / "tokenizer_config.json"
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("do_lower_case")
    except (OSError, ValueError, AttributeError):
        return None
    return bool(value) if value is not None else None


def build_tokenizer(spec: BertSpec, vocab_file: str, do_lower_case: bool | None = None):
    """A `BertTokenizer` on `vocab_file`, checked against the embedding table. `do_lower_case`: given, else the
    spec's (from its config), else guessed from the vocabulary."""
    from transformers import BertTokenizer

    vocab = read_vocab(vocab_file)
    if len(vocab) < spec.vocab_size:
        raise ConversionError(f"vocabulary {vocab_file} has {len(vocab)} tokens, but the checkpoint's embedding table "
                              f"has {spec.vocab_size} rows: it is not this model's vocabulary (ids past "
                              f"{len(vocab) - 1} could never be produced); pass the vocab.txt saved with the checkpoint")
    if len(vocab) > spec.vocab_size:
        raise ConversionError(f"vocabulary {vocab_file} has {len(vocab)} tokens, more than the {spec.vocab_size} rows "
                              "of the checkpoint's embedding table: it is not this model's vocabulary; pass the "
                              "vocab.txt saved with the checkpoint")
    lower = do_lower_case if do_lower_case is not None else spec.do_lower_case
    if lower is None:
        lower = guess_lower_case(vocab)
        logger.info("do_lower_case=%s, guessed from the vocabulary (%s)", lower,
                    "no upper-case pieces" if lower else "it has upper-case pieces")
    # transformers 5's BertTokenizer(vocab_file=...) ignores the file: the vocabulary goes in as a dict.
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=lower, model_max_length=spec.max_position_embeddings)
    if len(tokenizer) != len(vocab):
        raise ConversionError(f"the tokenizer built on {vocab_file} has {len(tokenizer)} tokens, not {len(vocab)}: "
                              "its vocabulary did not load; this transformers version builds BertTokenizer "
                              "differently from the one tracer supports (5.x)")
    return tokenizer
