"""The torchvision stand-in benchmarks/peer_diffusers.py writes for diffusers' training script: its transforms give
what torchvision's formulas give (and what privtune trains on), and transformers imports beside it."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

from .conftest import REPO

CHECKS = r'''
import numpy as np
import torch
from PIL import Image

import torchvision
from torchvision import transforms as T
from torchvision.transforms import functional as F

from privtune.data.transforms import preprocess

assert "shim" in torchvision.__version__, torchvision.__file__

# the peer's pipeline (--center_crop, no flip) on a landscape image: shorter side to 32, centre crop, [-1, 1]
rng = np.random.default_rng(0)
img = Image.fromarray((rng.random((40, 48, 3)) * 255).astype("uint8"))  # 48 wide, 40 high
pipe = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32), T.Lambda(lambda x: x),
                  T.ToTensor(), T.Normalize([0.5], [0.5])])
out = pipe(img)
# torchvision's formulas written out: long side int(32 * 48 / 40) = 38, crop left round((38 - 32) / 2) = 3
ref = np.asarray(img.resize((38, 32), Image.BICUBIC).crop((3, 0, 35, 32)), dtype=np.float32) / 255.0
ref = torch.from_numpy((ref - 0.5) / 0.5).permute(2, 0, 1)
assert out.shape == (3, 32, 32) and out.dtype == torch.float32
torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
torch.testing.assert_close(out, preprocess(img, 32, center_crop=True), atol=1e-6, rtol=0)  # what privtune trains on

# sizes: portrait orientation, an image already at size (returned as it is), a crop larger than the image (black border)
assert T.Resize(32)(Image.new("RGB", (40, 50))).size == (32, 40)
same = Image.new("RGB", (32, 32))
assert T.Resize(32, interpolation=T.InterpolationMode.LANCZOS)(same) is same
padded = F.to_tensor(T.CenterCrop(8)(Image.new("RGB", (4, 6), (255, 255, 255))))
assert padded.shape == (3, 8, 8) and padded[:, 1:7, 2:6].min() == 1 and padded[:, 0].max() == 0 and padded[:, :, :2].max() == 0

# random crop and flip draw from torch's RNG as torchvision does; a same-size crop draws nothing
square = Image.fromarray((rng.random((40, 40, 3)) * 255).astype("uint8"))
torch.manual_seed(3)
i, j = torch.randint(0, 9, size=(1,)).item(), torch.randint(0, 9, size=(1,)).item()
torch.manual_seed(3)
assert np.array_equal(np.asarray(T.RandomCrop(32)(square)), np.asarray(square.crop((j, i, j + 32, i + 32))))
state = torch.get_rng_state()
T.RandomCrop(32)(same)
assert torch.equal(state, torch.get_rng_state())
assert np.array_equal(np.asarray(T.RandomHorizontalFlip(p=1.0)(square)), np.asarray(square)[:, ::-1])
assert T.RandomHorizontalFlip(p=0.0)(square) is square

# the peer's --image_interpolation_mode choices
choices = [f.lower() for f in dir(T.InterpolationMode) if not f.startswith("__") and not f.endswith("__")]
assert {"lanczos", "bicubic", "bilinear", "nearest"} <= set(choices), choices

# transformers imports torchvision once it finds it: the import-time stubs must satisfy it
import transformers.image_processing_utils  # noqa: E402,F401
import transformers.video_utils  # noqa: E402,F401
from transformers.image_utils import pil_torch_interpolation_mapping  # noqa: E402
assert pil_torch_interpolation_mapping
print("ok")
'''


def test_shim_transforms_match_torchvision_formulas(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    peer = importlib.import_module("peer_diffusers")
    shim = peer.write_shim(tmp_path / "shim")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim), str(REPO)]), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", CHECKS], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
