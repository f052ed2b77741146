"""Deduplication: which copies are grouped, what is kept, that it runs before the split, and its errors."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from privtune.data import embeddings
from privtune.data.dedup import CONTACT_SHEET, REPORT_JSON, DedupSettings, deduplicate
from privtune.data.similarity import tiled_l2, tiled_l2_matrix, tiled_pairs, to_pixels
from privtune.data.sources import Record, content_hash
from privtune.errors import ConfigError

from .conftest import train_args


def smooth_image(seed: int, size: int = 64) -> Image.Image:
    """A distinct, photo-like (smooth, asymmetric) test image."""
    rng = np.random.default_rng(seed)
    pixels = (rng.random((5, 5, 3)) * 255).astype("uint8")
    return Image.fromarray(pixels).resize((size, size), Image.BICUBIC)


def jpeg(image: Image.Image, quality: int = 75) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def record(rid: str, image: Image.Image, caption: str | None = None) -> Record:
    return Record(rid, caption or f"caption of {rid}", image, rid, content_hash(image))


COPIES = {
    "exact": lambda im: im.copy(),
    "jpeg": jpeg,
    "resized": lambda im: im.resize((56, 56), Image.BICUBIC),
    "cropped": lambda im: im.crop((2, 2, 62, 62)).resize((64, 64), Image.BICUBIC),
}


def corpus():
    """12 distinct images, then one copy of image k for each kind of copy k, then a mirrored copy of image 11."""
    originals = [record(f"img{i}", smooth_image(i)) for i in range(12)]
    copies = [record(f"copy-{kind}", make(originals[k].image)) for k, (kind, make) in enumerate(COPIES.items())]
    mirrored = record("copy-mirrored", originals[11].image.transpose(Image.FLIP_LEFT_RIGHT))
    return originals + copies + [mirrored]


def grouped_ids(result, records):
    return sorted(sorted(records[i].id for i in g) for g in result.groups)


EXPECTED = [["copy-cropped", "img3"], ["copy-exact", "img0"], ["copy-jpeg", "img1"], ["copy-resized", "img2"]]
PATHS = [dict(tiled_l2=0.1), dict(tiled_l2=None, embedding="features", cosine=0.95)]


@pytest.mark.parametrize("path", PATHS, ids=["tiled_l2", "embedding"])
def test_copies_grouped_distinct_kept(path):
    records = corpus()
    result = deduplicate(records, DedupSettings(**path))
    assert grouped_ids(result, records) == EXPECTED  # every copy kind, no distinct pair, no mirror without flip
    kept = [r.id for r in result.records]
    assert kept == [f"img{i}" for i in range(12)] + ["copy-mirrored"]  # first in source order is the representative
    assert result.records[0].captions == ["caption of img0", "caption of copy-exact"]


@pytest.mark.parametrize("path", PATHS, ids=["tiled_l2", "embedding"])
def test_flip_invariance_groups_mirrored(path):
    records = corpus()
    result = deduplicate(records, DedupSettings(flip=True, **path))
    assert grouped_ids(result, records) == sorted(EXPECTED + [["copy-mirrored", "img11"]])
    assert len(result.records) == 12


def test_tiled_l2_definition_and_search():
    a = to_pixels([smooth_image(0)], 32)
    b = a.copy()
    b[0, :8, :8] = 1.0  # one tile changed: the global distance is small, the tiled one is that tile's
    tile = np.sqrt(((a[0, :8, :8] - 1.0) ** 2).mean())
    assert tiled_l2(a, b, 4)[0] == pytest.approx(tile, rel=1e-5)
    assert np.sqrt(((a - b) ** 2).mean()) < tile
    x = to_pixels([smooth_image(i) for i in range(30)], 16)
    brute = tiled_l2_matrix(x, x, 4)
    delta = float(np.quantile(brute[np.triu_indices(30, 1)], 0.05))
    found = {(i, j) for i, j, _ in tiled_pairs(x, delta, 4)}
    assert found == {(i, j) for i in range(30) for j in range(i + 1, 30) if brute[i, j] <= delta}  # faiss finds all


def test_bad_settings_and_missing_embedding(monkeypatch):
    with pytest.raises(ConfigError, match="outside"):
        DedupSettings(tiled_l2=1.5).check()
    with pytest.raises(ConfigError, match="divide"):
        DedupSettings(resolution=16, tiles=5).check()
    with pytest.raises(ConfigError, match="unknown embedding 'clip'"):
        DedupSettings(embedding="clip").check()
    monkeypatch.setitem(embeddings.REQUIRES, "phash", ("privtune_no_such_module", "imagehash"))
    with pytest.raises(ConfigError, match="not installed.*pip install imagehash"):
        DedupSettings(embedding="phash").check()


def copies_folder(root, n=16):
    """n distinct images, each also present as a re-encoded copy under another id and group."""
    root.mkdir(parents=True)
    lines = []
    for i in range(n):
        image = smooth_image(100 + i, 32)
        image.save(root / f"a{i:02d}.png")
        jpeg(image, 90).save(root / f"b{i:02d}.png")
        lines += [json.dumps({"file_name": f"a{i:02d}.png", "caption": f"thing {i}"}),
                  json.dumps({"file_name": f"b{i:02d}.png", "caption": f"another thing {i}"})]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _trainer(run_dir, *extra):
    from privtune.config import load_config
    from privtune.trainers import get_trainer

    trainer = get_trainer("lora")(load_config("lora", train_args(run_dir, *extra)[1:]))
    for stage in ("validate_config", "setup_accelerator", "check_run_dir", "setup_data"):
        getattr(trainer, stage)()
    return trainer


def _contaminated(split) -> int:
    m = to_pixels([r.image for r in split.members], 16)
    n = to_pixels([r.image for r in split.nonmembers], 16)
    return int((tiled_l2_matrix(n, m, 4).min(axis=1) <= 0.1).sum())


def test_dedup_runs_before_the_split(tmp_path):
    data = copies_folder(tmp_path / "data")
    common = (f"data.source={data}", "data.group_column=null")
    plain = _trainer(tmp_path / "plain", *common)
    assert _contaminated(plain.split) > 0  # without dedup some non-members are copies of members
    deduped = _trainer(tmp_path / "dedup", *common, "dedup.enabled=true")
    assert len(deduped.source.records) == 16
    assert _contaminated(deduped.split) == 0
    assert all(len(r.captions) == 2 for r in deduped.split.members + deduped.split.nonmembers)
    deduped.write_run_files()
    report = json.loads((tmp_path / "dedup" / REPORT_JSON).read_text())
    assert report["n_groups"] == 16 and report["n_removed"] == 16 and report["groups"][0]["size"] == 2
    assert Image.open(tmp_path / "dedup" / CONTACT_SHEET).size[0] > 0


def test_duplicate_rows_recorded_and_collapsed_by_dedup(tmp_path):
    dup = ("data.duplicate.members=2", "data.duplicate.repeats=5")
    t = _trainer(tmp_path / "dup", *dup)
    assert len(t.train_records) == 8 + 2 * 4
    assert set(t.split.training_rows["duplicated"]) == {r.id.split("~dup")[0] for r in t.train_records if "~dup" in r.id}
    assert set(t.split.training_rows["duplicated"]) <= {r.id for r in t.split.members}
    t.write_run_files()
    assert json.loads((tmp_path / "dup" / "split.json").read_text())["training_rows"]["duplicate_rows_added"] == 8
    d = _trainer(tmp_path / "dedup", *dup, "dedup.enabled=true")
    assert [r.id for r in d.train_records] == [r.id for r in d.split.members]
    assert d.split.training_rows["duplicate_rows_removed_by_dedup"] == 8
