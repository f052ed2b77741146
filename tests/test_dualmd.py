"""DualMD: disjoint halves, A/B alternation in sampling and in the attacked predictor, export, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from privtune.export import LORA_FILE
from privtune.train import main

from .conftest import prepare_trainer, train_args

torch.set_num_threads(1)


def dual_args(run_dir, *extra, steps=4):
    return ["recipe=dualmd", *train_args(run_dir, steps=steps)[1:], *extra]


def reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def adapter_weights(run_dir, sub):
    return load_file(str(run_dir / "lora" / sub / LORA_FILE))


def test_halves_disjoint_covering_reproducible():
    from privtune.trainers.dualmd import split_halves

    groups = [f"g{i // 3}" if i < 30 else f"s{i}" for i in range(70)]  # some 3-row groups of near-duplicates
    records = [SimpleNamespace(group=g) for g in groups]
    a, b = split_halves(records, seed=5)
    assert not set(a) & set(b) and sorted(a + b) == list(range(70))
    assert abs(len(a) - len(b)) <= 3
    assert not {groups[i] for i in a} & {groups[i] for i in b}, "a group straddles the halves"
    assert split_halves(records, seed=5) == (a, b)
    assert split_halves(records, seed=6) != (a, b)
    with pytest.raises(Exception, match="at least two groups"):
        split_halves([SimpleNamespace(group="x")] * 4, seed=0)


def two_adapter_components(base_model):
    """The tiny SD with LoRA adapters A and B of random (different, non-zero) weights."""
    from privtune.models.loading import freeze, load_components
    from privtune.models.lora import add_lora, lora_config, use_adapter

    comps = load_components(SimpleNamespace(base=base_model, revision=None, variant=None, allow_unsafe_weights=False))
    freeze(comps.vae, comps.text_encoder, comps.unet)
    config = lora_config(4, 4, 0.0, "attn")
    gen = torch.Generator().manual_seed(0)
    for name in ("A", "B"):
        for p in add_lora(comps.unet, config, name):
            p.data = torch.randn(p.shape, generator=gen) * 0.3
            p.requires_grad_(False)
    use_adapter(comps.unet, "A")
    comps.unet.eval()
    return comps


def spy_lora_calls(unet):
    """Record, per UNet call, which adapters' lora_A of the first attention projection ran and on how many rows."""
    from privtune.models.lora import tuner_layers

    layer = next(m for m in tuner_layers(unet) if "A" in m.lora_A)
    calls = []
    unet.register_forward_pre_hook(lambda m, a: calls.append([]))
    for name in ("A", "B"):
        layer.lora_A[name].register_forward_hook(lambda m, i, o, name=name: calls[-1].append((name, i[0].shape[0])))
    return calls


def generate(pipe, steps=5, guidance=3.0, prompts=("red apple", "blue heart")):
    out = pipe(list(prompts), num_inference_steps=steps, guidance_scale=guidance, generator=torch.Generator().manual_seed(3),
               height=32, width=32, output_type="np")
    return torch.from_numpy(out.images)


def test_sampling_alternates_a_even_b_odd_same_adapter_for_both_guidance_halves(base_model):
    from privtune.eval.stage import pipeline_for
    from privtune.models.alternation import alternate_in_pipeline
    from privtune.models.lora import active_adapter, lora_state_dict

    comps = two_adapter_components(base_model)
    pipe = pipeline_for(comps, comps.unet)
    calls = spy_lora_calls(comps.unet)
    with alternate_in_pipeline(pipe) as alt:
        images = generate(pipe, steps=5)
    # one UNet call per step; CFG's conditional and unconditional halves (2 prompts x 2 = 4 rows) share the adapter
    assert calls == [[("A", 4)], [("B", 4)], [("A", 4)], [("B", 4)], [("A", 4)]]
    assert alt.history == [(0, "A"), (1, "B"), (2, "A"), (3, "B"), (4, "A")]
    assert active_adapter(comps.unet) == "A"
    with alternate_in_pipeline(pipe):
        again = generate(pipe, steps=5)
    assert torch.equal(images, again), "seeded alternating sampling is not reproducible"
    only_a = generate(pipe, steps=5)
    assert (images - only_a).abs().max() > 1e-3, "alternating A/B should differ from A alone"

    # B := A: alternating sampling equals single-model sampling with A
    state = lora_state_dict(comps.unet, "A")
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(comps.unet, state, adapter_name="B")
    calls.clear()
    with alternate_in_pipeline(pipe):
        same = generate(pipe, steps=5)
    assert [c[0][0] for c in calls] == ["A", "B", "A", "B", "A"]
    torch.testing.assert_close(same, only_a, rtol=0, atol=1e-6)


def test_attacked_predictor_is_the_alternating_one(base_model):
    """UNetPredictor through the hook equals A at timesteps of even DDIM steps and B at odd ones (t=0: last step)."""
    from privtune.eval.primitives import UNetPredictor
    from privtune.models.alternation import AdapterAlternation, ddim_timesteps, step_index
    from privtune.models.lora import use_adapter

    comps = two_adapter_components(base_model)
    sched = ddim_timesteps(comps.noise_scheduler.config, 4)
    assert step_index(sched, sched).tolist() == [0, 1, 2, 3]
    assert step_index(sched, torch.tensor([999, int(sched[1]) + 1, 0])).tolist() == [0, 0, 3]
    x = torch.randn(2, comps.unet.config.in_channels, 4, 4, generator=torch.Generator().manual_seed(0))
    cond = torch.randn(2, comps.tokenizer.model_max_length, comps.unet.config.cross_attention_dim,
                       generator=torch.Generator().manual_seed(1))
    predictor = UNetPredictor(comps.unet)

    def plain(name, t):
        use_adapter(comps.unet, name)
        return predictor(x, torch.full((2,), t), cond)

    queries = [int(sched[0]), int(sched[1]), int(sched[2]) + 5, 0, 100]
    reference = {t: {n: plain(n, t) for n in ("A", "B")} for t in queries}
    with AdapterAlternation(comps.unet, sched):
        for t in queries:
            want = "A" if int(step_index(sched, torch.tensor([t]))[0]) % 2 == 0 else "B"
            got = predictor(x, torch.full((2,), t), cond)
            assert torch.equal(got, reference[t][want]), (t, want)
            assert not torch.equal(got, reference[t]["B" if want == "A" else "A"])
        with pytest.raises(Exception, match="mixes timesteps"):
            predictor(x, torch.tensor([int(sched[0]), int(sched[1])]), cond)


def test_each_adapter_trains_on_its_own_half(tmp_path, base_model):
    from privtune.config import load_config
    from privtune.models.lora import active_adapter
    from privtune.trainers import get_trainer

    trainer = prepare_trainer(get_trainer("dualmd")(load_config("dualmd", dual_args(tmp_path / "run", f"model.base={base_model}")[1:])))
    seen = {"A": set(), "B": set()}
    compute = trainer.compute_loss

    def spy(batch):
        seen[active_adapter(trainer.unet)].update(batch.rows.tolist())
        assert len(batch.rows) == trainer.cfg.train.batch_size // 2
        return compute(batch)

    trainer.compute_loss = spy
    before = {n: [p.detach().clone() for p in ps] for n, ps in trainer.adapter_params.items()}
    for s in range(4):
        trainer.optimizer_step(s)
    assert seen["A"] and seen["B"]
    assert seen["A"] <= set(trainer.halves[0]) and seen["B"] <= set(trainer.halves[1])
    for name, params in trainer.adapter_params.items():
        assert any(not torch.equal(b, p) for b, p in zip(before[name], params)), name
    group = trainer.optimizer.param_groups[0]["params"]
    assert {id(p) for p in group} == {id(p) for ps in trainer.adapter_params.values() for p in ps}


def test_run_exports_both_adapters_and_plain_diffusers_helper_matches(tmp_path, base_model):
    run = tmp_path / "run"
    assert main(dual_args(run, f"model.base={base_model}", "optim.lr=1e-2", steps=3)) == 0
    halves = json.loads((run / "dualmd_halves.json").read_text())
    members = [r["id"] for r in json.loads((run / "split.json").read_text())["members"]]
    assert sorted(halves["A"] + halves["B"]) == sorted(members) and not set(halves["A"]) & set(halves["B"])
    a, b = adapter_weights(run, "adapter_a"), adapter_weights(run, "adapter_b")
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    assert (run / "lora" / "dualmd_sampling.py").is_file() and (run / "lora" / "dualmd.json").is_file()

    script = tmp_path / "vanilla.py"
    script.write_text(
        "import sys, numpy, torch\n"
        "sys.path.insert(0, sys.argv[2])\n"
        "from diffusers import StableDiffusionPipeline\n"
        "from dualmd_sampling import load_dualmd, generate\n"
        "base = StableDiffusionPipeline.from_pretrained(sys.argv[1], safety_checker=None, requires_safety_checker=False)\n"
        "pipe = load_dualmd(base, sys.argv[2])\n"
        "pipe.set_progress_bar_config(disable=True)\n"
        "out = generate(pipe, ['red apple', 'blue heart'], num_inference_steps=5, guidance_scale=3.0, height=32, width=32,\n"
        "               generator=torch.Generator().manual_seed(3), output_type='np')\n"
        "assert not any(m.startswith('privtune') for m in sys.modules)\n"
        "numpy.save(sys.argv[3], out.images)\n")
    out = subprocess.run([sys.executable, str(script), base_model, str(run / "lora"), str(tmp_path / "img.npy")],
                         capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""}, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    vanilla = torch.from_numpy(np.load(tmp_path / "img.npy"))

    from privtune.eval.stage import pipeline_for
    from privtune.models.alternation import alternate_in_pipeline
    from privtune.models.loading import freeze, load_components
    from privtune.models.lora import load_adapter, lora_config

    comps = load_components(SimpleNamespace(base=base_model, revision=None, variant=None, allow_unsafe_weights=False))
    freeze(comps.vae, comps.text_encoder, comps.unet)
    config = lora_config(4, 4, 0.0, "full")
    for name, sub in (("A", "adapter_a"), ("B", "adapter_b")):
        load_adapter(comps.unet, run / "lora" / sub / LORA_FILE, config, name)
    pipe = pipeline_for(comps, comps.unet)
    with alternate_in_pipeline(pipe):
        ours = generate(pipe, steps=5)
    torch.testing.assert_close(vanilla, ours, rtol=0, atol=2e-4)


def test_evaluation_attacks_every_release(tmp_path, base_model, monkeypatch):
    """The stage gets the released files (adapter_a, adapter_b), their best-of combination, and the deployed
    alternating sampler, whose context switches adapters by the DDIM step of each call's timestep."""
    import privtune.eval.stage as stage
    from privtune.models.alternation import ddim_timesteps
    from privtune.models.lora import active_adapter

    seen = {}

    def fake_evaluate(*, cfg, components, unet, releases, combinations, threat_model, **kwargs):
        sched = ddim_timesteps(components.noise_scheduler.config, int(cfg.dualmd.inference_steps))
        x = torch.zeros(1, unet.config.in_channels, 4, 4)
        cond = torch.zeros(1, components.tokenizer.model_max_length, unet.config.cross_attention_dim)
        for release in releases:
            order = []
            with release.context():
                for t in (sched[0], sched[1], sched[2], torch.tensor(0)):
                    unet(x, t.view(1), encoder_hidden_states=cond)
                    order.append(active_adapter(unet))
            seen[release.name] = (order, release.deployed)
        seen["combinations"], seen["threat"] = combinations, threat_model
        return {}

    monkeypatch.setattr(stage, "evaluate_model", fake_evaluate)
    run = tmp_path / "run"
    assert main(dual_args(run, f"model.base={base_model}", "eval.enabled=true", "eval.utility_inference_steps=4", steps=1)) == 0
    assert seen["alternating"] == (["A", "B", "A", "B"], True)  # t=0 belongs to the last (4th, odd) step
    assert seen["adapter_a"] == (["A"] * 4, False) and seen["adapter_b"] == (["B"] * 4, False)
    assert seen["combinations"] == [("adapter_a", "adapter_b")]
    assert "adapter_a, adapter_b" in seen["threat"]


def test_resume_equals_uninterrupted(tmp_path, base_model):
    full, part = tmp_path / "full", tmp_path / "part"
    common = (f"model.base={base_model}", "lora.dropout=0.1")
    assert main(dual_args(full, *common, steps=4)) == 0
    reset_accelerate()
    assert main(dual_args(part, *common, steps=2)) == 0
    reset_accelerate()
    assert main(dual_args(part, *common, "resume=latest", steps=4)) == 0
    for sub in ("adapter_a", "adapter_b"):
        a, b = adapter_weights(full, sub), adapter_weights(part, sub)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("args, message", [
    (["train.batch_size=3"], "make it even"),
    (["lora.text_encoder=true"], "UNet adapters only"),
])
def test_bad_config(tmp_path, base_model, capsys, args, message):
    assert main(dual_args(tmp_path / "run", f"model.base={base_model}", *args)) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_standalone_evaluate_of_a_dualmd_run_matches_the_automatic_stage(tmp_path, base_model):
    from privtune.evaluate import main as evaluate_main

    run = tmp_path / "run"
    fast = ("eval.enabled=true", "eval.attacks=[loss,pia]", "eval.bootstrap=20", "eval.utility=false",
            "eval.attack_params={loss: {timesteps: [100, 300], draws: 1}, pia: {timesteps: [100, 300]}}")
    assert main(dual_args(run, f"model.base={base_model}", "optim.lr=1e-2", *fast, steps=2)) == 0
    card = (run / "lora" / "README.md").read_text()
    assert "dualmd_sampling" in card and "load_dualmd" in card
    reset_accelerate()
    assert evaluate_main([f"run={run}", f"out={tmp_path / 'again'}"]) == 0
    first = json.loads((run / "report.json").read_text())
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    names = {f"{a}@{r}" for a in ("loss", "pia") for r in ("alternating", "adapter_a", "adapter_b", "best(adapter_a,adapter_b)")}
    assert set(first["attacks"]) == names
    best = max(v["metrics"]["auc"]["value"] for v in first["attacks"].values())
    assert first["summary"]["best_attack"]["auc"]["value"] == best
    for name in names:
        assert first["attacks"][name]["samples"]["scores"] == pytest.approx(again["attacks"][name]["samples"]["scores"], rel=1e-5)


def test_prompt_diversification_draws_one_of_a_members_captions(tmp_path, base_model):
    from privtune.config import load_config
    from privtune.trainers import get_trainer

    trainer = prepare_trainer(get_trainer("dualmd")(load_config("dualmd", dual_args(tmp_path / "run", f"model.base={base_model}")[1:])))
    for r in trainer.train_records:
        r.captions = [r.caption, f"{r.caption} glyph"]  # several captions, as deduplication merges them
    trainer.setup_caption_choices()
    used = set()
    with torch.no_grad():
        for step in range(4):
            batch = trainer.micro_batch(step, trainer.half_schedules[0])
            again = trainer.micro_batch(step, trainer.half_schedules[0])
            torch.testing.assert_close(batch.encoder_hidden_states, again.encoder_hidden_states)  # seeded per (step, row)
            for state, row in zip(batch.encoder_hidden_states, batch.rows.tolist()):
                options = trainer.caption_choices[row]
                encoded = trainer.encode_text(trainer.tokenize(options))
                match = [k for k in range(2) if torch.allclose(state, encoded[k], atol=1e-5)]
                assert len(match) == 1
                used.add(match[0])
    assert used == {0, 1}
