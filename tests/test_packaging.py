"""The package is shareable: recipes and assets ship inside it, and run-folder files follow the umask."""

from __future__ import annotations

import glob
import os
import stat
from contextlib import contextmanager
from importlib.resources import files
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

from privtune import io as pio
from privtune.config import RECIPES_DIR, available_recipes, recipe_path
from privtune.export import LORA_FILE
from privtune.train import main

from .conftest import REPO, train_args

PACKAGE = Path(str(files("privtune")))


@contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---------------------------------------------------------------- recipes and package data
def test_every_recipe_resolves_inside_the_package():
    names = available_recipes()
    assert "lora" in names and len(names) >= 2
    assert RECIPES_DIR.resolve() == (PACKAGE / "recipes").resolve()
    for name in names:
        shipped = files("privtune") / "recipes" / f"{name}.yaml"
        assert shipped.is_file(), name
        assert recipe_path(name).resolve() == Path(str(shipped)).resolve(), name


def test_embedded_model_and_data_live_in_the_package():
    from privtune.data.sources import EMBEDDED_DATA
    from privtune.models.loading import EMBEDDED_MODEL

    for path in (EMBEDDED_MODEL, EMBEDDED_DATA):
        assert path.resolve().is_relative_to(PACKAGE.resolve()), path


def _package_data_patterns() -> list[str]:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    return pyproject["tool"]["setuptools"]["package-data"]["privtune"]


def _data_files(root: Path) -> set[str]:
    """Every non-Python file of the package source (what package-data has to cover)."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".py", ".pyc")}


def test_package_data_covers_recipes_and_assets():
    patterns = _package_data_patterns()
    assert "recipes/*.yaml" in patterns
    root = REPO / "privtune"
    # setuptools expands package-data patterns with glob(recursive=True) relative to the package folder
    covered = {Path(m).as_posix() for pat in patterns for m in glob.glob(pat, root_dir=root, recursive=True)
               if (root / m).is_file()}
    data = _data_files(root)
    assert {f"recipes/{n}.yaml" for n in available_recipes()} <= covered
    for needed in ("assets/tiny-sd/model_index.json", "assets/tiny-sd/unet/diffusion_pytorch_model.safetensors",
                   "assets/tiny-sd/tokenizer/vocab.json", "assets/emoji/emoji.parquet"):
        assert needed in data and needed in covered, needed
    assert data - covered == set(), f"package files no package-data pattern ships: {sorted(data - covered)}"


# ---------------------------------------------------------------- permissions of atomic writes
WRITERS = {
    "text": lambda p: pio.atomic_write_text(p, "hello\n"),
    "json": lambda p: pio.atomic_write_json(p, {"a": 1}),
    "bytes": lambda p: pio.atomic_write_bytes(p, b"\x00\x01"),
}


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)],
                         ids=["umask022", "umask077", "umask002"])
@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_atomic_writes_follow_the_umask(tmp_path, writer, mask, expected):
    with umask(mask):
        new = tmp_path / "sub" / f"new.{writer}"
        WRITERS[writer](new)
        assert mode(new) == expected, oct(mode(new))
        plain = tmp_path / f"plain.{writer}"  # what an ordinary write gives, for comparison
        plain.write_bytes(b"")
        assert mode(plain) == expected
        old = tmp_path / f"old.{writer}"  # overwriting a file left owner-only (e.g. by an older privtune)
        old.write_text("old")
        old.chmod(0o600)
        WRITERS[writer](old)
        assert mode(old) == expected
    assert not [p.name for p in tmp_path.rglob(".*.tmp")]


def test_atomic_path_fixes_a_writer_that_replaces_the_temp_file(tmp_path):
    """safetensors (0.8) writes through its own owner-only temp file and renames it over the target."""
    import torch
    from safetensors.torch import save_file

    with umask(0o022):
        target = tmp_path / "w.safetensors"
        with pio.atomic_path(target) as tmp:
            save_file({"x": torch.zeros(2)}, str(tmp))
        assert mode(target) == 0o644


def test_apply_umask_on_files_and_folders(tmp_path):
    f, d = tmp_path / "f", tmp_path / "d"
    f.write_text("x")
    d.mkdir()
    f.chmod(0o600)
    d.chmod(0o700)
    with umask(0o027):
        pio.apply_umask(f)
        pio.apply_umask(d)
    assert mode(f) == 0o640 and mode(d) == 0o750


def test_current_umask_reads_without_changing_it(monkeypatch):
    with umask(0o027):
        assert pio.current_umask() == 0o027
        assert pio.file_mode() == 0o640 and pio.dir_mode() == 0o750

        def no_proc(*args, **kwargs):
            raise OSError("no /proc")

        monkeypatch.setattr(pio, "open", no_proc, raising=False)  # the os.umask fallback
        assert pio.current_umask() == 0o027
        assert os.umask(0o027) == 0o027  # the fallback restored it


# ---------------------------------------------------------------- a real run folder
def test_run_folder_is_group_readable(tmp_path, base_model):
    run = tmp_path / "run"
    with umask(0o022):
        assert main(train_args(run, f"model.base={base_model}", "export.kohya=true", "train.checkpoint_every=1",
                               steps=2)) == 0
    paths = [run, *run.rglob("*")]
    regular = [p for p in paths if p.is_file() and not p.is_symlink()]
    names = {p.relative_to(run).as_posix() for p in regular}
    for needed in ("config.yaml", "split.json", f"lora/{LORA_FILE}", "checkpoints/checkpoint-2/trainable.safetensors"):
        assert needed in names, needed
    unreadable = sorted(f"{p.relative_to(run)} {oct(mode(p))}" for p in regular if mode(p) & 0o044 != 0o044)
    assert not unreadable, unreadable
    closed = sorted(f"{p.relative_to(run)} {oct(mode(p))}" for p in paths if p.is_dir() and mode(p) & 0o055 != 0o055)
    assert not closed, closed
