"""Data sources, validation errors, and the member / non-member split."""


import pytest
from omegaconf import OmegaConf

from privtune.config import load_config
from privtune.data.sources import load_source
from privtune.data.split import check_disjoint, load_manifest, make_split, save_manifest, split_from_manifest
from privtune.errors import DataError

from .conftest import make_image_folder


def data_cfg(**kw):
    cfg = OmegaConf.to_container(load_config("lora").data)
    cfg.update(kw)
    return OmegaConf.create(cfg)


@pytest.mark.parametrize("source, rows", [("embedded", 1004), ("embedded:portraits", 1004), ("embedded:emoji", 480)])
def test_embedded_pool_loads_with_groups(source, rows):
    src = load_source(data_cfg(source=source))
    assert len(src.records) == rows
    assert all(r.caption and r.image.size == (32, 32) for r in src.records)
    assert len({r.group for r in src.records}) < len(src.records)  # renders of one identity / skin-tone variants


def test_imagefolder(tmp_path):
    folder = make_image_folder(tmp_path / "data", n=10)
    src = load_source(data_cfg(source=str(folder)))
    assert [r.id for r in src.records][:2] == ["img000.png", "img001.png"]
    assert src.records[3].caption == "a picture number 3"


def test_missing_path_is_named(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_source(data_cfg(source=str(tmp_path / "nowhere")))


def test_corrupt_image_names_the_file_and_skip_counts(tmp_path):
    folder = make_image_folder(tmp_path / "data", n=6)
    (folder / "img002.png").write_bytes(b"this is not a png")
    with pytest.raises(DataError, match=r"corrupt image .*img002\.png.*on_bad_sample=skip"):
        load_source(data_cfg(source=str(folder)))
    src = load_source(data_cfg(source=str(folder), on_bad_sample="skip"))
    assert len(src.records) == 5 and len(src.skipped) == 1 and src.skipped[0]["id"] == "img002.png"


def test_empty_caption_names_the_file(tmp_path):
    folder = make_image_folder(tmp_path / "data", n=4, captions=["a", "  ", "c", "d"])
    with pytest.raises(DataError, match=r"empty caption .*img001\.png"):
        load_source(data_cfg(source=str(folder)))


def test_empty_data_set(tmp_path):
    folder = make_image_folder(tmp_path / "data", n=3, captions=["", "", ""])
    with pytest.raises(DataError, match="no usable samples"):
        load_source(data_cfg(source=str(folder), on_bad_sample="skip"))


def test_oversize_image_follows_on_bad_sample(tmp_path, monkeypatch):
    """A decompression bomb is an error naming the file, or one skipped and counted sample."""
    from PIL import Image

    folder = make_image_folder(tmp_path / "data", n=4)
    Image.new("L", (64, 64)).save(folder / "img001.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1024)  # 64 x 64 > 2 x 1024: PIL refuses, as at 15000 x 15000
    with pytest.raises(DataError, match=r"img001\.png .* is too large to decode safely.*on_bad_sample=skip"):
        load_source(data_cfg(source=str(folder)))
    src = load_source(data_cfg(source=str(folder), on_bad_sample="skip"))
    assert len(src.records) == 3 and src.skipped[0]["id"] == "img001.png"


def test_transparency_is_composited_on_white(tmp_path):
    from PIL import Image

    folder = make_image_folder(tmp_path / "data", n=2)
    rgba = Image.new("RGBA", (32, 32), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    rgba.save(folder / "img000.png")
    image = load_source(data_cfg(source=str(folder))).records[0].image
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (255, 255, 255) and image.getpixel((5, 5)) == (255, 0, 0)


def test_images_below_the_resolution_are_warned_about(tmp_path, capsys):
    from PIL import Image

    folder = make_image_folder(tmp_path / "data", n=3)
    Image.new("RGB", (1, 1)).save(folder / "img002.png")
    assert len(load_source(data_cfg(source=str(folder))).records) == 3
    err = capsys.readouterr().err
    assert "1 of 3 images are smaller than data.resolution=32" in err and "1x1" in err and "img002.png" in err


def test_folder_without_metadata_says_so(tmp_path):
    folder = make_image_folder(tmp_path / "data", n=2)
    (folder / "metadata.jsonl").unlink()
    with pytest.raises(DataError, match=r"has no metadata.jsonl; write one JSON line per image"):
        load_source(data_cfg(source=str(folder)))


def test_empty_or_partial_model_folder_says_what_is_missing(tmp_path):
    from privtune.errors import ModelError
    from privtune.models.loading import resolve_base

    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=r"'.*empty' is empty: a Stable Diffusion checkpoint in diffusers layout needs"):
        resolve_base(str(tmp_path / "empty"))
    (tmp_path / "part" / "unet").mkdir(parents=True)
    with pytest.raises(ModelError, match=r"lacks tokenizer, text_encoder, vae, scheduler"):
        resolve_base(str(tmp_path / "part"))


def test_split_is_seeded_disjoint_and_keeps_groups():
    records = load_source(data_cfg()).records
    a = make_split(records, 40, 40, seed=3)
    b = make_split(records, 40, 40, seed=3)
    c = make_split(records, 40, 40, seed=4)
    assert [r.id for r in a.members] == [r.id for r in b.members]
    assert [r.id for r in a.members] != [r.id for r in c.members]
    assert len(a.members) == 40 and len(a.nonmembers) == 40
    assert not {r.group for r in a.members} & {r.group for r in a.nonmembers}


def test_one_per_group_split_has_no_near_duplicates():
    """The duplicated benchmark's split: one seeded row per group, so the pool's skin-tone families vanish."""
    records = load_source(data_cfg(source="embedded:emoji")).records
    assert len({r.group for r in records}) < len(records)  # the pool has multi-row groups
    a = make_split(records, 64, 64, seed=0, one_per_group=True)
    rows = a.members + a.nonmembers
    assert len(a.members) == 64 and len({r.group for r in rows}) == len(rows) == 128
    assert [r.id for r in make_split(records, 64, 64, seed=0, one_per_group=True).members] == [r.id for r in a.members]
    plain = make_split(records, 64, 64, seed=0)
    assert len({r.group for r in plain.members}) < 64  # without it, families sit whole in the members
    with pytest.raises(DataError, match="one row per group"):
        make_split(records, 300, 100, seed=0, one_per_group=True)


def test_too_many_members_is_clear():
    records = load_source(data_cfg()).records
    with pytest.raises(DataError, match=r"exceeds the 1004 usable samples"):
        make_split(records, 900, 200, seed=0)


def test_manifest_round_trip_and_overlap_refused(tmp_path):
    records = load_source(data_cfg()).records
    split = make_split(records, 16, 16, seed=0)
    save_manifest(split, tmp_path)
    again = split_from_manifest(load_manifest(tmp_path), records)
    assert [r.sha256 for r in again.members] == [r.sha256 for r in split.members]
    manifest = split.manifest()
    manifest["nonmembers"].append(manifest["members"][0])
    import json

    (tmp_path / "bad.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="overlap"):
        load_manifest(tmp_path / "bad.json")
    with pytest.raises(DataError, match="overlap"):
        check_disjoint(split.members, split.members[:1])
