"""Real-architecture pipelines built offline (privtune.models.arch) and SDXL through privtune's one code path.

The published configs are checked on the meta device (no memory); a width-scaled SDXL (every structural
feature kept) trains, is attacked, exports and loads in a vanilla StableDiffusionXLPipeline; the full-width
SD v1.5 run is the slow test at the end.
"""

from __future__ import annotations

import json
import resource

import pytest
import torch
from safetensors.torch import load_file

from privtune.models import arch as arch_mod
from privtune.models.conditioning import encode, tokenize
from privtune.train import main as train_main

from .conftest import load_tiny, prepare_trainer

# Transcribed from the published checkpoints' config.json files (runwayml/stable-diffusion-v1-5,
# stabilityai/stable-diffusion-xl-base-1.0) and their parameter counts.
PUBLISHED = {
    "sd15": dict(unet=dict(block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768, attention_head_dim=8,
                           sample_size=64, layers_per_block=2, addition_embed_type=None),
                 text=[dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12)],
                 params=dict(unet=859_520_964, vae=83_653_863, text_encoder=123_060_480)),
    "sdxl": dict(unet=dict(block_out_channels=[320, 640, 1280], cross_attention_dim=2048, attention_head_dim=[5, 10, 20],
                           transformer_layers_per_block=[1, 2, 10], sample_size=128, addition_embed_type="text_time",
                           addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, use_linear_projection=True),
                 text=[dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
                       dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=20, projection_dim=1280)],
                 params=dict(unet=2_567_463_684, vae=83_653_863, text_encoder=123_060_480, text_encoder_2=694_659_840)),
}


def _listed(value):
    return list(value) if isinstance(value, (tuple, list)) else value


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_configs_equal_the_published_architectures(name):
    parts = arch_mod.build_modules(arch_mod.ARCHS[name], "meta")
    want = PUBLISHED[name]
    unet = parts["unet"].config
    for key, value in want["unet"].items():
        assert _listed(unet[key]) == value, (key, unet[key])
    encoders = [parts[k].config for k in ("text_encoder", "text_encoder_2") if k in parts]
    assert len(encoders) == len(want["text"])
    for got, spec in zip(encoders, want["text"]):
        assert got.max_position_embeddings == 77 and got.vocab_size == 49408
        assert {k: getattr(got, k) for k in spec} == spec
    assert {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()} == want["params"]
    assert parts["vae"].config.scaling_factor == (0.18215 if name == "sd15" else 0.13025)


def test_scaling_keeps_every_structural_feature():
    full, small = arch_mod.SDXL, arch_mod.scaled(arch_mod.SDXL, 8)
    assert small.unet["cross_attention_dim"] == sum(t["hidden_size"] for t in small.text_encoders) == 2048 // 8
    assert small.unet["projection_class_embeddings_input_dim"] == small.text_encoders[1]["projection_dim"] + 6 * 32
    assert small.unet["attention_head_dim"] == full.unet["attention_head_dim"]
    assert small.unet["down_block_types"] == full.unet["down_block_types"] and small.text_classes == full.text_classes
    with pytest.raises(ValueError, match="heads"):
        arch_mod.scaled(arch_mod.SD15, 16)  # 320 / 16 = 20 channels cannot hold 8 heads


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    return str(arch_mod.build_pipeline(arch_mod.scaled(arch_mod.SDXL, 8), tmp_path_factory.mktemp("sdxl") / "sdxl-8"))


def test_built_sdxl_loads_in_the_vanilla_pipeline_with_clip_tokenizers(sdxl_folder):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_folder, use_safetensors=True)
    for tok in (pipe.tokenizer, pipe.tokenizer_2):
        ids = tok("pixel art portrait, glasses", padding="max_length", max_length=tok.model_max_length).input_ids
        assert len(ids) == 77 and ids[0] == 49406 and ids[ids.index(49407) - 1] != 49407
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer.pad_token == "<|endoftext|>"
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"


def test_packed_conditioning_equals_the_sdxl_pipeline_call(sdxl_folder):
    """privtune's packed states [B, 78, D] give the UNet exactly what the SDXL pipeline's own call gives it."""
    comps = load_tiny(sdxl_folder)
    assert comps.sdxl
    captions = ["pixel art portrait, glasses", "a portrait"]
    states = encode(comps, tokenize(comps, captions))
    assert states.shape == (2, 78, 256)
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(vae=comps.vae, text_encoder=comps.text_encoder, text_encoder_2=comps.text_encoder_2,
                                     tokenizer=comps.tokenizer, tokenizer_2=comps.tokenizer_2, unet=comps.unet,
                                     scheduler=comps.noise_scheduler)
    prompt_embeds, _, pooled, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False)
    sample, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 500])
    time_ids = torch.tensor([[64, 64, 0, 0, 64, 64]] * 2, dtype=torch.float32)
    with torch.no_grad():
        ours = comps.unet(sample, t, encoder_hidden_states=states).sample
        theirs = comps.unet(sample, t, encoder_hidden_states=prompt_embeds,
                            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        other = comps.unet(sample, t, encoder_hidden_states=encode(comps, tokenize(comps, ["blue background"] * 2))).sample
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours, other)


def _run_args(folder, run, *extra, steps=2, recipe="lora"):
    return [f"recipe={recipe}", f"model.base={folder}", f"output_dir={run}", f"train.max_steps={steps}", "train.batch_size=4",
            "data.members=8", "data.nonmembers=8", "data.resolution=64", "lora.rank=4", "lora.alpha=4",
            "train.validation_every=0", "train.checkpoint_every=0", "eval.attacks=[loss,secmi,pia]", "eval.utility=false",
            *extra]


def test_sdxl_lora_trains_is_attacked_and_exports_to_vanilla(sdxl_folder, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    run = tmp_path / "run"
    train_main(_run_args(sdxl_folder, run))
    report = json.loads((run / "report.json").read_text())
    for name in ("loss", "secmi", "pia"):
        metrics = report["attacks"][name]["metrics"]
        assert metrics["n_members"] == metrics["n_nonmembers"] == 4 and 0.0 <= metrics["auc"]["value"] <= 1.0
    card = (run / "lora" / "README.md").read_text()
    assert "StableDiffusionXLPipeline.from_pretrained" in card and "StableDiffusionPipeline" not in card
    saved = load_file(str(run / "lora" / "pytorch_lora_weights.safetensors"))
    assert saved and all(k.startswith("unet.") for k in saved)
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_folder, use_safetensors=True)
    pipe.load_lora_weights(str(run / "lora"))
    loaded = {n: p for n, p in pipe.unet.named_parameters() if "lora_B" in n}
    assert loaded and any(p.abs().sum() > 0 for p in loaded.values())  # lora_B starts at zero: the trained values arrived
    image = pipe("pixel art portrait", height=64, width=64, num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 64, 64, 3)


@pytest.mark.parametrize("grad_sample, method", [("hooks", "lora"), ("vmap", "dora")])
def test_sdxl_dp_sgd_clips_every_per_sample_gradient(sdxl_folder, tmp_path, grad_sample, method):
    """Opacus' hooks (LoRA) and torch.func over the whole UNet (DoRA) both see SDXL's packed condition."""
    from privtune.config import load_config
    from privtune.trainers import get_trainer

    c = 0.05
    args = _run_args(sdxl_folder, tmp_path / "dp", "dp.target_epsilon=null", "dp.noise_multiplier=0", f"dp.max_grad_norm={c}",
                     "dp.noise_multiplicity=2", "dp.poisson=false", f"dp.grad_sample={grad_sample}", f"lora.method={method}",
                     recipe="dpsgd")
    trainer = prepare_trainer(get_trainer("dpsgd")(load_config("dpsgd", args[1:])))
    batch = trainer.micro_batch(0)
    assert batch.encoder_hidden_states.shape[1:] == (78, 256)
    grads, _ = trainer.example_grads(batch)
    assert len(grads) == len(trainer.trainable) and all(g.shape[0] == len(batch.rows) for g in grads)
    clipped, norms = trainer.clip(grads)
    assert (norms > c).all()
    per_sample = torch.sqrt(sum((g.flatten(1) ** 2).sum(1) for g in clipped))
    assert torch.all(per_sample <= c * (1 + 1e-5))


def test_sdxl_text_encoder_lora_trains_both_encoders_and_loads_in_vanilla(sdxl_folder, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from privtune.models.lora import load_lora, lora_state_dict

    run = tmp_path / "run"
    train_main(_run_args(sdxl_folder, run, "lora.text_encoder=true", "eval.enabled=false"))
    saved = load_file(str(run / "lora" / "pytorch_lora_weights.safetensors"))
    prefixes = {k.split(".")[0] for k in saved}
    assert prefixes == {"unet", "text_encoder", "text_encoder_2"}
    trained = {k: v for k, v in saved.items() if k.startswith("text_encoder_2.") and "lora_B" in k}
    assert trained and any(v.abs().sum() > 0 for v in trained.values())  # lora_B starts at zero: it trained
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_folder, use_safetensors=True)
    pipe.load_lora_weights(str(run / "lora"))
    assert any("lora" in n for n, _ in pipe.text_encoder_2.named_parameters())
    comps = load_tiny(sdxl_folder)
    load_lora(comps, run / "lora")  # privtune's own loader (evaluation) takes both encoders' weights too
    assert len(lora_state_dict(comps.text_encoder_2)) == sum(k.startswith("text_encoder_2.") for k in saved)


@pytest.mark.parametrize("extra", ["export.kohya=true", "sampling.ren_mitigation=true", "memorization_filter.method=wen"])
def test_sdxl_refuses_what_it_cannot_do_before_writing(sdxl_folder, tmp_path, capsys, extra):
    run = tmp_path / "run"
    assert train_main(_run_args(sdxl_folder, run, extra)) == 2
    err = capsys.readouterr().err
    assert "is an SDXL checkpoint" in err and extra.split("=")[0] in err
    assert not run.exists() or not any(run.iterdir())


@pytest.mark.slow
def test_full_width_sd15_architecture_end_to_end(tmp_path):
    """The published SD v1.5 widths (860 M UNet parameters) at 64 px: 2 LoRA steps with the loss / SecMI / PIA
    attacks on 4 + 4 samples, 1 DP-SGD step, export, vanilla load. Measured: 5.5 min, 11.1 GB peak RSS on one core here."""
    from diffusers import StableDiffusionPipeline

    folder = arch_mod.build_pipeline(arch_mod.SD15, tmp_path / "sd15", dtype=torch.float16)
    run = tmp_path / "run"
    train_main(_run_args(folder, run))
    report = json.loads((run / "report.json").read_text())
    assert {"loss", "secmi", "pia"} <= set(report["attacks"])
    train_main(_run_args(folder, tmp_path / "dp", recipe="dpsgd", steps=1))
    assert json.loads((tmp_path / "dp" / "privacy.json").read_text())["epsilon"] > 0
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), use_safetensors=True, torch_dtype=torch.float32)
    pipe.load_lora_weights(str(run / "lora"))
    assert pipe("pixel art portrait", height=64, width=64, num_inference_steps=2, output_type="np").images.shape == (1, 64, 64, 3)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak RSS {peak_gb:.1f} GB")
    assert peak_gb < 24
