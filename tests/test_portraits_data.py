"""The embedded portraits data set: licences, subsets, held-out combinations, captions, determinism.

Everything but the determinism test reads only the shipped parquet (no build dependencies needed).
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "privtune" / "assets" / "portraits"
PARQUET = ASSETS / "portraits.parquet"
SCRIPT = REPO / "scripts" / "build_portraits_dataset.py"
ALLOWED = {"CC0-1.0", "CC-BY-4.0"}


def _script():
    """The build script as a module (its constants and caption helpers import without the build deps)."""
    spec = importlib.util.spec_from_file_location("build_portraits_dataset", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def build():
    return _script()


@pytest.fixture(scope="module")
def table():
    """The shipped parquet without the image column, as a list of row dicts."""
    pq = pytest.importorskip("pyarrow.parquet")
    columns = [c for c in pq.read_schema(PARQUET).names if c != "image"]
    return pq.read_table(PARQUET, columns=columns).to_pylist()


def test_loads_with_datasets_and_images_decode():
    import io

    import datasets
    from PIL import Image

    ds = datasets.Dataset.from_parquet(str(PARQUET))
    assert {"image", "caption", "id", "group", "subset", "style"} <= set(ds.column_names)
    cells = ds.cast_column("image", datasets.Image(decode=False)).select(range(0, len(ds), 997))["image"]
    for cell in cells:
        image = Image.open(io.BytesIO(cell["bytes"]))
        assert image.format == "PNG" and image.mode == "RGB" and image.size == (32, 32)


def test_licences_are_allowed_and_cc_by_styles_are_attributed(table):
    licences = {r["style"]: r["license"] for r in table}
    assert {r["license"] for r in table} <= ALLOWED
    assert all(licences[r["style"]] == r["license"] for r in table)  # one licence per style
    notice = (ASSETS / "NOTICE").read_text(encoding="utf-8")
    for style, licence in licences.items():
        if licence == "CC-BY-4.0":
            block = re.search(rf'^Style "{re.escape(style)}" .*?license CC-BY-4\.0\n(.*?)\n\n', notice, re.M | re.S)
            assert block, f"NOTICE does not attribute CC BY style {style!r}"
            assert "Artist:" in block.group(1) and "creativecommons.org/licenses/by/4.0" in block.group(1)


def test_licences_match_the_style_definitions(table, build):
    """With the build deps installed: the per-row licence is the one DiceBear's style file declares."""
    pytest.importorskip("dicebear_styles")
    for name in {r["dicebear_style"] for r in table}:
        info = build.license_info(name)
        assert {r["license"] for r in table if r["dicebear_style"] == name} == {info["spdx"]}
        if info["spdx"] == "CC-BY-4.0":
            assert info["creator"]["name"] in (ASSETS / "NOTICE").read_text(encoding="utf-8")


def test_subsets_are_disjoint_and_the_private_style_stays_out_of_base(table, build):
    ids = [r["id"] for r in table]
    assert len(ids) == len(set(ids))
    subsets = {s: [r for r in table if r["subset"] == s] for s in build.SUBSETS}
    assert set(r["subset"] for r in table) == set(build.SUBSETS)
    groups = {s: {r["group"] for r in rows} for s, rows in subsets.items()}
    for a in build.SUBSETS:
        for b in build.SUBSETS:
            if a < b:
                assert not groups[a] & groups[b], (a, b)
    private = build.STYLES[build.PRIVATE_STYLE].words
    for s in ("base", "base_heldout"):
        assert private not in {r["style"] for r in subsets[s]}
    assert {r["style"] for r in subsets["pool"]} == {r["style"] for r in subsets["dp_pool"]} == {private}
    assert {r["style"] for r in subsets["utility"]} == {r["style"] for r in table}
    # the held-out combinations never appear in base, and base_heldout holds only them
    held = set(build.HELDOUT_PAIRS)
    assert not {(r["hair_color"], r["shirt_color"]) for r in subsets["base"]} & held
    assert {(r["hair_color"], r["shirt_color"]) for r in subsets["base_heldout"]} == held


def test_sizes_fit_the_benchmarks(table):
    count = lambda s: sum(r["subset"] == s for r in table)  # noqa: E731
    pool_groups = {r["group"] for r in table if r["subset"] == "pool"}
    assert 6000 <= count("base") <= 10000 and count("base_heldout") >= 200
    assert len(pool_groups) >= 128 + 256  # 128 members and >= 256 non-members (>= 128 in the report half)
    assert count("dp_pool") >= 3000 and count("utility") >= 2000
    assert PARQUET.stat().st_size < 40e6


def test_captions_follow_the_slot_order_and_parse_back(table, build):
    assert build.SLOTS[0] == "style"
    for r in table:
        assert build.parse_caption(r["caption"]) == {s: r[s] for s in build.SLOTS}, r["id"]
        assert build.caption_of(r) == r["caption"]
    # the slots appear in the fixed order in the template itself
    positions = [build.TEMPLATE.index("{" + s + "}") for s in build.SLOTS]
    assert positions == sorted(positions)


def test_slot_values_are_few_and_frequent_and_captions_unique(table, build):
    palettes = {"hair_color": build.HAIR, "hair_length": build.HAIR_LENGTH, "skin_tone": build.SKIN,
                "eyewear": build.EYEWEAR, "shirt_color": build.SHIRT, "background_color": build.BACKGROUND}
    for slot, palette in palettes.items():
        counts: dict = {}
        for r in table:
            counts[r[slot]] = counts.get(r[slot], 0) + 1
        assert set(counts) == set(palette) and len(palette) <= 8, slot
        assert min(counts.values()) >= 500, (slot, counts)
    assert len({r["caption"] for r in table}) == len(table)


def test_building_twice_gives_identical_bytes(tmp_path, build):
    pytest.importorskip("dicebear")
    pytest.importorskip("dicebear_styles")
    pytest.importorskip("resvg_py")
    outs = []
    for name in ("a", "b"):
        summary = build.build(tmp_path / name, per_subset=2, sheet=False, strict_versions=False, probe=False,
                              readme=False)
        assert {s: v["rows"] > 0 for s, v in summary["subsets"].items()} == dict.fromkeys(build.SUBSETS, True)
        outs.append((tmp_path / name / "portraits.parquet").read_bytes())
    assert outs[0] == outs[1]
    import pyarrow.parquet as pq

    rows = pq.read_table(tmp_path / "a" / "portraits.parquet", columns=["caption", "style"]).to_pylist()
    assert all(build.parse_caption(r["caption"])["style"] == r["style"] for r in rows)
