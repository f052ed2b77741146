"""Train the portraits attribute classifier (privtune.models.attributes) on the `utility` renders.

The `utility` subset is disjoint from every split (base, base_heldout, pool, dp_pool), so the
classifier never saw a member, a non-member or a base-model training image. A seeded 15% of the
utility rows is held out; each head's accuracy there (and on `base_heldout` + `pool` renders, which
it never trained on either) is recorded in the shipped config.json: the ceiling a generation can reach.
Training batches are blurred and noised at random so blurry tiny-model generations stay in range.

Usage: python scripts/train_attribute_classifier.py [--data privtune/assets/portraits/portraits.parquet]
       [--out privtune/assets/portraits/classifier] [--epochs N]
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from privtune.models.attributes import AttributeClassifier, save_classifier, to_tensor  # noqa: E402

DATA = ROOT / "privtune" / "assets" / "portraits" / "portraits.parquet"
OUT = ROOT / "privtune" / "assets" / "portraits" / "classifier"
SLOTS = ("style", "hair_color", "hair_length", "skin_tone", "eyewear", "shirt_color", "background_color")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def load(path):
    import datasets
    from PIL import Image

    ds = datasets.Dataset.from_parquet(str(path))
    rows = ds.to_pandas()
    rows["pil"] = [Image.open(io.BytesIO(b["bytes"] if isinstance(b, dict) else b)).convert("RGB") for b in rows["image"]]
    return rows


def labels_of(rows, slots: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    return {k: torch.tensor([slots[k].index(v) for v in rows[k]]) for k in slots}


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random Gaussian blur (sigma 0-1.2 px) and pixel noise: generations of a tiny model are soft."""
    import kornia

    sigma = float(torch.rand((), generator=gen)) * 1.2
    if sigma > 0.15:
        x = kornia.filters.gaussian_blur2d(x, (5, 5), (sigma, sigma))
    x = x + torch.randn(x.shape, generator=gen) * float(torch.rand((), generator=gen)) * 0.05
    return x.clamp(0, 1)


def accuracy(model, images, labels) -> dict[str, float]:
    preds, _ = model.predict(images)
    return {k: float((preds[k] == labels[k].numpy()).mean()) for k in labels}


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    start = time.time()
    rows = load(args.data)
    resolution = rows["pil"].iloc[0].size[0]
    utility = rows[rows["subset"] == "utility"].reset_index(drop=True)
    slots = {k: sorted(rows[k].unique().tolist()) for k in SLOTS}
    perm = np.random.default_rng(args.seed).permutation(len(utility))
    n_test = int(round(0.15 * len(utility)))
    test, train = utility.iloc[perm[:n_test]], utility.iloc[perm[n_test:]]
    x_train, y_train = to_tensor(train["pil"], resolution), labels_of(train, slots)
    x_test, y_test = to_tensor(test["pil"], resolution), labels_of(test, slots)
    other = rows[rows["subset"].isin(["base_heldout", "pool"])]
    x_other, y_other = to_tensor(other["pil"], resolution), labels_of(other, slots)

    model = AttributeClassifier(slots)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps = args.epochs * -(-len(x_train) // args.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps)
    gen = torch.Generator().manual_seed(args.seed)
    step = 0
    for epoch in range(args.epochs):
        order = torch.randperm(len(x_train), generator=gen)
        model.train()
        total = 0.0
        for lo in range(0, len(order), args.batch):
            idx = order[lo:lo + args.batch]
            logits = model(augment(x_train[idx], gen))
            loss = sum(F.cross_entropy(logits[k], y_train[k][idx]) for k in slots)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            step += 1
        acc = accuracy(model, x_test, y_test)
        print(f"epoch {epoch + 1}/{args.epochs}: loss {total / len(x_train):.4f}; held-out accuracy "
              + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()), flush=True)
    heldout = accuracy(model, x_test, y_test)
    unseen = accuracy(model, x_other, y_other)
    chance = {k: float(max(np.mean(train[k] == v) for v in slots[k])) for k in slots}
    seconds = time.time() - start
    save_classifier(model, args.out, resolution, {
        "trained_on": f"{len(train)} `utility` renders ({args.epochs} epochs, batch {args.batch}, AdamW lr {args.lr}, "
                      "random blur + noise)",
        "heldout_accuracy": heldout, "heldout_rows": len(test),
        "unseen_subsets_accuracy": unseen, "unseen_subsets": "base_heldout + pool", "unseen_rows": len(other),
        "chance": chance, "train_seconds": round(seconds, 1), "seed": args.seed,
    })
    print(f"held-out accuracy {heldout}\nbase_heldout + pool accuracy {unseen}\nchance (majority) {chance}\n"
          f"saved to {args.out} in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
