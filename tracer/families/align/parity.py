"""ALIGN's outputs compared: the L2-normalised image and text embeddings and the temperature."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from tracer.engine.compare import DEFAULT_ATOL, cosine_min, max_abs


@dataclass
class Parity:
    """The converted model's embeddings against a reference: the Keras model (`against="keras"`, a traced run), the
    original's outputs given with the inputs (`"reference"`), or nothing (`"none"`: only the temperature is
    checked; the embeddings' fields are NaN)."""

    image_embeds_max_abs: float
    text_embeds_max_abs: float
    image_embeds_cosine_min: float
    text_embeds_cosine_min: float
    temperature_checkpoint: float
    temperature_hf: float
    atol: float
    against: str = "keras"
    temperature_default: float = 1.0  # AlignConfig's temperature_init_value: what an unwritten temperature reads

    def off(self, tower: str) -> bool:
        """The tower's embeddings miss the tolerance (False when nothing was compared)."""
        value = self.image_embeds_max_abs if tower == "vision" else self.text_embeds_max_abs
        return value > self.atol

    @property
    def ok(self) -> bool:
        if self.against == "none":
            return self.temperature_match
        return self.image_embeds_max_abs <= self.atol and self.text_embeds_max_abs <= self.atol and self.temperature_match

    @property
    def temperature_match(self) -> bool:
        return abs(self.temperature_checkpoint - self.temperature_hf) <= 1e-7 * max(1.0, abs(self.temperature_checkpoint))

    def temperature_fault(self) -> str | None:
        """What the HF temperature holds instead of the checkpoint's, with the convention it matches (None: they
        match)."""
        if self.temperature_match:
            return None
        ckpt, hf = self.temperature_checkpoint, self.temperature_hf
        why = ""
        if ckpt and math.isclose(hf, 1 / ckpt, rel_tol=1e-5):
            why = ": HF holds its inverse (a logit scale where a temperature is expected)"
        elif ckpt > 0 and math.isclose(hf, math.log(1 / ckpt), rel_tol=1e-5):
            why = ": HF holds log(1/T), CLIP's logit_scale convention"
        elif ckpt > 0 and math.isclose(hf, math.log(ckpt), rel_tol=1e-5, abs_tol=1e-9):
            why = ": HF holds log(T)"
        elif math.isclose(hf, self.temperature_default, rel_tol=1e-6):
            why = ": HF kept the config's default temperature_init_value (the checkpoint's value was never written)"
        return (f"the checkpoint's temperature is {ckpt:.6g} but the HF model's is {hf:.6g}{why}; logits would be "
                f"scaled by {ckpt / hf if hf else float('inf'):.4g}× the original's")

    def reasons(self) -> list[str]:
        """Why the outputs fail, one line each (empty: they match)."""
        out = []
        for side in ("image", "text"):
            value = getattr(self, f"{side}_embeds_max_abs")
            if not value <= self.atol:  # NaN misses too
                out.append(f"{side}_embeds max|Δ| {value:.2e} > atol {self.atol:g}")
        if not self.temperature_match:
            out.append(f"temperature checkpoint {self.temperature_checkpoint:.6g} != hf {self.temperature_hf:.6g}")
        return out

    def tolerances(self) -> dict:
        return {"embeds_max_abs": self.atol}

    def summary_fields(self) -> dict:
        """What summary.json says of the outputs."""
        return {"image_embeds_max_abs": self.image_embeds_max_abs, "text_embeds_max_abs": self.text_embeds_max_abs,
                "image_embeds_cosine_min": self.image_embeds_cosine_min,
                "text_embeds_cosine_min": self.text_embeds_cosine_min,
                "temperature": {"checkpoint": self.temperature_checkpoint, "hf": self.temperature_hf,
                                "match": self.temperature_match}}

    def summary_lines(self, data: dict) -> list[str]:
        """The CLI summary's lines on the outputs."""
        from tracer.engine.report import _fmt

        lines = [f"embeddings: image max|Δ| {_fmt(self.image_embeds_max_abs)} "
                 f"(cos ≥ {_fmt(self.image_embeds_cosine_min, '.7f')}), "
                 f"text max|Δ| {_fmt(self.text_embeds_max_abs)} "
                 f"(cos ≥ {_fmt(self.text_embeds_cosine_min, '.7f')}); atol {self.atol:g}"]
        if not self.temperature_match:
            lines.append(f"temperature: checkpoint {self.temperature_checkpoint} / hf {self.temperature_hf}")
        return lines

    def cards(self, data: dict) -> list[tuple[str, str, str, str]]:
        """The report page's cards on the outputs: (title, value, detail, class)."""
        from tracer.engine.report import _fmt

        cards = []
        for side in ("image", "text"):
            v, c = getattr(self, f"{side}_embeds_max_abs"), getattr(self, f"{side}_embeds_cosine_min")
            cards.append((f"{side} embeds max|Δ|", _fmt(v), f"cosine ≥ {_fmt(c, '.7f')} · atol {self.atol:g}",
                          "good" if v <= self.atol else "bad"))
        cards.append(("temperature", _fmt(self.temperature_hf, ".6g"),
                      f"checkpoint {_fmt(self.temperature_checkpoint, '.6g')} · hf {_fmt(self.temperature_hf, '.6g')}",
                      "good" if self.temperature_match else "bad"))
        return cards

    def as_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}

    def describe(self) -> str:
        temperature = (f"temperature checkpoint {self.temperature_checkpoint:.6g} / hf {self.temperature_hf:.6g}, "
                       f"atol {self.atol:g}")
        if self.against == "none":
            return f"embeddings not compared (no reference outputs), {temperature}"
        return (
            f"against the {'Keras model' if self.against == 'keras' else 'reference outputs'}: "
            f"image_embeds max|Δ| {self.image_embeds_max_abs:.2e} (cos ≥ {self.image_embeds_cosine_min:.7f}), "
            f"text_embeds max|Δ| {self.text_embeds_max_abs:.2e} (cos ≥ {self.text_embeds_cosine_min:.7f}), "
            + temperature
        )


def compare_embeddings(keras: dict | None, hf: dict, temperature_checkpoint: float, temperature_hf: float,
                       atol: float = DEFAULT_ATOL, against: str = "keras") -> Parity:
    """`keras` (the reference) and `hf` each hold `image_embeds` and `text_embeds` (L2-normalised, numpy);
    `keras=None`: nothing to compare against."""
    if keras is None:
        nan = float("nan")
        return Parity(nan, nan, nan, nan, float(temperature_checkpoint), float(temperature_hf), atol, "none")
    return Parity(
        image_embeds_max_abs=max_abs(keras["image_embeds"], hf["image_embeds"]),
        text_embeds_max_abs=max_abs(keras["text_embeds"], hf["text_embeds"]),
        image_embeds_cosine_min=cosine_min(keras["image_embeds"], hf["image_embeds"]),
        text_embeds_cosine_min=cosine_min(keras["text_embeds"], hf["text_embeds"]),
        temperature_checkpoint=float(temperature_checkpoint),
        temperature_hf=float(temperature_hf),
        atol=atol,
        against=against,
    )


def with_embeds(features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Tower features plus their L2-normalised `*_embeds`."""
    return {**features, **{k.replace("features", "embeds"): v / np.linalg.norm(v, axis=-1, keepdims=True)
                           for k, v in features.items()}}
