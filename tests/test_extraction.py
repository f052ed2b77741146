"""Generate-and-filter extraction: the filter on a controlled generator, errors, and end to end on a duplicated LoRA."""

import json

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from privtune.data.sources import Record, content_hash
from privtune.errors import ConfigError
from privtune.eval import extraction

from .conftest import REPO


def node(**kw):
    base = dict(enabled=True, captions=6, generations=12, clique=5, delta=0.15, tiles=4, inference_steps=2, guidance_scale=3.0, pairs_png=4)
    return OmegaConf.create({**base, **kw})


def members(n=6):
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        im = Image.fromarray((rng.random((4, 4, 3)) * 255).astype("uint8")).resize((32, 32), Image.BICUBIC)
        out.append(Record(f"m{i}", f"caption {i}", im, f"m{i}", content_hash(im)))
    return out


def test_filter_flags_only_regenerated_members(tmp_path, monkeypatch):
    """A generator that regenerates (with small noise) m1 and m4 and returns random images otherwise."""
    recs = members()
    memorized = {"caption 1": recs[1], "caption 4": recs[4]}

    def fake_generate(pipe, captions, steps, guidance, seed, batch_size):
        rng = np.random.default_rng(seed)
        if captions[0] in memorized:
            base = np.asarray(memorized[captions[0]].image, dtype=np.float64)
            return np.clip(base + rng.normal(0, 4, (len(captions), 32, 32, 3)), 0, 255).astype(np.uint8)
        return (rng.random((len(captions), 32, 32, 3)) * 255).astype(np.uint8)

    monkeypatch.setattr(extraction.recognition, "generate", fake_generate)
    out = extraction.run_extraction(None, recs, node(), resolution=32, seed=0, duplicated={"m4": 50, "m1": 50},
                                    out_dir=tmp_path, progress=False)
    assert out["extracted_members"] == ["m1", "m4"] and out["n_flagged"] == 2
    assert [r["id"] for r in out["per_caption"]][:2] == ["m1", "m4"]  # duplicated captions attacked first
    sizes = {r["id"]: r["clique_size"] for r in out["per_caption"]}
    assert sizes["m1"] == sizes["m4"] == 12 and max(sizes[k] for k in sizes if k not in ("m1", "m4")) < 5
    assert sorted(p.name for p in (tmp_path / extraction.PAIRS_DIR).iterdir()) == ["m1.png", "m4.png"]
    json.dumps(out)


def test_bad_settings():
    with pytest.raises(ConfigError, match="exceeds"):
        extraction.check_settings(node(clique=20, generations=10), 32)
    with pytest.raises(ConfigError, match="delta"):
        extraction.check_settings(node(delta=2.0), 32)
    with pytest.raises(ConfigError, match="divide"):
        extraction.check_settings(node(tiles=5), 32)


def _extracted(run_dir):
    return json.loads((run_dir / "report.json").read_text())["extraction"]


@pytest.mark.slow
def test_duplicated_members_are_extracted_and_dedup_extracts_fewer(tmp_path, base_model):
    """A small LoRA with 2 of 8 members repeated 50x: exactly those are extracted; with dedup on, fewer."""
    from privtune.train import main

    common = [f"model.base={base_model}", "data.members=8", "data.nonmembers=8", "data.duplicate.members=2",
              "data.duplicate.repeats=50", "train.max_steps=300", "train.batch_size=8", "train.validation_every=0",
              "train.checkpoint_every=0", "eval.attacks=[loss]", "eval.utility=false", "eval.extraction.captions=8"]
    assert main(["recipe=duplicated", f"output_dir={tmp_path / 'lora'}", *common]) == 0
    assert main(["recipe=duplicated", f"output_dir={tmp_path / 'dedup'}", "dedup.enabled=true", *common]) == 0
    plain, deduped = _extracted(tmp_path / "lora"), _extracted(tmp_path / "dedup")
    print("extracted", plain["extracted_members"], "duplicated", plain["duplicated_members"],
          "dedup extracted", deduped["extracted_members"])
    assert plain["extracted_members"] == plain["duplicated_members"]
    assert deduped["n_extracted"] < plain["n_extracted"]
