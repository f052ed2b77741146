"""Property inference on a released text-to-image model, and the PriSampler defense.

Hu & Pang, "PriSampler: Mitigating Property Inference of Diffusion Models" (arXiv 2306.05208); specs:
attacks.md section 11, defenses.md section 8.

**Attack.** The adversary sees only generations. The property is one slot of the embedded portraits
(default: `eyewear` in {glasses, sunglasses} vs `no glasses`). It labels N generations with the shipped
attribute classifier (privtune.models.attributes) and estimates the training-set proportion as
p_hat = (1/N) sum_i h(x_i); because the classifier errs, the estimate is corrected with its confusion matrix,
p_corr = clip((p_hat - FPR) / (TPR - FPR), 0, 1), TPR / FPR measured on labelled renders disjoint from the
target's training rows (the `pool` subset, which the classifier never saw either). Generations come from
prompts with the property's clause removed, so what is read is the marginal the model learned, not a caption
it follows. Confidence intervals: a bootstrap over the generations AND the calibration renders.

**Targets.** `write_property_folder` writes an image folder (PNGs + metadata.jsonl) of `dp_pool` rows of
which a fraction p has the property, captions without the property clause; a normal `privtune.train` run
with `data.source=<folder>` fine-tunes it (benchmarks/property_inference.py).

**PriSampler.** At every denoising step the target's noise prediction is mixed with an auxiliary model's,
eps = (1 - lam) eps_target + lam eps_aux, the auxiliary model being a LoRA trained on rows (disjoint from
the target's) whose proportion is the owner's chosen p*. Both LoRAs are peft adapters of one UNet and both
are evaluated each step; under classifier-free guidance the mix is applied to the doubled (cond, uncond)
batch, which is the same as mixing the guided predictions (the mix is linear). lam = 0 calls the target
adapter alone, so it reproduces the undefended sampler bit for bit. Options: the `sampling.prisampler`
section (lam, aux, target_proportion; `PriSamplerOptions` here). The guarantee is about the classifier-read
marginal only; per-sample membership is untouched (defenses.md 8(d)). In a run, `sampling.prisampler` applies
it to validation images and utility generations (privtune.memorization.sampling).
"""

from __future__ import annotations

import io
import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import ConfigError, DataError
from ..schema.training import PriSampler as PriSamplerOptions  # the `sampling.prisampler` section

TARGET_ADAPTER = "target"
AUX_ADAPTER = "aux"
CALIBRATION_SUBSET = "pool"     # pixel art, never seen by the classifier, disjoint from dp_pool
TRAINING_SUBSET = "dp_pool"     # pixel art rows the targets and auxiliary models are drawn from
STYLE = "pixel art"
_SLOTS = ("style", "hair_color", "hair_length", "skin_tone", "eyewear", "shirt_color", "background_color")


@dataclass
class PropertySpec:
    """The property: `slot` has one of the `positive` values (every other value of the slot is negative)."""

    slot: str = "eyewear"
    positive: tuple = ("glasses", "sunglasses")

    def check(self, slots: dict[str, list[str]]) -> None:
        if self.slot not in slots or self.slot == "style":
            raise ConfigError(f"property slot {self.slot!r} is not a portraits caption slot; use one of "
                              f"{[s for s in slots if s != 'style']}")
        values = slots[self.slot]
        unknown = [v for v in self.positive if v not in values]
        if not self.positive or unknown:
            raise ConfigError(f"property values {unknown or list(self.positive)} are not values of slot {self.slot!r}; "
                              f"choose a non-empty, proper subset of {values}")
        if set(self.positive) >= set(values):
            raise ConfigError(f"every value of {self.slot!r} is positive; leave at least one negative value")

    def positive_index(self, slots: dict[str, list[str]]) -> np.ndarray:
        return np.array([slots[self.slot].index(v) for v in self.positive])


def check_prisampler(options: PriSamplerOptions) -> None:
    """The `sampling.prisampler` section's checks (run on construction) plus the auxiliary folder's existence."""
    if float(options.lam) > 0 and not Path(str(options.aux)).is_dir():
        raise ConfigError(f"sampling.prisampler.aux {options.aux} is not a folder; pass the auxiliary run's lora/ folder")


# ----------------------------------------------------------------------------------------------- data

def strip_clause(caption: str, slot: str) -> str:
    """The portraits caption without the clause naming `slot` (hair colour / length drop only their word)."""
    from .portraits import parse_caption

    v = parse_caption(caption)
    if v is None:
        raise DataError(f"caption {caption!r} does not follow the portraits template")
    hair = " ".join(x for x, s in ((v["hair_color"], "hair_color"), (v["hair_length"], "hair_length")) if s != slot)
    clauses = [("style", f"{v['style']} portrait"), ("hair", f"{hair} hair"), ("skin_tone", f"{v['skin_tone']} skin"),
               ("eyewear", v["eyewear"]), ("shirt_color", f"{v['shirt_color']} shirt"),
               ("background_color", f"{v['background_color']} background")]
    return ", ".join(text for name, text in clauses if name != slot)


def portraits_rows(subset: str, style: str = STYLE):
    """Rows (pandas) of one embedded portraits subset and style, with image bytes."""
    import pandas as pd

    from ..data.sources import EMBEDDED_DATA

    df = pd.read_parquet(EMBEDDED_DATA)
    rows = df[(df.subset == subset) & (df["style"] == style)].reset_index(drop=True)
    if rows.empty:
        raise DataError(f"no {style!r} rows in portraits subset {subset!r}")
    return rows


def has_property(rows, spec: PropertySpec) -> np.ndarray:
    if spec.slot not in rows.columns:
        raise ConfigError(f"property slot {spec.slot!r} is not a portraits column; use one of {list(_SLOTS[1:])}")
    return rows[spec.slot].isin(list(spec.positive)).to_numpy()


def choose_rows(rows, spec: PropertySpec, proportion: float, n: int, seed: int = 0, exclude_ids: Sequence[str] = ()):
    """n rows (seeded) of which round(proportion * n) have the property, none of them in `exclude_ids`."""
    if not 0.0 <= float(proportion) <= 1.0:
        raise ConfigError(f"property proportion must be in [0, 1] (got {proportion})")
    rows = rows[~rows.id.isin(set(exclude_ids))]
    flags = has_property(rows, spec)
    k = int(round(proportion * n))
    pos, neg = np.flatnonzero(flags), np.flatnonzero(~flags)
    if k > len(pos) or n - k > len(neg):
        raise DataError(f"{n} rows at proportion {proportion} need {k} with {spec.slot} in {list(spec.positive)} and "
                        f"{n - k} without; only {len(pos)} / {len(neg)} are available. Lower n")
    rng = np.random.default_rng(seed)
    chosen = np.concatenate([rng.choice(pos, k, replace=False), rng.choice(neg, n - k, replace=False)])
    return rows.iloc[np.sort(chosen)].reset_index(drop=True)


def decode_images(rows) -> list:
    from PIL import Image

    return [Image.open(io.BytesIO(cell["bytes"])).convert("RGB") for cell in rows["image"]]


def write_property_folder(rows, folder, spec: PropertySpec) -> Path:
    """An image folder (PNGs + metadata.jsonl, the diffusers layout privtune.train reads) of `rows`, captions
    without the property clause, plus property.json recording the true proportion and the row ids."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (image, caption) in enumerate(zip(decode_images(rows), rows["caption"])):
        name = f"img{i:04d}.png"
        image.save(folder / name)
        lines.append(json.dumps({"file_name": name, "caption": strip_clause(caption, spec.slot), "group": f"row{i:04d}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    info = {"slot": spec.slot, "positive": list(spec.positive), "proportion": float(has_property(rows, spec).mean()),
            "n": len(rows), "ids": rows["id"].tolist()}
    (folder / "property.json").write_text(json.dumps(info, indent=1))
    return folder


# ----------------------------------------------------------------------------------------------- estimator

def classify(images, spec: PropertySpec, classifier_dir=None) -> np.ndarray:
    """Boolean per image: the shipped attribute classifier reads a positive value of the property slot."""
    from PIL import Image

    from ..models.attributes import load_classifier, to_tensor

    model, config = load_classifier(*([classifier_dir] if classifier_dir else []))
    spec.check(config["slots"])
    pil = [Image.fromarray(x) if isinstance(x, np.ndarray) else x for x in images]
    pred, _ = model.predict(to_tensor(pil, int(config["resolution"])))
    return np.isin(pred[spec.slot], spec.positive_index(config["slots"]))


def corrected(p_hat, tpr: float, fpr: float):
    """(p_hat - FPR) / (TPR - FPR), clipped to [0, 1]; the classifier must beat chance (TPR > FPR)."""
    if not tpr > fpr:
        raise DataError(f"the property classifier does not separate the classes (TPR {tpr:.3f} <= FPR {fpr:.3f}); "
                        "its corrected estimate is undefined")
    return np.clip((np.asarray(p_hat, dtype=float) - fpr) / (tpr - fpr), 0.0, 1.0)


def shadow_calibrated(p_corr: float, shadows: Sequence[tuple[float, float]]) -> float:
    """The estimate mapped through shadow models: a least-squares line p = a + b p_corr fitted on (p_corr, p) of
    models the adversary fine-tuned itself at known proportions, clipped to [0, 1]. It removes the bias the
    classifier correction cannot, the pull of the base model's own marginal toward its prior."""
    if len(shadows) < 2 or len({round(float(x), 12) for x, _ in shadows}) < 2:
        raise DataError("shadow calibration needs at least two shadow models with different estimates")
    x, y = np.array([s[0] for s in shadows], float), np.array([s[1] for s in shadows], float)
    b, a = np.polyfit(x, y, 1)
    return float(np.clip(a + b * float(p_corr), 0.0, 1.0))


@dataclass
class Calibration:
    """The classifier's confusion on labelled renders: per-render predictions for the positives and negatives."""

    predicted_on_positives: np.ndarray
    predicted_on_negatives: np.ndarray
    source: str = ""

    @property
    def tpr(self) -> float:
        return float(np.mean(self.predicted_on_positives))

    @property
    def fpr(self) -> float:
        return float(np.mean(self.predicted_on_negatives))


def calibrate(spec: PropertySpec, rows=None, classifier_dir=None, exclude_ids: Sequence[str] = ()) -> Calibration:
    """TPR / FPR of the classifier on labelled renders (default: every pixel-art `pool` row), never a target's rows."""
    rows = portraits_rows(CALIBRATION_SUBSET) if rows is None else rows
    overlap = set(rows.id) & set(exclude_ids)
    if overlap:
        raise DataError(f"{len(overlap)} calibration rows are training rows of the target (e.g. {sorted(overlap)[0]}); "
                        "the confusion matrix must be measured on disjoint renders")
    truth = has_property(rows, spec)
    pred = classify(decode_images(rows), spec, classifier_dir)
    return Calibration(pred[truth], pred[~truth], source=f"{len(rows)} labelled renders ({truth.sum()} positive)")


def estimate(predicted: np.ndarray, calibration: Calibration, true_proportion: float | None = None,
             bootstrap: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """p_hat and p_corr from per-generation classifier labels, with bootstrap CIs that resample the generations
    and the calibration renders together, and their errors against the true proportion when it is known."""
    predicted = np.asarray(predicted, dtype=bool)
    if predicted.size == 0:
        raise DataError("no generations to estimate the property proportion from")
    tpr, fpr = calibration.tpr, calibration.fpr
    p_hat = float(predicted.mean())
    p_corr = float(corrected(p_hat, tpr, fpr))
    rng = np.random.default_rng(seed)
    pos, neg = calibration.predicted_on_positives, calibration.predicted_on_negatives
    hats = rng.binomial(predicted.size, p_hat, bootstrap) / predicted.size
    tprs = rng.binomial(pos.size, tpr, bootstrap) / pos.size
    fprs = rng.binomial(neg.size, fpr, bootstrap) / neg.size
    ok = tprs > fprs
    corrs = np.clip((hats[ok] - fprs[ok]) / (tprs[ok] - fprs[ok]), 0, 1)
    lo, hi = (1 - level) / 2, 1 - (1 - level) / 2
    out = {
        "n_generations": int(predicted.size), "p_hat": p_hat, "p_corr": p_corr,
        "p_hat_ci": [float(np.quantile(hats, lo)), float(np.quantile(hats, hi))],
        "p_corr_ci": [float(np.quantile(corrs, lo)), float(np.quantile(corrs, hi))],
        "tpr": tpr, "fpr": fpr, "calibration": calibration.source, "ci_level": level, "bootstrap": int(bootstrap),
    }
    if true_proportion is not None:
        out.update(p_true=float(true_proportion), error_p_hat=abs(p_hat - true_proportion),
                   error_p_corr=abs(p_corr - true_proportion),
                   error_p_hat_ci=_abs_ci(hats - true_proportion, lo, hi),
                   error_p_corr_ci=_abs_ci(corrs - true_proportion, lo, hi))
    return out


def _abs_ci(diff: np.ndarray, lo: float, hi: float) -> list[float]:
    a = np.abs(diff)
    return [float(np.quantile(a, lo)), float(np.quantile(a, hi))]


# ----------------------------------------------------------------------------------------------- PriSampler

def mix(eps_target: torch.Tensor, eps_aux: torch.Tensor, lam: float) -> torch.Tensor:
    """(1 - lam) eps_target + lam eps_aux; lam = 0 returns eps_target itself (bit for bit)."""
    if lam == 0:
        return eps_target
    return (1.0 - lam) * eps_target + lam * eps_aux


class MixedPredictor:
    """PriSampler over two NoisePredictors (x, t, cond) -> eps, for samplers outside diffusers."""

    def __init__(self, target: Callable, aux: Callable, lam: float):
        PriSamplerOptions(lam=lam, aux=".")
        self.target, self.aux, self.lam = target, aux, float(lam)

    def __call__(self, x, t, cond):
        eps = self.target(x, t, cond)
        return eps if self.lam == 0 else mix(eps, self.aux(x, t, cond), self.lam)


@contextmanager
def prisampler(unet: torch.nn.Module, lam: float, target: str = TARGET_ADAPTER, aux: str = AUX_ADAPTER):
    """While active, every forward of `unet` (a diffusers UNet with peft adapters `target` and `aux`) returns the
    PriSampler mix of the two adapters' predictions; with lam = 0 only `target` runs. Restores adapter and forward."""
    from ..models.lora import active_adapter, use_adapter

    PriSamplerOptions(lam=lam, aux=".")
    before = active_adapter(unet)
    own = vars(unet).get("forward")  # an instance-level forward (e.g. an accelerate hook) is put back as it was
    original = unet.forward

    def forward(*args, **kwargs):
        use_adapter(unet, target)
        out_t = original(*args, **kwargs)
        if lam == 0:
            return out_t
        use_adapter(unet, aux)
        out_a = original(*args, **kwargs)
        use_adapter(unet, target)
        if isinstance(out_t, tuple):
            return (mix(out_t[0], out_a[0], lam), *out_t[1:])
        out_t.sample = mix(out_t.sample, out_a.sample, lam)
        return out_t

    unet.forward = forward
    try:
        yield unet
    finally:
        if own is None:
            del unet.forward  # back to the class's forward
        else:
            unet.forward = own
        use_adapter(unet, before)


def load_pipeline(base, target_lora, aux_lora=None):
    """A DDIM pipeline on `base` (a model name, or a `model` config section with revision / variant /
    allow_unsafe_weights) with the target LoRA as adapter "target" (active) and, when given, the auxiliary LoRA
    as adapter "aux"."""
    from omegaconf import OmegaConf

    from ..models.loading import freeze, load_components
    from ..models.lora import load_lora, use_adapter
    from .stage import pipeline_for

    model = OmegaConf.create({"base": base, "revision": None, "variant": None, "allow_unsafe_weights": False}) \
        if isinstance(base, (str, Path)) else base
    if aux_lora is not None and not Path(aux_lora).is_dir():
        raise ConfigError(f"auxiliary LoRA folder {aux_lora} does not exist; pass the auxiliary run's lora/ folder")
    comps = load_components(model)
    freeze(*comps.modules())
    load_lora(comps, target_lora, TARGET_ADAPTER)
    if aux_lora is not None:
        load_lora(comps, aux_lora, AUX_ADAPTER)
    use_adapter(comps.unet, TARGET_ADAPTER)
    comps.unet.eval()
    return pipeline_for(comps, comps.unet)


@torch.no_grad()
def generate(pipe, prompts: Sequence[str], lam: float = 0.0, steps: int = 25, guidance: float = 3.0, seed: int = 0,
             batch_size: int = 64) -> np.ndarray:
    """uint8 generations (one per prompt, seeded) from the target adapter, PriSampler-mixed with "aux" when lam > 0."""
    from ..models.recognition import generate as plain

    with prisampler(pipe.unet, lam):
        return plain(pipe, list(prompts), steps=steps, guidance=guidance, seed=seed, batch_size=batch_size)


# ----------------------------------------------------------------------------------------------- run + report

@dataclass
class PropertyInferenceResult:
    spec: PropertySpec
    estimate: dict
    prisampler: PriSamplerOptions = field(default_factory=PriSamplerOptions)
    utility: dict = field(default_factory=dict)
    model: str = ""

    def to_dict(self) -> dict:
        return {"property": {"slot": self.spec.slot, "positive": list(self.spec.positive)}, **self.estimate,
                "prisampler": asdict(self.prisampler), "utility": self.utility, "model": self.model}


def property_inference(pipe, prompt_rows, spec: PropertySpec, calibration: Calibration, *, true_proportion=None,
                       options: PriSamplerOptions | None = None, steps: int = 25, guidance: float = 3.0, seed: int = 0,
                       bootstrap: int = 1000, reference_images=None, model: str = "") -> PropertyInferenceResult:
    """Generate one image per prompt row (caption without the property clause), estimate the proportion, and, with
    `reference_images`, the utility of those generations (style accuracy, FD; portrait_utility on the rows' captions)."""
    from .portraits import portrait_utility

    options = options or PriSamplerOptions()
    check_prisampler(options)
    prompts = [strip_clause(c, spec.slot) for c in prompt_rows["caption"]]
    images = generate(pipe, prompts, lam=float(options.lam), steps=steps, guidance=guidance, seed=seed)
    est = estimate(classify(images, spec), calibration, true_proportion, bootstrap=bootstrap, seed=seed)
    util = {}
    if reference_images is not None:
        full = portrait_utility(images, list(prompt_rows["caption"]), reference_images)
        others = [v for s, v in full["slot_accuracy"].items() if s not in ("style", spec.slot)]
        util = {"style_accuracy": full["style_accuracy"], "frechet_distance": full["frechet_distance"],
                "other_slots_accuracy": float(np.mean(others))}
    return PropertyInferenceResult(spec, est, options, util, model)


def _fmt_ci(ci) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def markdown_lines(result) -> list[str]:
    """A report section: the estimate, its correction and errors, and PriSampler's setting and utility."""
    r = result.to_dict() if isinstance(result, PropertyInferenceResult) else result
    prop = r["property"]
    lines = ["## Property inference (Hu & Pang, arXiv 2306.05208)", "",
             f"Property: `{prop['slot']}` in {{{', '.join(prop['positive'])}}}; {r['n_generations']} generations from "
             f"prompts without the property clause, read by the shipped attribute classifier (TPR {r['tpr']:.3f}, "
             f"FPR {r['fpr']:.3f} on {r['calibration']}).", "",
             "| quantity | value | 95% CI |", "|---|---|---|"]
    if "p_true" in r:
        lines.append(f"| true proportion p | {r['p_true']:.3f} | |")
    lines += [f"| p_hat (raw) | {r['p_hat']:.3f} | {_fmt_ci(r['p_hat_ci'])} |",
              f"| p_corr (confusion-corrected) | {r['p_corr']:.3f} | {_fmt_ci(r['p_corr_ci'])} |"]
    if "p_true" in r:
        lines += [f"| abs(p_hat - p) | {r['error_p_hat']:.3f} | {_fmt_ci(r['error_p_hat_ci'])} |",
                  f"| abs(p_corr - p) | {r['error_p_corr']:.3f} | {_fmt_ci(r['error_p_corr_ci'])} |"]
    ps = r.get("prisampler") or {}
    if ps.get("lam"):
        lines += ["", f"PriSampler on: lam = {ps['lam']}, auxiliary LoRA at p* = {ps.get('target_proportion')}."]
    if r.get("utility"):
        u = r["utility"]
        lines += ["", f"Utility of the same generations: style accuracy {u['style_accuracy']:.3f}, "
                      f"other-slot accuracy {u['other_slots_accuracy']:.3f}, FD {u['frechet_distance']:.2f}."]
    return lines


ERROR_BANDS = (0.05, 0.1, 0.2)


def error_band(error: float) -> str:
    """The error as a band, so the shipped card says how well the property leaks without stating its true value."""
    for band in ERROR_BANDS:
        if round(float(error), 6) <= band:
            return f"within {band:g} of the true share"
    return f"more than {ERROR_BANDS[-1]:g} from the true share"


def estimate_text(result) -> str:
    """The adversary's estimate with its CI and, when the truth is known, the band of its error."""
    r = result.to_dict() if isinstance(result, PropertyInferenceResult) else result
    err = f", {error_band(r['error_p_corr'])}" if "p_true" in r else ""
    return f"{r['p_corr']:.2f} {_fmt_ci(r['p_corr_ci'])}{err}"


def card_line(result) -> str:
    """One privacy-card line. The true proportion is a fact about the training data: the card gives only the
    adversary's own estimate and the band of its error (report.md, in the private run folder, has the numbers)."""
    r = result.to_dict() if isinstance(result, PropertyInferenceResult) else result
    prop = r["property"]
    what = f"the share of training images with {prop['slot']} in {{{', '.join(prop['positive'])}}}"
    ps = r.get("prisampler") or {}
    defense = f"; PriSampler lam={ps['lam']} toward p*={ps.get('target_proportion')}" if ps.get("lam") else ""
    return (f"Property inference: from {r['n_generations']} generations an adversary estimates {what} as "
            f"{estimate_text(r)}{defense}.")
