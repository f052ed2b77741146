"""The evaluation stage: attack a trained model, measure its utility, write the report and privacy card.

Runs at the end of `privtune.train` (Trainer.after_export) and from `privtune.evaluate`; both call
`evaluate_model`, so the same seed gives the same scores. Under `accelerate launch` the attack work
is sharded across processes (privtune.eval.distributed) and the report is written once.
"""

from __future__ import annotations

import json
import shlex
import sys
import warnings
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

from ..config import to_container
from ..errors import ConfigError
from .attacks import ATTACKS, AttackTarget
from .distributed import sharded
from .encode import LATENT_CHOICE, decoder_fn, empty_prompt_state, encode_records, text_encoder_fn
from .primitives import UNetPredictor
from .attacks.base import CalibrationPart
from .runner import Release, ShadowData, run_release_attacks
from .shadow import SHADOWS
from .utility import compute_utility
from ..rng import numpy_rng


_COMMAND: list[str] = []


def record_command(module: str, argv) -> None:
    """Remember the entry point and arguments, so the report and card can show how to reproduce them."""
    _COMMAND[:] = ["python", "-m", module, *map(str, argv)]


def command_line() -> str:
    return " ".join(map(shlex.quote, _COMMAND)) if _COMMAND else " ".join(map(shlex.quote, ["python", *sys.argv]))


def check_attacks(names) -> list[str]:
    """Known attack names (or `all`), checked at config time, before anything is trained."""
    from .runner import ALL

    names = [str(n) for n in names]
    if not names:
        raise ConfigError("eval.attacks is empty; name at least one attack, or eval.attacks=[all]")
    for n in names:
        if n != ALL:
            ATTACKS.get(n)
    return names


def check_max_members(value) -> int | None:
    """eval.max_members: null (attack every member) or a positive number of members to attack."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise ConfigError(f"eval.max_members must be null (attack every member) or an integer >= 2 (got {value!r})")
    return value


def attacked_members(records, max_members, seed: int):
    """The members the attacks score: all of them, or a seeded random `max_members` of them.

    A uniform random subset leaves AUC and TPR@FPR unbiased (only their confidence intervals widen); it keeps
    the attacks' cost proportional to the non-members when a DP-scale recipe trains on thousands of rows."""
    limit = check_max_members(max_members)
    if limit is None or len(records) <= limit:
        return list(records)
    keep = np.sort(numpy_rng(seed, "members-attacked").choice(len(records), limit, replace=False))
    return [records[i] for i in keep]


def load_baseline(path) -> dict | None:
    if not path:
        return None
    report = Path(path) / "report.json" if Path(path).is_dir() else Path(path)
    if not report.is_file():
        raise ConfigError(f"eval.baseline={path!r} has no report.json; point it at a finished baseline run folder")
    return json.loads(report.read_text())


def baseline_fingerprint(path) -> dict | None:
    """The training-row fingerprint of a baseline: its report's `training_data`, else its split.json's."""
    report = load_baseline(path) or {}
    if report.get("training_data"):
        return report["training_data"]
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    manifest = folder / "split.json"
    if manifest.is_file():
        return json.loads(manifest.read_text()).get("training_fingerprint")
    return None


def check_baseline(path, training: dict | None) -> None:
    """Refuse a baseline that trained on other rows than this run: a comparison must be like-for-like."""
    if not path:
        return
    theirs = baseline_fingerprint(path)
    if theirs is None or training is None:
        raise ConfigError(f"eval.baseline={path!r}: cannot check that the baseline trained on this run's rows (no training "
                          "fingerprint in its report.json or split.json; it was made by an older privtune): re-train the "
                          "baseline, or drop eval.baseline")
    if theirs != training:
        raise ConfigError(f"eval.baseline={path!r} trained on other rows ({theirs['rows']} rows) than this run "
                          f"({training['rows']} rows, fingerprint {training['sha256'][:12]} vs {theirs['sha256'][:12]}); "
                          "a comparison must be like-for-like: train the baseline with this run's data, seed, data.members "
                          "and data.auxiliary_members (for mp_lora / smp_lora: recipe=lora data.auxiliary_members=<n>)")


def defense_summary(cfg) -> dict:
    """The trainer and the settings that define its defense (`report.defense_settings` against the root
    recipe's defaults), for the report and the card."""
    from ..config import load_config
    from .report import ROOT_RECIPE, defense_settings

    return defense_settings(to_container(cfg), to_container(load_config(ROOT_RECIPE)))


SINGLE_RELEASE = Release("lora", description="the exported LoRA (lora/) over the base model")
SINGLE_THREAT = ("white-box over the released file: the attacker holds the LoRA and the base model, queries their "
                 "noise predictions, and fits each attack's direction and threshold on calibration data of known membership")


def evaluate_model(*, cfg, components, unet, split, run_dir: Path, accelerator=None, lora_dir: Path | None = None,
                   privacy: dict | None = None, command: str | None = None, write: bool = True,
                   releases: list[Release] | None = None, combinations=(), threat_model: str | None = None,
                   evaluation_command: str | None = None, shadow_run: Path | None = None) -> dict:
    """Attack `unet` (base + LoRA, eval mode) on the split; returns the report dict (written when `write`).

    `releases` are what the run ships (default: the one LoRA): each is attacked in its own `context`,
    plus the per-sample best of each of `combinations`; utility and memorization are measured on the
    `deployed` release. The report's best attack is the strongest over all of them. With eval.shadow.enabled the
    shadow model cached in `shadow_run` (default `run_dir`) is trained first if needed (privtune.eval.shadow)."""
    ev = cfg.eval
    names = check_attacks(ev.attacks)
    is_main = accelerator is None or accelerator.is_main_process
    device = next(unet.parameters()).device
    was_training = unet.training
    unet.eval()
    target = attack_target(components, unet, ev, split.members + split.nonmembers, device, benchmark_of(cfg))
    predictor, alphas = target.predictor, target.alphas_cumprod
    member_records = attacked_members(split.members, ev.get("max_members"), int(cfg.seed))
    members = encode_records(components, member_records, cfg.data.resolution, device)
    nonmembers = encode_records(components, split.nonmembers, cfg.data.resolution, device)
    releases = [replace(r, target=target) for r in (releases or [SINGLE_RELEASE])]
    deployed = next((r for r in releases if r.deployed), releases[0])
    shadow = shadow_data(cfg, shadow_run or run_dir, device, accelerator) if ev.shadow.enabled else None
    with sharded(accelerator):
        result = run_release_attacks(releases, members, nonmembers, names, to_container(ev.attack_params),
                                     combinations=combinations, calibration_fraction=float(ev.calibration_fraction),
                                     seed=int(cfg.seed), batch_size=int(ev.batch_size), n_bootstrap=int(ev.bootstrap),
                                     progress=is_main, threat_model=threat_model or SINGLE_THREAT, shadow=shadow)
    result["protocol"]["deployed"] = deployed.name
    result["protocol"]["members_attacked"] = {"attacked": len(member_records), "of": len(split.members),
                                              "choice": "all" if len(member_records) == len(split.members)
                                              else "uniform random subset (eval.max_members)"}
    result["protocol"]["latents"] = LATENT_CHOICE
    result["protocol"]["guidance_scale"] = float(ev.guidance_scale)
    with deployed.context():
        report = _deployed_sections(cfg, components, unet, predictor, alphas, members, nonmembers, split, result, privacy,
                                    run_dir, accelerator, lora_dir, command, write, device, is_main, evaluation_command)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    if was_training:
        unet.train()
    return report


def attack_target(components, unet, ev, records, device, benchmark: str | None = None) -> AttackTarget:
    """What the attacks query: the UNet's noise predictions (with eval.guidance_scale), the scheduler's ᾱ_t, the
    empty-prompt state, the text encoder, the VAE decoder, the UNet itself (for gradient attacks) and, when an offline
    image encoder exists for the data (`benchmark`, or eval.clip_model), the generation API of the black-box attacks."""
    uncond = empty_prompt_state(components, device)
    predictor = UNetPredictor(unet, guidance_scale=float(ev.guidance_scale),
                              uncond=uncond if float(ev.guidance_scale) != 1.0 else None)
    return AttackTarget(predictor, components.noise_scheduler.alphas_cumprod.to(torch.float64), uncond=uncond,
                        token_lengths=token_lengths(components.tokenizer, records),
                        encode_text=text_encoder_fn(components, device), decode=decoder_fn(components), unet=unet,
                        generation=generation_api(components, unet, ev, benchmark, device))


def benchmark_of(cfg) -> str | None:
    """The embedded benchmark's name (portraits, emoji) when the run trains on one, else None."""
    from ..embedded import embedded, is_embedded

    return embedded(cfg.data.source).name if is_embedded(cfg.data.source) else None


def generation_api(components, unet, ev, benchmark: str | None, device):
    """The release behind a generation service (privtune.eval.generation): text-to-image with the utility generations'
    settings (eval.utility_inference_steps, eval.utility_guidance_scale; no inference-time mitigation, as an
    attacker holding the file runs it) and img2img through the same UNet. None when no offline encoder exists."""
    from .generation import image_encoder, pipeline_api

    if benchmark is None and not ev.get("clip_model"):
        return None
    encoder: dict = {}

    def embed(images):  # loaded on first use: only black-box attacks need it
        if "fn" not in encoder:
            encoder["fn"], encoder["what"] = image_encoder(benchmark, ev.get("clip_model"))
        return encoder["fn"](images)

    what = ("CLIP image embeddings (eval.clip_model)" if ev.get("clip_model") else
            "penultimate features of the shipped portraits attribute classifier" if benchmark == "portraits" else
            "fixed training-free image features (privtune.models.recognition)")
    return pipeline_api(pipeline_for(components, unet), components, UNetPredictor(unet), embed, what,
                        steps=int(ev.utility_inference_steps), guidance=float(ev.utility_guidance_scale), device=device)


def shadow_data(cfg, run_dir: Path, device, accelerator=None) -> ShadowData:
    """The `eval.shadow.count` shadow models (trained first when missing, on the main process), pooled: one base model
    holding each shadow's LoRA as its own adapter (adapter memory, not a model, per shadow), each shadow's members and
    non-members encoded like the target's with its adapter active."""
    from ..data.sources import load_source
    from ..data.split import load_manifest, split_from_manifest
    from ..models.loading import freeze, load_components
    from ..models.lora import load_lora
    from .shadow import ensure_shadows, shadow_folder, shadow_seed

    count = int(cfg.eval.shadow.count)
    if accelerator is None or accelerator.is_main_process:
        ensure_shadows(cfg, run_dir, progress=True)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    components = load_components(cfg.model)
    freeze(*components.modules())
    records = load_source(cfg.data).records
    folders = [shadow_folder(run_dir, i) for i in range(count)]
    with warnings.catch_warnings():  # peft warns that a second adapter makes a multi-adapter model: that is the point
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        for i, folder in enumerate(folders):
            load_lora(components, folder / "lora", adapter_name=f"shadow{i}")
    for m in components.modules():
        m.to(device)
    components.unet.eval()
    models, n_members = [], 0
    for i, folder in enumerate(folders):
        context = partial(_adapter_live, components, f"shadow{i}")
        split = split_from_manifest(load_manifest(folder), records)
        with context():
            target = attack_target(components, components.unet, cfg.eval, split.members + split.nonmembers, device,
                                   benchmark_of(cfg))
            members = encode_records(components, split.members, cfg.data.resolution, device)
            nonmembers = encode_records(components, split.nonmembers, cfg.data.resolution, device)
        models.append(CalibrationPart(target, members, nonmembers, context))
        n_members += len(split.members)
    seeds = ", ".join(str(shadow_seed(cfg, i)) for i in range(count))
    where = f"{SHADOWS}/{folders[0].name}" if count == 1 else f"{SHADOWS}/shadow-0..{count - 1}"
    return ShadowData(models, description=f"{where} ({count} model{'s' if count > 1 else ''}, seed{'s' if count > 1 else ''} "
                      f"{seeds}, {n_members} members, rows disjoint from the target's split)")


@contextmanager
def _adapter_live(components, name: str):
    """Shadow adapter `name` the active one of every LoRA layer holding it (UNet, and the text encoder when it has
    one), with every `requires_grad` flag kept; the layers' previous adapters on exit."""
    from ..models.lora import tuner_layers
    from ..models.methods import holds_adapter

    layers = [layer for m in (components.unet, components.text_encoder, components.text_encoder_2) if m is not None
              for layer in tuner_layers(m) if holds_adapter(layer, name)]
    flags = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
    before = [list(layer.active_adapters) for layer in layers]
    for layer in layers:
        layer.set_adapter(name)
    for p, flag in flags:
        p.requires_grad_(flag)
    try:
        yield
    finally:
        for layer, old in zip(layers, before):
            layer.set_adapter(old)
        for p, flag in flags:
            p.requires_grad_(flag)


def _deployed_sections(cfg, components, unet, predictor, alphas, members, nonmembers, split, result, privacy,
                       run_dir, accelerator, lora_dir, command, write, device, is_main, evaluation_command=None) -> dict | None:
    """Utility, memorization sections, the report and the card (main process), on the deployed release."""
    from .card import write_model_card
    from .report import build_report, log_report, write_report

    ev = cfg.eval
    report = None
    if is_main:
        utility = None
        if ev.utility:
            pipe = pipeline_for(components, unet)
            if cfg.get("sampling") is not None:
                from ..memorization.sampling import apply_sampling_options

                pipe = apply_sampling_options(pipe, cfg.sampling)
            from ..embedded import is_embedded

            bench = benchmark_of(cfg)
            grid = Path(run_dir) / "plots" / "generations.png" if write else None
            utility = compute_utility(predictor=predictor, members=members, nonmembers=nonmembers, alphas_cumprod=alphas,
                                      pipe=pipe, nonmember_records=split.nonmembers, eval_cfg=ev,
                                      embedded=is_embedded(cfg.model.base), seed=int(cfg.seed), benchmark=bench,
                                      grid_path=grid)
        command = command or command_line()
        report = build_report(config=to_container(cfg), attacks_result=result, utility=utility, privacy=privacy,
                              split_sizes={"members": len(split.members), "nonmembers": len(split.nonmembers)},
                              command=command, defense=defense_summary(cfg), baseline=load_baseline(ev.baseline))
        report["pipeline"] = "StableDiffusionXLPipeline" if components.sdxl else "StableDiffusionPipeline"
        report["adapter_method"] = str(cfg.lora.method)  # the card's loading snippet depends on it
        if split.training_fingerprint:
            report["training_data"] = split.training_fingerprint
        if evaluation_command:
            report["evaluation_command"] = evaluation_command
        report.update(memorization_sections(cfg, components, unet, predictor, alphas, split, run_dir if write else None,
                                            privacy, device, progress=is_main))
        if write:
            paths = write_report(run_dir, report)
            if accelerator is not None:  # at the last training step, beside the training curves (not at step 0)
                log_report(accelerator, report, paths, step=int(cfg.train.max_steps))
            if lora_dir is not None and Path(lora_dir).is_dir():
                forbidden = [r.caption for r in split.members + split.nonmembers] + [r.id for r in split.members + split.nonmembers]
                forbidden += [str(Path(run_dir).resolve()), str(run_dir)]
                write_model_card(lora_dir, report, base_model=base_model_name(cfg), license=str(ev.license),
                                 repro_command=command, forbidden=forbidden)
    return report


def memorization_sections(cfg, components, unet, predictor, alphas, split, run_dir, privacy, device, progress=True) -> dict:
    """`extraction` (eval.extraction.enabled) and `canaries` (canaries.enabled) report sections, with their plots."""
    from ..data.stage import DataStage

    out: dict = {}
    extraction = cfg.eval.get("extraction")
    stage = DataStage(cfg)
    stage.rebuild(split)
    if extraction is not None and extraction.enabled:
        from .extraction import run_extraction

        out["extraction"] = run_extraction(pipeline_for(components, unet), split.members, extraction,
                                           resolution=int(cfg.data.resolution), seed=int(cfg.seed),
                                           duplicated=stage.duplicated, out_dir=run_dir, progress=progress)
    if stage.canaries is not None:
        from .canaries import PLOT, audit, plot_exposure

        out["canaries"] = audit(predictor, alphas, components, stage.canaries, cfg.canaries, resolution=int(cfg.data.resolution),
                                seed=int(cfg.seed), device=device, privacy=privacy, batch_size=int(cfg.eval.batch_size))
        if run_dir is not None:
            plot_exposure(out["canaries"], Path(run_dir) / "plots" / PLOT)
            out["canaries"]["plot"] = f"plots/{PLOT}"
    return out


def token_lengths(tokenizer, records) -> dict[str, int]:
    """Tokenised caption length (BOS + tokens + first EOS) per record id, for Ren et al.'s mode D."""
    ids = tokenizer([r.caption for r in records], truncation=True, max_length=tokenizer.model_max_length).input_ids
    return {r.id: len(x) for r, x in zip(records, ids)}


def base_model_name(cfg) -> str:
    base = str(cfg.model.base)
    from ..embedded import embedded, is_embedded

    if is_embedded(base):
        return f"embedded:{embedded(base).name}"
    return "<local checkpoint>" if Path(base).exists() else base


def pipeline_for(components, unet, text_encoder=None, text_encoder_2=None):
    """A DDIM StableDiffusionPipeline (StableDiffusionXLPipeline for SDXL) over `components` with the given
    (LoRA-adapted) UNet."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    if components.sdxl:
        pipe = StableDiffusionXLPipeline(
            vae=components.vae, text_encoder=text_encoder or components.text_encoder,
            text_encoder_2=text_encoder_2 or components.text_encoder_2,
            tokenizer=components.tokenizer, tokenizer_2=components.tokenizer_2, unet=unet,
            scheduler=DDIMScheduler.from_config(components.noise_scheduler.config), force_zeros_for_empty_prompt=True,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe
    pipe = StableDiffusionPipeline(
        vae=components.vae, text_encoder=text_encoder or components.text_encoder, tokenizer=components.tokenizer, unet=unet,
        scheduler=DDIMScheduler.from_config(components.noise_scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
