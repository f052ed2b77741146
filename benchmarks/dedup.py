"""Deduplication throughput (images / second) for the tiled-l2 path, the embedding path and flip invariance.

Synthetic corpus: N distinct smooth 64 px images plus 10% re-encoded (JPEG) copies. Timed: the whole
`privtune.data.dedup.deduplicate` call (resize, faiss range search, exact tiled-l2 check, union-find).

    OMP_NUM_THREADS=1 python benchmarks/dedup.py --sizes 1000 4000 16000
"""

from __future__ import annotations

import io
import json
import platform
import time

import common
import numpy as np
from PIL import Image

from privtune.data.dedup import DedupSettings, deduplicate
from privtune.data.sources import Record, content_hash


def corpus(n: int, seed: int = 0) -> list[Record]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        im = Image.fromarray((rng.random((5, 5, 3)) * 255).astype("uint8")).resize((64, 64), Image.BICUBIC)
        out.append(Record(f"img{i}", f"caption {i}", im, f"img{i}", content_hash(im)))
    for k, i in enumerate(rng.choice(n, size=n // 10, replace=False)):
        buf = io.BytesIO()
        out[i].image.save(buf, "JPEG", quality=75)
        im = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
        out.append(Record(f"copy{k}", f"copy caption {k}", im, f"copy{k}", content_hash(im)))
    return out


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000])
    args = parser.parse_args()
    configs = {"tiled_l2": DedupSettings(), "tiled_l2+flip": DedupSettings(flip=True),
               "features embedding": DedupSettings(tiled_l2=None, embedding="features")}
    rows = []
    for n in args.sizes:
        records = corpus(n)
        for name, settings in configs.items():
            start = time.perf_counter()
            result = deduplicate(records, settings)
            seconds = time.perf_counter() - start
            rows.append({"images": len(records), "path": name, "seconds": round(seconds, 3),
                         "images_per_second": round(len(records) / seconds, 1), "groups": len(result.groups)})
            print(json.dumps(rows[-1]), flush=True)
    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}")


if __name__ == "__main__":
    main()
