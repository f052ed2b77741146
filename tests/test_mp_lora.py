"""MP-LoRA / SMP-LoRA: loss formulas and gradients, frozen phases, the attacker's disjoint split, resume, errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from privtune.export import LORA_FILE
from privtune.losses import denoising_loss, loss_map, member_ce, mi_gain, mp_objective, smp_objective
from privtune.train import main

from .conftest import prepare_trainer, train_args

torch.set_num_threads(1)

SMALL = ("data.auxiliary_members=4", "mp.attacker_nonmembers=4")
PAPER = ("mp.cap_at_chance=false", "mp.privacy_gradient_scale=1")  # the paper's objective (smp_lora's defaults strengthen it)


def mp_args(recipe, run_dir, *extra, steps=3):
    return [f"recipe={recipe}", *train_args(run_dir, steps=steps)[1:], *SMALL, *extra]


def make_trainer(recipe, run_dir, *overrides, steps=3):
    from privtune.config import load_config
    from privtune.trainers import get_trainer

    cfg = load_config(recipe, mp_args(recipe, run_dir, *overrides, steps=steps)[1:])
    return get_trainer(cfg.trainer)(cfg)


def prepared(recipe, run_dir, *overrides):
    return prepare_trainer(make_trainer(recipe, run_dir, *overrides))


def fixed_draws(trainer, n_draws):
    """Replace the trainer's (noise, timestep) draws with a known sequence; returns the sequence."""
    gen = torch.Generator().manual_seed(3)
    shape = trainer.micro_batch(0).latents.shape
    draws = [(torch.randn(shape, generator=gen), torch.randint(0, 1000, (shape[0],), generator=gen)) for _ in range(n_draws)]
    it = iter(draws)
    trainer.sample_noise = lambda latents: next(it)
    return draws


# ------------------------------------------------------------------ formulas
def test_objectives_and_gain_match_hand_computation():
    logits = torch.tensor([[0.2, 1.0], [1.5, -0.5], [0.0, 0.0]])
    p_member = torch.softmax(logits, dim=1)[:, 1]
    ce = -(p_member.log()).mean()
    assert member_ce(logits).item() == pytest.approx(ce.item(), rel=1e-6)
    labels = torch.tensor([1, 0, 1])
    p_true = torch.softmax(logits, dim=1)[torch.arange(3), labels]
    assert mi_gain(logits, labels).item() == pytest.approx(p_true.log().mean().item(), rel=1e-6)
    assert mi_gain(logits, labels).item() <= 0
    assert mi_gain(torch.zeros(4, 2), torch.tensor([1, 0, 1, 0])).item() == pytest.approx(-math.log(2))
    l_ada, c = torch.tensor(0.3), torch.tensor(0.9)
    assert mp_objective(l_ada, c, 0.5).item() == pytest.approx(0.3 - 0.5 * 0.9)
    assert smp_objective(l_ada, c, 0.5, 1.0, 1e-5).item() == pytest.approx(0.3 / (1.0 + 0.45 + 1e-5))
    # a stronger attack term lowers both objectives: the LoRA is pushed to make members look like non-members
    assert mp_objective(l_ada, c + 1, 0.5) < mp_objective(l_ada, c, 0.5)
    assert smp_objective(l_ada, c + 1, 0.5, 1.0, 1e-5) < smp_objective(l_ada, c, 0.5, 1.0, 1e-5)


def test_smp_gradient_is_the_quotient_rule():
    theta = torch.tensor([0.7, -0.3, 1.2], requires_grad=True)
    l_ada = (theta ** 2).sum() * 0.1
    ce = torch.nn.functional.softplus(theta).sum()
    lam, beta, delta = 0.4, 1.0, 1e-5
    (grad,) = torch.autograd.grad(smp_objective(l_ada, ce, lam, beta, delta), theta)
    g_l = 0.2 * theta.detach()
    g_ce = torch.sigmoid(theta.detach())
    d = beta + lam * ce.detach() + delta
    expected = g_l / d - l_ada.detach() * lam * g_ce / d ** 2
    torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("recipe", ["mp_lora", "smp_lora"])
def test_defended_loss_equals_formula_on_a_fixed_batch(tmp_path, base_model, recipe):
    """compute_loss = the spec's formula: L_ada from draw 1, CE of the attacker on the loss map of draw 2."""
    lam, beta, delta = 0.7, 0.5, 0.25
    trainer = prepared(recipe, tmp_path / "run", f"model.base={base_model}", f"mp.lambda={lam}", f"mp.beta={beta}",
                       f"mp.delta={delta}", "mp.attacker_dropout=0", *PAPER)
    batch = trainer.micro_batch(0)
    (n1, t1), (n2, t2) = fixed_draws(trainer, 2)
    loss, logs = trainer.compute_loss(batch)
    comps = trainer.components
    with torch.no_grad():
        l_ada = denoising_loss(comps.unet, comps.noise_scheduler, batch.latents, batch.encoder_hidden_states, n1, t1).mean()
        feats = loss_map(comps.unet, comps.noise_scheduler, batch.latents, batch.encoder_hidden_states, n2, t2)
        logits = trainer.attacker(feats.flatten(1))
        ce = -torch.log_softmax(logits, dim=1)[:, 1].mean()
    want = l_ada - lam * ce if recipe == "mp_lora" else l_ada / (beta + lam * ce + delta)
    assert loss.item() == pytest.approx(want.item(), rel=1e-4)
    assert logs["l_ada"] == pytest.approx(l_ada.item(), rel=1e-4)
    assert logs["member_ce"] == pytest.approx(ce.item(), rel=1e-4)
    c = trainer.components.unet.config.in_channels
    assert feats.shape[1:] == (c, 8, 8) and trainer.attacker.in_features == c * 64


@pytest.mark.parametrize("recipe, scale", [("mp_lora", 1.0), ("smp_lora", 1 / (1.0 + 1e-5))])
def test_lambda_zero_is_plain_lora(tmp_path, base_model, recipe, scale):
    """With lambda = 0 the LoRA gradient is the plain denoising gradient (SMP: times 1 / (beta + delta))."""
    trainer = prepared(recipe, tmp_path / "run", f"model.base={base_model}", "mp.lambda=0")
    batch = trainer.micro_batch(0)
    (n1, t1), _ = fixed_draws(trainer, 2)
    loss, _ = trainer.compute_loss(batch)
    got = torch.autograd.grad(loss, trainer.trainable)
    comps = trainer.components
    plain = denoising_loss(comps.unet, comps.noise_scheduler, batch.latents, batch.encoder_hidden_states, n1, t1).mean()
    want = torch.autograd.grad(plain, trainer.trainable)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w * scale, rtol=1e-4, atol=1e-8)


def test_fixed_proxy_timesteps_average_draws_per_timestep(tmp_path, base_model):
    """mp.proxy_timesteps: the attack features are the per-t means over proxy_draws loss maps, concatenated."""
    trainer = prepared("smp_lora", tmp_path / "run", f"model.base={base_model}", "mp.proxy_timesteps=[100,300]",
                       "mp.proxy_draws=3", "mp.attacker_dropout=0", "mp.cap_at_chance=false")
    batch = trainer.micro_batch(0)
    n, c = batch.latents.shape[0], trainer.components.unet.config.in_channels
    assert trainer.attacker.in_features == 2 * c * 64
    gen = torch.Generator().manual_seed(5)
    first = (torch.randn(batch.latents.shape, generator=gen), torch.randint(0, 1000, (n,), generator=gen))
    expanded = torch.randn((n * 6, *batch.latents.shape[1:]), generator=gen)
    draws = iter([first, (expanded, torch.zeros(n * 6, dtype=torch.long))])
    trainer.sample_noise = lambda latents: next(draws)
    loss, logs = trainer.compute_loss(batch)
    comps = trainer.components
    with torch.no_grad():
        feats = []
        for i in range(n):
            per_t = []
            for j, t in enumerate((100, 300)):
                rows = expanded[i * 6 + j * 3:i * 6 + j * 3 + 3]
                maps = loss_map(comps.unet, comps.noise_scheduler, batch.latents[i:i + 1].repeat(3, 1, 1, 1),
                                batch.encoder_hidden_states[i:i + 1].repeat(3, 1, 1), rows, torch.full((3,), t))
                per_t.append(maps.mean(dim=0))
            feats.append(torch.cat(per_t))
        ce = member_ce(trainer.attacker(torch.stack(feats).flatten(1)))
    assert logs["member_ce"] == pytest.approx(ce.item(), rel=1e-4)


@pytest.mark.parametrize("recipe", ["mp_lora", "smp_lora"])
def test_privacy_gradient_scale_scales_only_the_attack_term(tmp_path, base_model, recipe):
    """The loss value is unchanged; the gradient is grad(L_ada part) + scale * grad(attack part)."""
    grads, values = {}, {}
    for scale in (0.0, 1.0, 3.0):
        trainer = prepared(recipe, tmp_path / f"run{scale}", f"model.base={base_model}", "mp.attacker_dropout=0",
                           f"mp.privacy_gradient_scale={scale}")
        batch = trainer.micro_batch(0)
        fixed_draws(trainer, 2)
        loss, _ = trainer.compute_loss(batch)
        values[scale] = loss.item()
        grads[scale] = torch.cat([g.flatten() for g in torch.autograd.grad(loss, trainer.trainable)])
    assert values[0.0] == pytest.approx(values[1.0], rel=1e-6) == pytest.approx(values[3.0], rel=1e-6)
    privacy = grads[1.0] - grads[0.0]
    assert privacy.norm() > 1e-4 * grads[0.0].norm()
    torch.testing.assert_close(grads[3.0], grads[0.0] + 3 * privacy, rtol=1e-3, atol=1e-7)


def test_cap_at_chance_stops_rewarding_members_pushed_past_chance(tmp_path, base_model):
    """Rows the attacker already calls non-members add log 2 and no gradient; the rest count as before."""
    trainer = prepared("smp_lora", tmp_path / "run", f"model.base={base_model}", "mp.cap_at_chance=true", "mp.attacker_dropout=0")
    n = trainer.micro_batch(0).latents.shape[0]
    features = torch.randn(n, trainer.attacker.in_features, requires_grad=True)
    last = [m for m in trainer.attacker.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([5.0, 0.0]))  # every row: confidently a non-member (CE ~ 5 > log 2)
    ce = trainer.attack_term(features)
    assert ce.item() == pytest.approx(math.log(2))
    (grad,) = torch.autograd.grad(ce, features, allow_unused=True)
    assert grad is None or grad.abs().max() == 0
    with torch.no_grad():
        last.bias.copy_(torch.tensor([0.0, 5.0]))  # confidently members: below the cap, unchanged from the paper's CE
    assert trainer.attack_term(features).item() == pytest.approx(member_ce(trainer.attacker(features)).item(), rel=1e-6)


# ------------------------------------------------------------------ the two phases
def snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def test_lora_phase_moves_only_lora_and_attacker_phase_only_the_attacker(tmp_path, base_model):
    trainer = prepared("smp_lora", tmp_path / "run", f"model.base={base_model}")
    unet = trainer.accelerator.unwrap_model(trainer.components.unet)
    unet0, att0 = snapshot(unet), snapshot(trainer.attacker)
    lora_names = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert lora_names and all("lora_" in n for n in lora_names)

    trainer.lora_phase(0)
    unet1, att1 = snapshot(unet), snapshot(trainer.attacker)
    for n in unet0:
        if n in lora_names:
            continue
        assert torch.equal(unet0[n], unet1[n]), f"base weight {n} moved in the LoRA phase"
    assert any(not torch.equal(unet0[n], unet1[n]) for n in lora_names), "no LoRA weight moved"
    assert all(torch.equal(att0[n], att1[n]) for n in att0), "the attacker moved in the LoRA phase"
    assert all(p.grad is None for p in trainer.attacker.parameters())
    assert not trainer.attacker_optimizer.state
    assert all(p.requires_grad for p in trainer.attacker.parameters())

    lora_state = {k: v.clone() if torch.is_tensor(v) else v
                  for k, v in trainer.optimizer.state_dict()["state"][0].items()}
    logs = trainer.attacker_phase(0)
    unet2, att2 = snapshot(unet), snapshot(trainer.attacker)
    assert all(torch.equal(unet1[n], unet2[n]) for n in unet1), "the UNet (base or LoRA) moved in the attacker phase"
    assert all(not torch.equal(att1[n], att2[n]) for n in att1 if n.endswith("weight")), "an attacker layer did not move"
    assert all(p.grad is None for p in trainer.trainable)
    after = trainer.optimizer.state_dict()["state"][0]
    assert all(torch.equal(lora_state[k], after[k]) for k in lora_state if torch.is_tensor(lora_state[k]))
    assert 0 <= logs["attacker_accuracy"] <= 1 and logs["attacker_gain"] <= 0


def test_attacker_learns_a_separable_toy(tmp_path, base_model):
    """With member loss maps clearly lower than non-members', the attacker update reaches high accuracy."""
    trainer = prepared("smp_lora", tmp_path / "run", f"model.base={base_model}", "mp.attacker_lr=1e-3")
    gen = torch.Generator().manual_seed(0)

    def toy_features(batch):
        n = batch.latents.shape[0] // 2
        base = torch.rand((2 * n, *batch.latents.shape[1:]), generator=gen) * 0.1
        return torch.cat([base[:n], base[n:] + 0.05])

    trainer.attacker_features = toy_features
    logs = [trainer.attacker_update(i) for i in range(150)]
    first = sum(entry["attacker_accuracy"] for entry in logs[:10]) / 10
    last = sum(entry["attacker_accuracy"] for entry in logs[-20:]) / 20
    assert last > 0.9 and last > first
    assert sum(e["attacker_gain"] for e in logs[-20:]) / 20 > sum(e["attacker_gain"] for e in logs[:10]) / 10


# ------------------------------------------------------------------ the attacker's split
def test_attacker_split_is_disjoint_from_the_evaluation_split(tmp_path, base_model):
    from privtune.defenses.attacker_split import ATTACKER_MANIFEST

    trainer = make_trainer("smp_lora", tmp_path / "run", f"model.base={base_model}", "data.auxiliary_members=6",
                           "mp.attacker_nonmembers=5")
    prepare_trainer(trainer)
    trainer.write_run_files()
    split, aux = trainer.split, trainer.attacker_split
    assert (len(aux.members), len(aux.nonmembers)) == (6, 5)
    evaluation = split.members + split.nonmembers
    for key in ("id", "sha256", "group"):
        seen = {getattr(r, key) for r in evaluation}
        assert not seen & {getattr(r, key) for r in aux.members + aux.nonmembers}, f"attacker rows share a {key} with evaluation rows"
    assert [r.id for r in trainer.train_records] == [r.id for r in split.members + aux.members]
    # every row an attacker update reads is an attacker-split row, with the right label
    aux_m, aux_n = {r.id for r in aux.members}, {r.id for r in aux.nonmembers}
    for index in range(5):
        rows_m, _ = trainer.aux_member_schedule.rows(index)
        rows_n, _ = trainer.aux_nonmember_schedule.rows(index)
        batch, labels = trainer.attacker_batch(index)
        ids = [trainer.encoded_records[int(r)].id for r in batch.rows]
        assert ids[:len(rows_m)] and set(ids[:len(rows_m)]) <= aux_m and set(ids[len(rows_m):]) <= aux_n
        assert labels.tolist() == [1] * len(rows_m) + [0] * len(rows_n)
    manifest = json.loads((tmp_path / "run" / ATTACKER_MANIFEST).read_text())
    assert [r["id"] for r in manifest["members"]] == [r.id for r in aux.members]
    assert [r["id"] for r in manifest["nonmembers"]] == [r.id for r in aux.nonmembers]
    eval_manifest = json.loads((tmp_path / "run" / "split.json").read_text())
    eval_ids = {r["id"] for r in eval_manifest["members"] + eval_manifest["nonmembers"]}
    assert not eval_ids & {r["id"] for r in manifest["members"] + manifest["nonmembers"]}


def test_overlapping_attacker_split_is_refused():
    from privtune.data.split import Split
    from privtune.defenses.attacker_split import check_attacker_disjoint, unused_records
    from privtune.data.sources import Record
    from privtune.errors import DataError

    rec = [Record(f"r{i}", f"c{i}", None, f"g{i // 2}", f"h{i}") for i in range(8)]
    split = Split(rec[:2], rec[2:4], 0, "")
    check_attacker_disjoint(split, Split(rec[4:6], rec[6:8], 0, ""))
    with pytest.raises(DataError, match="overlap the evaluation split"):
        check_attacker_disjoint(split, Split([rec[4], rec[0]], rec[6:8], 0, ""))
    with pytest.raises(DataError, match="overlap the evaluation split"):
        check_attacker_disjoint(split, Split(rec[4:6], [rec[3]], 0, ""))
    near_duplicate = Record("r9", "c9", None, "g1", "h9")  # same group as evaluation non-members r2, r3
    with pytest.raises(DataError, match="overlap the evaluation split"):
        check_attacker_disjoint(split, Split(rec[4:6], [near_duplicate], 0, ""))
    assert near_duplicate not in unused_records(rec + [near_duplicate], split)


# ------------------------------------------------------------------ resume, errors, report
def test_resume_restores_attacker_and_both_optimizers(tmp_path, base_model):
    full, part = tmp_path / "full", tmp_path / "part"
    common = (f"model.base={base_model}",)
    a = make_trainer("smp_lora", full, *common, steps=4)
    a.run()
    make_trainer("smp_lora", part, *common, steps=2).run()
    b = make_trainer("smp_lora", part, *common, "resume=latest", steps=4)
    b.run()
    wa, wb = load_file(str(full / "lora" / LORA_FILE)), load_file(str(part / "lora" / LORA_FILE))
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-7)
    for (n, pa), (_, pb) in zip(a.attacker.named_parameters(), b.attacker.named_parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-7, msg=n)
    sa, sb = a.attacker_optimizer.state_dict()["state"], b.attacker_optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys() and int(sa[0]["step"]) == int(sb[0]["step"]) == 4 * int(a.cfg.mp.attacker_steps)
    for i in sa:
        torch.testing.assert_close(sa[i]["exp_avg"], sb[i]["exp_avg"], rtol=1e-5, atol=1e-8)
    la, lb = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    for i in la:
        torch.testing.assert_close(la[i]["exp_avg_sq"], lb[i]["exp_avg_sq"], rtol=1e-5, atol=1e-12)
    assert len(a.attacker_state.history) == len(b.attacker_state.history) == 4
    for ra, rb in zip(a.attacker_state.history, b.attacker_state.history):
        assert ra == pytest.approx(rb, rel=1e-5)
    csv = (part / "proxy_attacker.csv").read_text().splitlines()
    assert csv[0].startswith("step,accuracy,gain") and [int(r.split(",")[0]) for r in csv[1:]] == [1, 2, 3, 4]


@pytest.mark.parametrize("recipe, args, message", [
    ("mp_lora", ["mp.lambda=-0.1"], "mp.lambda must be a finite number >= 0"),
    ("smp_lora", ["mp.beta=-1", "mp.delta=0.5"], "mp.beta + mp.delta must be > 0"),
    ("smp_lora", ["mp.beta=0", "mp.delta=0"], "mp.beta + mp.delta must be > 0"),
    ("smp_lora", ["data.auxiliary_members=0"], "split would be empty"),
    ("mp_lora", ["mp.attacker_nonmembers=0"], "split would be empty"),
    ("smp_lora", ["data.auxiliary_members=1000"], "cannot draw the proxy attacker's split"),
    ("smp_lora", ["mp.attacker_steps=0"], "mp.attacker_steps must be >= 1"),
    ("smp_lora", ["mp.attacker_dropout=1"], "mp.attacker_dropout must be in [0, 1)"),
    ("smp_lora", ["mp.lamda=1"], "unknown key 'mp.lamda'"),
    ("smp_lora", ["mp.proxy_timesteps=[1000]"], "mp.proxy_timesteps must be null"),
    ("smp_lora", ["mp.proxy_timesteps=[100]", "mp.shared_forward=true"], "cannot be combined with mp.proxy_timesteps"),
    ("smp_lora", ["mp.proxy_draws=0"], "mp.proxy_draws must be >= 1"),
    ("smp_lora", ["mp.privacy_gradient_scale=-1"], "mp.privacy_gradient_scale must be a finite number >= 0"),
])
def test_bad_settings_fail_before_training(tmp_path, base_model, capsys, recipe, args, message):
    run = tmp_path / "run"
    assert main(mp_args(recipe, run, f"model.base={base_model}", *args)) == 2
    assert message in capsys.readouterr().err
    assert not (run / "config.yaml").exists() and not (run / "attacker_split.json").exists()


def test_report_and_card_name_the_defense(tmp_path, base_model):
    """An end-to-end run with evaluation: report, card and run files describe SMP-LoRA and its settings."""
    run = tmp_path / "run"
    assert main(mp_args("smp_lora", run, f"model.base={base_model}", "eval.enabled=true", "eval.attacks=[loss]",
                        "eval.utility=false", "eval.bootstrap=20", "eval.attack_params={loss: {timesteps: [100], draws: 1}}",
                        "mp.lambda=0.5", steps=2)) == 0
    report = json.loads((run / "report.json").read_text())
    assert report["defense"]["name"] == "smp_lora"
    assert report["defense"]["settings"]["mp"]["lambda"] == 0.5
    privacy = report["privacy"]
    assert privacy["defense"].startswith("SMP-LoRA") and privacy["lambda"] == 0.5
    assert privacy["smp_beta"] == 1.0 and privacy["smp_delta"] == 1e-5
    assert "smp_delta: 1e-05" in (run / "report.md").read_text()
    assert 0 <= privacy["proxy_attacker_final_accuracy"] <= 1
    assert report["split_sizes"] == {"members": 8, "nonmembers": 8}
    md = (run / "report.md").read_text()
    assert "smp_lora" in md and "mp.lambda=0.5" in md and "formal_guarantee" in md
    card = (run / "lora" / "README.md").read_text()
    assert "smp_lora" in card and "`mp` settings" in card and "No formal guarantee" in card
    assert (run / "proxy_attacker.png").stat().st_size > 1000


@pytest.mark.slow
def test_smp_lora_two_processes(tmp_path, base_model):
    """`accelerate launch` with 2 processes: one batched UNet forward per LoRA step, attacker gradients averaged."""
    import subprocess
    import sys

    from .conftest import REPO

    run = tmp_path / "run"
    import os

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "privtune.train",
           *mp_args("smp_lora", run, f"model.base={base_model}", "train.batch_size=2", steps=3)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=900,
                         env={**os.environ, "ACCELERATE_USE_CPU": "true"})  # two gloo processes on a CPU machine
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("privtune: run folder") == 2
    weights = load_file(str(run / "lora" / LORA_FILE))
    assert weights and all(torch.isfinite(w).all() for w in weights.values())
    rows = (run / "proxy_attacker.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == [1, 2, 3]
    assert all(math.isfinite(float(v)) for r in rows for v in r.split(",")[1:])
