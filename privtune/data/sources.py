"""Load a captioned image source into validated records (id, caption, image, group, content hash).

Sources follow the Hugging Face `datasets` conventions: a local `imagefolder` with `metadata.jsonl`
(the diffusers training-script layout), a hub data set name, or an embedded set (`embedded` = portraits, `embedded:emoji`).
Images are decoded here, eagerly, so a corrupt file or an empty caption is reported by name before
anything is trained or written (or skipped and counted with `on_bad_sample=skip`).
"""

from __future__ import annotations

import hashlib
import io
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..embedded import DEFAULT, EMBEDDED, embedded, is_embedded
from ..errors import DataError

EMBEDDED_DATA = EMBEDDED[DEFAULT].data


@dataclass
class Record:
    id: str
    caption: str
    image: Image.Image
    group: str
    sha256: str
    captions: list[str] = field(default_factory=list)  # every caption of this image (dedup merges a group's here); empty = [caption]


@dataclass
class LoadedSource:
    records: list[Record]
    skipped: list[dict] = field(default_factory=list)
    description: str = ""


def content_hash(image: Image.Image) -> str:
    """SHA-256 of the decoded RGB pixels and size: the same picture re-encoded hashes the same."""
    h = hashlib.sha256(f"{image.size[0]}x{image.size[1]}".encode())
    h.update(np.asarray(image, dtype=np.uint8).tobytes())
    return h.hexdigest()


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB pixels; transparency is composited on white (the diffusers training scripts' convention), not black."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _decode(value, name: str) -> Image.Image:
    """Decode a datasets Image cell given with decode=False ({path, bytes}) or an already-decoded PIL image."""
    if isinstance(value, Image.Image):
        return to_rgb(value)
    if not isinstance(value, dict):
        raise DataError(f"image {name} is not an image (got {type(value).__name__})")
    try:
        if value.get("bytes"):
            image = Image.open(io.BytesIO(value["bytes"]))
        elif value.get("path"):
            image = Image.open(value["path"])
        else:
            raise DataError(f"image {name} has neither bytes nor a path")
        image.load()
        return to_rgb(image)
    except Image.DecompressionBombError as exc:
        raise DataError(f"image {name} is too large to decode safely ({exc}); resize it (privtune trains at data.resolution), "
                        "or set data.on_bad_sample=skip") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"corrupt image {name}: {exc}. Fix or remove the file, or set data.on_bad_sample=skip") from exc


def _open_dataset(data_cfg):
    import datasets

    source = str(data_cfg.source)
    if is_embedded(source):
        bench = embedded(source)
        ds = datasets.Dataset.from_parquet(str(bench.data))
        if data_cfg.subset:
            ds = ds.filter(lambda s: s == data_cfg.subset, input_columns="subset")
        return ds, f"{bench.description} ({data_cfg.subset or 'all'} subset)"
    path = Path(source).expanduser()
    looks_local = source.startswith((".", "/", "~")) or path.exists() or "/" not in source or source.count("/") > 1
    if path.is_dir():
        if not any((path / f"metadata.{ext}").is_file() for ext in ("jsonl", "csv", "parquet")):
            raise DataError(f"the image folder {path} has no metadata.jsonl; write one JSON line per image, e.g. "
                            '{"file_name": "img001.png", "caption": "a photo of ..."}, so every image has its caption')
        try:
            ds = datasets.load_dataset("imagefolder", data_dir=str(path), split="train")
        except Exception as exc:
            raise DataError(f"cannot read the image folder {path}: {exc}. It needs images and a metadata.jsonl with file_name "
                            "and caption columns") from exc
        return ds, f"imagefolder {path}"
    if looks_local:
        raise DataError(f"data path {source!r} does not exist; set data.source to an image folder with a metadata.jsonl, "
                        "a hub data set name, or 'embedded' (embedded:emoji, embedded:portraits)")
    try:
        ds = datasets.load_dataset(source, split=data_cfg.hub_split)
    except Exception as exc:
        raise DataError(f"cannot load hub data set {source!r} (offline, or no such data set?): {exc}") from exc
    return ds, f"hub data set {source}"


def load_source(data_cfg) -> LoadedSource:
    """All rows of the configured source, decoded and checked."""
    import datasets

    ds, description = _open_dataset(data_cfg)
    image_col, caption_col = data_cfg.image_column, data_cfg.caption_column
    for col in (image_col, caption_col):
        if col not in ds.column_names:
            raise DataError(
                f"column {col!r} not found in {description}; its columns are {ds.column_names}. "
                f"Set data.image_column / data.caption_column"
            )
    if isinstance(ds.features[image_col], datasets.Image):
        ds = ds.cast_column(image_col, datasets.Image(decode=False))
    has_ids = "id" in ds.column_names
    group_col = data_cfg.group_column if data_cfg.group_column in ds.column_names else None
    skip = data_cfg.on_bad_sample == "skip"
    if data_cfg.on_bad_sample not in ("error", "skip"):
        raise DataError(f"data.on_bad_sample must be 'error' or 'skip', not {data_cfg.on_bad_sample!r}")

    records: list[Record] = []
    skipped: list[dict] = []
    for i, row in enumerate(ds):
        cell = row[image_col]
        file_name = cell.get("path") if isinstance(cell, dict) else None
        rid = str(row["id"]) if has_ids else (Path(file_name).name if file_name else f"row{i}")
        name = f"{file_name or rid} (row {i} of {description})"
        caption = row[caption_col]
        try:
            if not isinstance(caption, str) or not caption.strip():
                raise DataError(f"empty caption for image {name}; write a caption in its metadata, or set data.on_bad_sample=skip")
            image = _decode(cell, name)
        except DataError as exc:
            if not skip:
                raise
            skipped.append({"id": rid, "reason": str(exc)})
            continue
        group = str(row[group_col]) if group_col else rid
        records.append(Record(rid, caption.strip(), image, group, content_hash(image)))
    small = [r for r in records if min(r.image.size) < int(data_cfg.resolution)]
    if small:
        worst = min(small, key=lambda r: min(r.image.size))
        print(f"privtune: warning: {len(small)} of {len(records)} images are smaller than data.resolution={data_cfg.resolution} "
              f"(smallest {worst.image.size[0]}x{worst.image.size[1]}, {worst.id}); they are upscaled, which blurs them",
              file=sys.stderr)
    if not records:
        raise DataError(f"{description} holds no usable samples ({len(skipped)} skipped); point data.source at a folder "
                        "with images and captions")
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        raise DataError(f"{description} has duplicate ids; give every row a unique id or file name")
    return LoadedSource(records, skipped, description)
