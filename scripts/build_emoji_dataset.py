"""Render the embedded default data set: Noto Color Emoji glyphs at 32x32, captioned from Unicode names.

Source: the Debian package `fonts-noto-color-emoji` (Apache-2.0), installed from the package
registry (`apt-get install fonts-noto-color-emoji`), so nothing is downloaded at run time. Every
single-code-point emoji the font draws becomes one image captioned with its lower-cased Unicode name;
skin-tone sequences (base + Fitzpatrick modifier, drawn by the font as one ligature) add natural
near-duplicate groups. Each image carries a `group` (the base code point) and a `subset`:
`base` (pre-training the tiny model) or `pool` (member / non-member fine-tuning draws), assigned per
group by a seeded hash so near-duplicates never straddle the two.

Usage: python scripts/build_emoji_dataset.py [--font PATH] [--out privtune/assets/emoji]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import unicodedata
from pathlib import Path

import numpy as np
from fontTools.ttLib import TTFont
from PIL import Image, ImageDraw, ImageFont

FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
RANGES = [(0x2300, 0x23FF), (0x2600, 0x27BF), (0x2B00, 0x2BFF), (0x1F000, 0x1FAFF)]
TONES = {0x1F3FB: "light", 0x1F3FC: "medium-light", 0x1F3FD: "medium", 0x1F3FE: "medium-dark", 0x1F3FF: "dark"}
NATIVE_SIZE = 109  # the only size of the font's bitmap strikes
POOL_FRACTION = 0.25
SEED = "privtune-emoji-v1"


def render(font: ImageFont.FreeTypeFont, text: str, size: int) -> tuple[Image.Image, int]:
    """Draw `text` on white, crop to its box, pad to a square and resize; returns (image, glyph width)."""
    canvas = Image.new("RGBA", (NATIVE_SIZE * 4, NATIVE_SIZE * 2), (255, 255, 255, 0))
    ImageDraw.Draw(canvas).text((8, 8), text, font=font, embedded_color=True)
    box = canvas.getbbox()
    if box is None:
        return Image.new("RGB", (size, size), "white"), 0
    glyph = canvas.crop(box)
    side = max(glyph.size)
    square = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    square.alpha_composite(glyph, ((side - glyph.size[0]) // 2, (side - glyph.size[1]) // 2))
    return square.convert("RGB").resize((size, size), Image.LANCZOS), box[2] - box[0]


def in_pool(group: str) -> bool:
    digest = hashlib.sha256(f"{SEED}:{group}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < POOL_FRACTION


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--font", default=FONT)
    parser.add_argument("--out", default="privtune/assets/emoji")
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()

    cmap = TTFont(args.font, lazy=True).getBestCmap()
    font = ImageFont.truetype(args.font, NATIVE_SIZE)
    rows: list[dict] = []
    singles: dict[int, int] = {}
    for lo, hi in RANGES:
        for cp in range(lo, hi + 1):
            name = unicodedata.name(chr(cp), "")
            if cp not in cmap or not name or cp in TONES or 0x1F1E6 <= cp <= 0x1F1FF:
                continue
            image, width = render(font, chr(cp), args.size)
            if width == 0 or np.asarray(image).min() > 240:
                continue
            singles[cp] = width
            rows.append({"id": f"u{cp:x}", "caption": name.lower(), "group": f"u{cp:x}", "image": image})
    for cp, width in list(singles.items()):
        name = unicodedata.name(chr(cp)).lower()
        for tone_cp, tone in TONES.items():
            image, tone_width = render(font, chr(cp) + chr(tone_cp), args.size)
            if tone_width > 1.5 * width:  # the font has no ligature: two glyphs side by side
                break
            rows.append({"id": f"u{cp:x}-{tone_cp:x}", "caption": f"{name}, {tone} skin tone", "group": f"u{cp:x}", "image": image})

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import datasets

    records = {
        "id": [r["id"] for r in rows],
        "caption": [r["caption"] for r in rows],
        "group": [r["group"] for r in rows],
        "subset": ["pool" if in_pool(r["group"]) else "base" for r in rows],
        "image": [r["image"] for r in rows],
    }
    features = datasets.Features(
        {name: datasets.Value("string") for name in ("id", "caption", "group", "subset")} | {"image": datasets.Image()}
    )
    ds = datasets.Dataset.from_dict(records, features=features)
    ds.to_parquet(str(out / "emoji.parquet"))
    counts = {s: records["subset"].count(s) for s in ("base", "pool")}
    stats = {
        "images": len(rows),
        "single_code_points": len(singles),
        "skin_tone_variants": len(rows) - len(singles),
        "groups": len(set(records["group"])),
        "subsets": counts,
        "pool_groups": len({g for g, s in zip(records["group"], records["subset"]) if s == "pool"}),
        "size": args.size,
        "font": Path(args.font).name,
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()
