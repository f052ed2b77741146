"""Caption randomization (Somepalli et al. 2023): seeded, rate ~ p, BOS/EOS untouched, embedding noise only in training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from privtune.data.captions import CaptionRandomizer, check_config
from privtune.errors import ConfigError

from .conftest import prepare_trainer, train_args

torch.set_num_threads(1)

CAPTION = "a smiling yellow face with open mouth"


def section(**kw):
    base = dict(p=0.1, multiple=False, separator="|", insert_tokens=0, repeat_words=0, embedding_noise=0.0)
    base.update(kw)
    return OmegaConf.create(base)


@pytest.fixture(scope="module")
def tokenizer(base_model):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(base_model, subfolder="tokenizer")


def test_seeded_and_pure_function_of_step_and_row(tokenizer):
    a = CaptionRandomizer(section(p=0.5, insert_tokens=2, repeat_words=2), seed=3, tokenizer=tokenizer)
    b = CaptionRandomizer(section(p=0.5, insert_tokens=2, repeat_words=2), seed=3, tokenizer=tokenizer)
    c = CaptionRandomizer(section(p=0.5, insert_tokens=2, repeat_words=2), seed=4, tokenizer=tokenizer)
    keys = [(s, r) for s in range(20) for r in range(5)]
    da = [a.draw(CAPTION, s, r).caption for s, r in keys]
    assert da == [b.draw(CAPTION, s, r).caption for s, r in reversed(keys)][::-1]  # order of calls does not matter
    assert da != [c.draw(CAPTION, s, r).caption for s, r in keys]
    assert any(d != CAPTION for d in da) and any(d == CAPTION for d in da)


@pytest.mark.parametrize("kind", ["insert_tokens", "repeat_words"])
def test_rate_is_close_to_p(tokenizer, kind):
    p = 0.3
    rz = CaptionRandomizer(section(p=p, **{kind: 2}), seed=0, tokenizer=tokenizer)
    n = 3000
    changed = sum(rz.draw(CAPTION, s, 0).randomized for s in range(n))
    assert abs(changed / n - p) < 4 * np.sqrt(p * (1 - p) / n)
    assert rz.stats()["rate"] == changed / n


def test_inserted_tokens_are_words_and_bos_eos_untouched(tokenizer):
    rz = CaptionRandomizer(section(p=1.0, insert_tokens=2, repeat_words=2), seed=0, tokenizer=tokenizer)
    vocab = set(rz.vocab)
    original = CAPTION.split()
    for s in range(50):
        text = rz.draw(CAPTION, s, 1).caption
        words = text.split()
        assert len(words) == len(original) + 4
        it = iter(words)  # the original words survive, in order, as a subsequence: insertions are at word boundaries
        assert all(w in it for w in original)
        extra = list(words)
        for w in original:
            extra.remove(w)
        assert sum(w in vocab for w in extra) >= 2 and all(w in vocab or w in original for w in extra)
        ids = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
        unpadded = tokenizer(text, truncation=True, max_length=tokenizer.model_max_length).input_ids
        assert ids[0] == tokenizer.bos_token_id
        assert unpadded[-1] == tokenizer.eos_token_id and unpadded.count(tokenizer.bos_token_id) == 1


def test_multiple_captions_draw_every_variant(tokenizer):
    rz = CaptionRandomizer(section(multiple=True, p=0.0), seed=0, tokenizer=tokenizer)
    caption = "a red apple | an apple, red | fruit"
    assert rz.base(caption) == "a red apple"
    seen = {rz.draw(caption, s, 0).caption for s in range(200)}
    assert seen == {"a red apple", "an apple, red", "fruit"}

    class Rec:  # a record carrying its captions as a list (deduplication merges them so)
        caption = "first"
        captions = ["first", "second"]

    assert rz.base(Rec()) == "first" and {rz.draw(Rec(), s, 0).caption for s in range(50)} == {"first", "second"}
    assert CaptionRandomizer(section(), seed=0).variants(Rec()) == ["first"]  # multiple off: the caption only


@pytest.mark.parametrize("bad", [dict(p=1.5), dict(p=-0.1), dict(insert_tokens=-1), dict(embedding_noise=-0.1),
                                 dict(multiple=True, separator="")])
def test_bad_settings_are_clear_errors(bad):
    with pytest.raises(ConfigError, match="captions"):
        check_config(section(**bad))


def make_trainer(run_dir, base_model, *extra):
    from privtune.config import load_config
    from privtune.trainers import get_trainer

    cfg = load_config("lora", train_args(run_dir, f"model.base={base_model}", *extra)[1:])
    return prepare_trainer(get_trainer("lora")(cfg))


def test_trainer_reencodes_randomized_rows_and_adds_noise_only_in_training(tmp_path, base_model):
    from privtune.eval.encode import encode_records

    lam = 0.1
    trainer = make_trainer(tmp_path / "run", base_model, "captions.p=0.5", "captions.insert_tokens=2",
                           f"captions.embedding_noise={lam}")
    assert trainer.cache is not None  # frozen text encoder: clean embeddings cached, variants encoded per step
    rows, _ = trainer.schedule.rows(0)
    batch = trainer.micro_batch(0)
    rz = CaptionRandomizer(trainer.cfg.captions, trainer.cfg.seed, trainer.components.tokenizer)
    noise = rz.embedding_noise(batch.encoder_hidden_states.shape, 0, rows)
    with torch.no_grad():
        for i, r in enumerate(rows):
            draw = rz.draw(trainer.train_records[r], 0, r)
            clean = trainer.encode_text(trainer.tokenize([draw.caption]))[0]
            torch.testing.assert_close(batch.encoder_hidden_states[i], clean + noise[i], rtol=1e-5, atol=1e-5)
    assert 0.05 < float((batch.encoder_hidden_states - trainer.cache["text"][torch.as_tensor(rows)]).std()) < 0.5
    # the attacks and generations encode captions without any noise or randomization
    enc = encode_records(trainer.components, trainer.split.members, trainer.cfg.data.resolution, trainer.device)
    torch.testing.assert_close(enc.cond, trainer.cache["text"], rtol=1e-5, atol=1e-5)
    assert trainer.pipeline() .__class__.__name__ == "StableDiffusionPipeline"


def test_recorded_in_run_metadata(tmp_path, base_model):
    import json

    from privtune.train import main

    run = tmp_path / "run"
    assert main(train_args(run, f"model.base={base_model}", "captions.p=0.5", "captions.repeat_words=2", steps=3)) == 0
    assert "repeat_words: 2" in (run / "config.yaml").read_text()
    stats = json.loads((run / "memorization.json").read_text())["captions"]
    assert stats["p"] == 0.5 and stats["rows_seen"] == 12 and 0 < stats["rows_randomized"] < 12
