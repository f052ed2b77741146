"""lora.method=lora|dora|lokr|loha: per-example gradients of every adapter tensor under DP-SGD (dp.grad_sample=vmap), the
exported file loading as the card says, and the kohya / LyCORIS file against kohya's naming and ComfyUI's formulas."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from privtune.export import KOHYA_FILE, LORA_FILE, save_kohya
from privtune.losses import denoising_loss
from privtune.models.methods import is_adapter_param
from privtune.models.lora import TARGET_PRESETS, add_lora, load_lora, lora_config, lora_state_dict, tuner_layers
from privtune.train import main

from .conftest import load_tiny, prepare_trainer, train_args

torch.set_num_threads(1)
METHODS = ("lora", "dora", "lokr", "loha")


def _dp_trainer(run, base_model, method, grad_sample="vmap", k=2):
    from privtune.config import load_config
    from privtune.trainers import get_trainer

    args = train_args(run, f"model.base={base_model}", "dp.target_epsilon=null", "dp.noise_multiplier=0", "dp.max_grad_norm=0.05",
                      f"dp.noise_multiplicity={k}", "dp.poisson=false", "dp.sampling_seed=3", "train.batch_size=3",
                      f"lora.method={method}", f"dp.grad_sample={grad_sample}", "lora.rank=2", "lora.alpha=2", steps=2)
    trainer = prepare_trainer(get_trainer("dpsgd")(load_config("dpsgd", args[1:])))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():  # off the zero-update initialization, where some factors get no gradient
        for p in trainer.trainable:
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return trainer


def _fixed_draws(trainer, n, k):
    gen = torch.Generator().manual_seed(1)
    batch = trainer.micro_batch(0)
    noise = torch.randn((n * k, *batch.latents.shape[1:]), generator=gen)
    timesteps = torch.randint(0, 1000, (n * k,), generator=gen)
    trainer.sample_noise = lambda latents: (noise[:len(latents)], timesteps[:len(latents)])
    return batch, noise, timesteps


@pytest.mark.parametrize("method", METHODS)
def test_dp_vmap_gives_every_adapter_tensor_its_exact_per_example_gradient(tmp_path, base_model, method):
    """dp.grad_sample=vmap: each example's gradient (mean over its K draws) of every trainable tensor, DoRA's magnitude
    vectors and the LoKr / LoHa factors included, equals one backward pass on that example alone, and is non-zero."""
    k = 2
    trainer = _dp_trainer(tmp_path / "run", base_model, method, k=k)
    assert trainer.grad_sampler is None
    batch, noise, timesteps = _fixed_draws(trainer, 3, k)
    n = len(batch.rows)
    grads, loss = trainer.example_grads(batch)
    unet, sched = trainer.components.unet, trainer.components.noise_scheduler
    names = {id(p): name for name, p in unet.named_parameters()}
    kinds = {next(part for part in names[id(p)].split(".") if is_adapter_param(part)) for p in trainer.trainable}
    expected = {"lora": {"lora_A", "lora_B"}, "dora": {"lora_A", "lora_B", "lora_magnitude_vector"},
                "lokr": {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}, "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}}[method]
    assert expected <= kinds, kinds
    losses = []
    for i in range(n):
        rows = slice(i * k, (i + 1) * k)
        latents, states = batch.latents[i:i + 1].repeat(k, 1, 1, 1), batch.encoder_hidden_states[i:i + 1].repeat(k, 1, 1)
        example = denoising_loss(unet, sched, latents, states, noise[rows], timesteps[rows]).mean()
        losses.append(float(example.detach()))
        ref = torch.autograd.grad(example, trainer.trainable)
        for p, got, want in zip(trainer.trainable, grads, ref):
            torch.testing.assert_close(got[i], want, rtol=1e-3, atol=1e-7, msg=lambda m: f"{names[id(p)]}: {m}")
            assert want.abs().max() > 0, names[id(p)]
    assert loss == pytest.approx(sum(losses) / n, rel=1e-4)


def test_dp_vmap_and_opacus_hooks_agree_on_lora(tmp_path, base_model):
    hooks = _dp_trainer(tmp_path / "hooks", base_model, "lora", grad_sample="hooks")
    vmap = _dp_trainer(tmp_path / "vmap", base_model, "lora", grad_sample="vmap")
    a, _, _ = _fixed_draws(hooks, 3, 2)
    b, _, _ = _fixed_draws(vmap, 3, 2)
    assert a.rows.tolist() == b.rows.tolist()
    for p, q in zip(hooks.trainable, vmap.trainable):
        assert torch.equal(p, q)
    g_hooks, loss_hooks = hooks.example_grads(a)
    g_vmap, loss_vmap = vmap.example_grads(b)
    assert loss_hooks == pytest.approx(loss_vmap, rel=1e-5)
    for x, y in zip(g_hooks, g_vmap):
        torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-8)


@pytest.mark.parametrize("method", ["dora", "loha"])
def test_dp_sgd_trains_and_releases_non_lora_adapters(tmp_path, base_model, method):
    """A DP-SGD run with DoRA / LoHa: clipped (norms logged), noised, accounted; its release loads back."""
    run = tmp_path / "run"
    assert main(["recipe=dpsgd", *train_args(run, f"model.base={base_model}", f"lora.method={method}", "dp.grad_sample=vmap",
                                             "dp.target_epsilon=null", "dp.noise_multiplier=1.0", "dp.noise_multiplicity=1",
                                             steps=2)[1:]]) == 0
    privacy = json.loads((run / "privacy.json").read_text())
    assert privacy["steps"] == 2 and privacy["epsilon"] > 0
    comps = load_tiny(base_model)
    load_lora(comps, run / "lora")
    assert lora_state_dict(comps.unet)


def _unet_output(unet):
    x = torch.randn(2, unet.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = torch.randn(2, 32, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return unet(x, torch.tensor([50, 700]), encoder_hidden_states=cond).sample


@pytest.mark.parametrize("method", ["lokr", "loha"])
def test_lycoris_release_is_attacked_and_loads_as_its_card_says(tmp_path, base_model, method):
    """A LoKr / LoHa run is evaluated (the attack loads its file), and the card's usage code, run as printed, gives a
    vanilla diffusers pipeline that predicts exactly what privtune loads."""
    run = tmp_path / "run"
    assert main(train_args(run, f"model.base={base_model}", f"lora.method={method}", "eval.enabled=true",
                           "eval.attacks=[loss]", "eval.utility=false", "eval.bootstrap=20", steps=3)) == 0
    report = json.loads((run / "report.json").read_text())
    assert report["adapter_method"] == method and report["attacks"]
    card = (run / "lora" / "README.md").read_text()
    code = card.split("```python\n")[1].split("```")[0].replace("path/to/this/lora", str(run / "lora"))
    code = "\n".join(line for line in code.splitlines() if not line.startswith("image = pipe("))  # sampling: test_train
    out_file = tmp_path / "theirs.pt"
    check = ("\nimport torch\ng = torch.Generator()\nx = torch.randn(2, pipe.unet.config.in_channels, 8, 8, generator=g.manual_seed(0))"
             "\ncond = torch.randn(2, 32, pipe.unet.config.cross_attention_dim, generator=g.manual_seed(1))"
             "\nwith torch.no_grad():\n    out = pipe.unet(x, torch.tensor([50, 700]), encoder_hidden_states=cond).sample"
             f"\ntorch.save(out, {str(out_file)!r})\n")
    base_line = next(line for line in code.splitlines() if ".from_pretrained(" in line)
    code = code.replace(base_line, f"pipe = StableDiffusionPipeline.from_pretrained({base_model!r}, use_safetensors=True)")
    done = subprocess.run([sys.executable, "-c", code + check], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    comps = load_tiny(base_model)
    base = _unet_output(comps.unet)
    load_lora(comps, run / "lora")
    ours = _unet_output(comps.unet)
    torch.testing.assert_close(torch.load(out_file), ours, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(ours, base, atol=1e-4)
    with safe_open(str(run / "lora" / LORA_FILE), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["unet.peft_type"] == method.upper()
    assert not any(word in json.dumps(meta) for word in ("caption", "seed", "/"))  # shapes only


# ---------------------------------------------------------------------------- kohya / LyCORIS files
def comfy_delta(tensors: dict[str, torch.Tensor], shape) -> torch.Tensor:
    """The weight update ComfyUI / A1111 build from one module's kohya-layout tensors (LyCORIS' formulas, written out
    here independently of privtune's exporter): LoRA up @ down, LoHa (w1a w1b) * (w2a w2b), LoKr w1 (x) w2, each times
    alpha / dim when the module is low-rank (dim: its rank), else 1."""
    alpha = tensors.get("alpha")
    if "lora_down.weight" in tensors:
        down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
        return (up.flatten(1) @ down.flatten(1) * (float(alpha) / down.shape[0])).reshape(shape)
    if "hada_w1_a" in tensors:
        w = (tensors["hada_w1_a"] @ tensors["hada_w1_b"]) * (tensors["hada_w2_a"] @ tensors["hada_w2_b"])
        return (w * (float(alpha) / tensors["hada_w1_b"].shape[0] if alpha is not None else 1.0)).reshape(shape)
    w1 = tensors["lokr_w1"] if "lokr_w1" in tensors else tensors["lokr_w1_a"] @ tensors["lokr_w1_b"]
    w2 = tensors["lokr_w2"] if "lokr_w2" in tensors else tensors["lokr_w2_a"] @ tensors["lokr_w2_b"]
    dim = tensors["lokr_w2_b"].shape[0] if "lokr_w2_b" in tensors else tensors["lokr_w1_b"].shape[0] if "lokr_w1_b" in tensors else None
    factor = float(alpha) / dim if alpha is not None and dim is not None else 1.0
    if w2.ndim == 4:
        w1 = w1[:, :, None, None]
    return (torch.kron(w1, w2) * factor).reshape(shape)


SUFFIXES = {"lora": {"lora_down.weight", "lora_up.weight", "alpha"},
            "lokr": {"lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"},
            "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}}


@pytest.mark.parametrize("preset", sorted(TARGET_PRESETS))
@pytest.mark.parametrize("method", ["lora", "lokr", "loha"])
def test_kohya_file_follows_kohya_naming_and_gives_peft_update(tmp_path, base_model, preset, method):
    """Every adapted module of a preset appears as lora_unet_<diffusers path with _>.<LyCORIS tensor>, nothing else,
    and ComfyUI's formulas on the file rebuild exactly the weight update peft applies."""
    comps = load_tiny(base_model)
    config = lora_config(4, 8, 0.0, preset, method)
    params = add_lora(comps.unet, config)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1)
    save_kohya(tmp_path / KOHYA_FILE, lora_state_dict(comps.unet), config)
    kohya = load_file(str(tmp_path / KOHYA_FILE))
    layers = {name: m for name, m in comps.unet.named_modules() if m in tuner_layers(comps.unet)}
    wanted = {"lora_unet_" + name.replace(".", "_"): m for name, m in layers.items()}
    assert len(wanted) == len(layers) and {k.split(".", 1)[0] for k in kohya} == set(wanted)
    assert all(any(name.endswith(t) for t in TARGET_PRESETS[preset]) for name in layers)
    for module, layer in wanted.items():
        tensors = {k.split(".", 1)[1]: v for k, v in kohya.items() if k.split(".", 1)[0] == module}
        assert set(tensors) <= SUFFIXES[method], (module, sorted(tensors))
        low_rank = method != "lokr" or any(k.endswith("_b") for k in tensors)  # a full-matrix LoKr is scaled by 1
        assert ("alpha" in tensors) == low_rank, (module, sorted(tensors))
        peft_delta = layer.get_delta_weight("default")
        torch.testing.assert_close(comfy_delta(tensors, peft_delta.shape), peft_delta, rtol=1e-4, atol=1e-6)
    with safe_open(str(tmp_path / KOHYA_FILE), "pt") as f:
        assert f.metadata()["ss_network_module"] == ("networks.lora" if method == "lora" else "lycoris.kohya")


@pytest.mark.parametrize("args, message", [
    (["recipe=dpsgd", "lora.method=dora"], "needs dp.grad_sample=vmap"),
    (["recipe=lora", "lora.method=dora", "export.kohya=true"], "no kohya file reproduces peft's DoRA"),
    (["recipe=lora", "lora.method=lokr", "lora.dropout=0.1"], "peft's LoKr / LoHa have no input dropout"),
    (["recipe=lora", "lora.method=loha", "lora.text_encoder=true"], "a LoRA in a LyCORIS file"),
    (["recipe=dualmd", "lora.method=lokr"], "loaded back and compared as LoRA tensors"),
    (["recipe=lora", "lora.method=ia3"], "lora.method"),
])
def test_adapter_methods_refused_where_they_cannot_work(tmp_path, base_model, capsys, args, message):
    run = tmp_path / "run"
    assert main([args[0], *train_args(run, f"model.base={base_model}", *args[1:])[1:]]) == 2
    assert message in capsys.readouterr().err and not (run / "config.yaml").exists()


def test_kohya_file_names_a_text_encoder_lora_as_kohya_does_for_sd1(tmp_path, base_model):
    comps = load_tiny(base_model)
    unet_config, text_config = lora_config(4, 4, 0.0, "attn"), lora_config(4, 8, 0.0, ["q_proj", "v_proj"])
    add_lora(comps.unet, unet_config)
    with torch.no_grad():
        for p in add_lora(comps.text_encoder, text_config):
            p.normal_(0, 0.1)
    save_kohya(tmp_path / KOHYA_FILE, lora_state_dict(comps.unet), unet_config, lora_state_dict(comps.text_encoder), text_config)
    kohya = load_file(str(tmp_path / KOHYA_FILE))
    layers = {"lora_te_" + name.replace(".", "_"): m for name, m in comps.text_encoder.named_modules()
              if m in tuner_layers(comps.text_encoder)}
    assert layers and {k.split(".", 1)[0] for k in kohya if k.startswith("lora_te")} == set(layers)
    for module, layer in layers.items():
        tensors = {k.split(".", 1)[1]: v for k, v in kohya.items() if k.split(".", 1)[0] == module}
        delta = layer.get_delta_weight("default")
        torch.testing.assert_close(comfy_delta(tensors, delta.shape), delta, rtol=1e-4, atol=1e-6)
