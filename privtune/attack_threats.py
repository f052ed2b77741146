"""`python -m privtune.attack_threats run=<run dir> attack=side|property [key=value ...]`

The survey's other generation-side threats on a finished run's release; each result is published into the run
(`threats/<side|property_inference>.json`, its report.md section, a line under the card's "Other attacks"), and
a re-evaluation keeps it.

* `attack=side`: SIDE extraction (privtune.eval.side) against unguided sampling at an equal number of
  generations, each generation confirmed against the run's members (tiled l2 to their VAE reconstructions).
  The model is sampled under `prompt=` (default the empty caption: the model as an unconditional one).
* `attack=property`: property inference (privtune.eval.property_inference): the share of the run's training
  images with `slot` in `positive`, estimated from generations of held-out embedded-pool captions without the
  property clause, read by the shipped attribute classifier and corrected for its confusion on held-out pool
  renders (none of them a member's). The true share comes from the members' captions, or `true_proportion=`.
  A run that samples with PriSampler (`sampling.prisampler.lam > 0`) is attacked twice: the released LoRA
  sampled plainly (what anyone holding the file recovers: the card's number) and the PriSampler-served sampler.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import fields

from .errors import ConfigError, DataError, run_command
from .threat_cli import RunTarget, number, open_run, parse_keys

COMMON = ("run", "attack", "seed")
SIDE_KEYS = ("generations", "pool", "clusters", "embedding", "guidance", "steps", "classifier_steps", "hidden", "delta",
             "tiles", "batch_size", "prompt")
PROPERTY_KEYS = ("slot", "positive", "generations", "steps", "guidance", "bootstrap", "true_proportion")
ATTACKS = {"side": SIDE_KEYS, "property": PROPERTY_KEYS}
HELP = __doc__ + f"""
keys: run=<run dir> (required)  attack=<{'|'.join(ATTACKS)}> (required)  seed=<0>
  side:     generations=<64 per arm>  pool=<32>  clusters=<4>  embedding=<pixels|latents>  guidance=<3.0>  steps=<20>
            classifier_steps=<400>  hidden=<128>  delta=<0.1>  tiles=<4>  batch_size=<64>  prompt=<text, default empty>
  property: slot=<eyewear>  positive=<glasses,sunglasses>  generations=<128>  steps=<25>  guidance=<3.0>
            bootstrap=<1000>  true_proportion=<p in [0, 1]; default read from the members' captions>
"""
_KINDS = {"int": int, "float": float, "str": str}


def _parse(argv) -> dict:
    own = parse_keys(argv, COMMON + tuple(dict.fromkeys(SIDE_KEYS + PROPERTY_KEYS)))
    attack = own.get("attack")
    if attack not in ATTACKS:
        raise ConfigError(f"attack={attack!r} is not one of {', '.join(ATTACKS)}; pass attack=side or attack=property")
    other = [k for k in own if k not in COMMON + ATTACKS[attack]]
    if other:
        raise ConfigError(f"key {other[0]!r} does not apply to attack={attack}; its keys are {', '.join(ATTACKS[attack])}")
    return own


# ----------------------------------------------------------------------------------------------- SIDE

def side_config(own: dict, seed: int):
    from .eval.side import SideConfig

    kw = {f.name: number(own, f.name, _KINDS[str(f.type)], None) for f in fields(SideConfig) if f.name in own}
    return SideConfig(**kw, seed=seed)


def run_side(target: RunTarget, own: dict, seed: int) -> tuple[dict, list[str], str]:
    from .eval.side import card_line, markdown_lines, side_on_pipeline

    cfg = side_config(own, seed)
    cfg.check(int(target.cfg.data.resolution))
    if not target.split.members:
        raise DataError(f"run {target.path} has no members to extract")
    prompt = own.get("prompt", "")
    components = target.load_components()
    result = side_on_pipeline(components, components.unet, target.split.members, cfg, int(target.cfg.data.resolution),
                              prompt=prompt)
    # the prompt may be a training caption: the result says only which kind it was
    result["prompt"] = "a user-given prompt" if prompt else "the empty caption (the model as an unconditional one)"
    lines = ["## SIDE extraction (Chen et al., arXiv 2410.02467)", "",
             f"{len(target.split.members)} members; sampled under {result['prompt']}; SIDE clusters {cfg.pool} of its "
             f"generations into {cfg.clusters} surrogate conditions and guides the rest.", "", *markdown_lines(result)]
    return result, lines, card_line(result)


# ----------------------------------------------------------------------------------------------- property inference

def run_style(members) -> str:
    """The portraits style of the run's training captions (their first clause, "<style> portrait")."""
    styles = {r.caption.split(" portrait", 1)[0].strip() for r in members if " portrait" in r.caption}
    if len(styles) != 1 or not all(" portrait" in r.caption for r in members):
        raise DataError("property inference reads portraits slots and calibrates on the embedded pool's renders of the "
                        "run's style, but the members' captions do not share one '<style> portrait, ...' prefix; "
                        "attack a run trained on embedded-portraits-style captions")
    return styles.pop()


def true_share(members, spec) -> float | None:
    """The share of members whose caption names a positive value of the slot; None when a caption lacks the slot."""
    from .eval.portraits import parse_caption

    values = [parse_caption(r.caption) for r in members]
    if not values or any(v is None for v in values):
        return None
    return sum(v[spec.slot] in spec.positive for v in values) / len(values)


def _arm_lines(result: dict, heading: str) -> list[str]:
    from .eval.property_inference import markdown_lines

    body = markdown_lines(result)[1:]  # without the section heading
    return [heading, *body]


def run_property(target: RunTarget, own: dict, seed: int) -> tuple[dict, list[str], str]:
    from .eval import property_inference as pi
    from .models.attributes import load_classifier

    spec = pi.PropertySpec(slot=own.get("slot", "eyewear"),
                           positive=tuple(v.strip() for v in own.get("positive", "glasses,sunglasses").split(",") if v.strip()))
    _, classifier = load_classifier()
    spec.check(classifier["slots"])
    n = number(own, "generations", int, 128)
    steps, guidance = number(own, "steps", int, 25), number(own, "guidance", float, 3.0)
    bootstrap = number(own, "bootstrap", int, 1000)
    if n < 1 or steps < 1 or bootstrap < 1:
        raise ConfigError(f"generations, steps and bootstrap must be >= 1 (got {n}, {steps}, {bootstrap})")
    members = target.split.members
    truth = number(own, "true_proportion", float, None) if "true_proportion" in own else true_share(members, spec)
    if truth is not None and not 0.0 <= truth <= 1.0:
        raise ConfigError(f"true_proportion={truth} is outside [0, 1]")
    ps = target.cfg.sampling.prisampler
    lam = float(ps.lam)
    if lam > 0:
        pi.check_prisampler(pi.PriSamplerOptions(lam=lam, aux=ps.aux, target_proportion=ps.target_proportion))

    pool = pi.portraits_rows(pi.CALIBRATION_SUBSET, run_style(members))
    pool = pool[~pool.group.isin({r.group for r in members}) & ~pool.id.isin({r.id for r in members})].reset_index(drop=True)
    if len(pool) < n:
        raise DataError(f"generations={n} exceeds the {len(pool)} held-out pool captions of the run's style; lower it")
    prompts = pool.sample(n=n, random_state=seed).reset_index(drop=True)
    calibration = pi.calibrate(spec, rows=pool, exclude_ids=[r.id for r in members])
    reference = pi.decode_images(pool)
    pipe = pi.load_pipeline(target.cfg.model, target.lora_dir, ps.aux if lam > 0 else None)
    arms, options = {}, {"release": pi.PriSamplerOptions()}
    if lam > 0:
        options["prisampler"] = pi.PriSamplerOptions(lam=lam, aux=ps.aux, target_proportion=ps.target_proportion)
    for arm, opts in options.items():
        start = time.perf_counter()
        r = pi.property_inference(pipe, prompts, spec, calibration, true_proportion=truth, options=opts, steps=steps,
                                  guidance=guidance, seed=seed, bootstrap=bootstrap, reference_images=reference, model=arm)
        arms[arm] = r.to_dict()
        print(f"privtune: property inference ({arm}): p_corr {r.estimate['p_corr']:.3f}, {time.perf_counter() - start:.0f} s",
              flush=True)
    result = {"property": arms["release"]["property"], "true_proportion_source":
              "true_proportion=" if "true_proportion" in own else ("members' captions" if truth is not None else "unknown"),
              "arms": arms}
    lines = _arm_lines(arms["release"], "## Property inference (Hu & Pang, arXiv 2306.05208): the released LoRA")
    card = pi.card_line(arms["release"])
    if "prisampler" in arms:
        lines += ["", *_arm_lines(arms["prisampler"], "### The same generations served through this run's PriSampler"),
                  "", "PriSampler acts at sampling time: it protects generations the owner serves, not the released "
                      "LoRA file, so the card reports the plain sampler."]
        card += (f" Served through PriSampler (lam={lam:g} toward p*={ps.target_proportion}), generations give "
                 f"{pi.estimate_text(arms['prisampler'])}; the released file itself is not protected by it.")
    return result, lines, card


RUNNERS = {"side": (run_side, "side", "SIDE extraction"), "property": (run_property, "property_inference", "Property inference")}


def attack(argv) -> dict:
    from .logging_utils import quiet_libraries

    quiet_libraries()
    own = _parse(argv)
    seed = number(own, "seed", int, 0)
    runner, name, title = RUNNERS[own["attack"]]
    target = open_run(own["run"], title.lower())
    result, lines, card = runner(target, own, seed)
    target.publish(name, title, result, lines, card)
    return {"attack": own["attack"], "card": card}


def main(argv: list[str] | None = None) -> int:
    code, result = run_command(attack, sys.argv[1:] if argv is None else argv, HELP)
    if result is not None:
        print(json.dumps(result))
    return code


if __name__ == "__main__":
    sys.exit(main())
