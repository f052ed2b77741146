"""A LoRA file whose tensors do not fit the model: one short message, printed once, exit code 2."""

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from privtune.errors import ModelError
from privtune.evaluate import main as evaluate_main
from privtune.export import LORA_FILE, save_lora_folder
from privtune.models.loading import load_components
from privtune.models.lora import add_lora, load_adapter, lora_config, lora_state_dict

from .conftest import make_image_folder


def _components(base_model):
    return load_components(SimpleNamespace(base=base_model, revision=None, variant=None, allow_unsafe_weights=False))


@pytest.fixture(scope="module")
def rank4_lora(tmp_path_factory, base_model):
    """A rank-4 `full` LoRA exported the way a run exports it."""
    unet = _components(base_model).unet
    config = lora_config(4, 4, 0.0, "full")
    add_lora(unet, config)
    folder = tmp_path_factory.mktemp("lora") / "lora"
    save_lora_folder(folder, lora_state_dict(unet), config)
    return folder


def _widened(lora, folder):
    """The same LoRA with 16 more input and output features per layer, as if trained on a wider base model."""
    folder.mkdir()
    wide = {}
    for k, v in load_file(str(lora / LORA_FILE)).items():
        wide[k] = torch.cat([v, v[:, :16]], 1) if "lora_A" in k else torch.cat([v, v[:16]], 0)
    save_file({k: v.contiguous() for k, v in wide.items()}, str(folder / LORA_FILE))
    return folder


def test_wrong_shape_lora_is_one_short_message(rank4_lora, base_model, tmp_path, capfd):
    wide = _widened(rank4_lora, tmp_path / "wide")
    members, nonmembers = make_image_folder(tmp_path / "m", n=4), make_image_folder(tmp_path / "n", n=4, seed=1)
    capfd.readouterr()
    args = [f"model={base_model}", f"lora={wide}", f"members={members}", f"nonmembers={nonmembers}",
            f"out={tmp_path / 'out'}", "eval.attacks=[pia]"]
    assert evaluate_main(args) == 2
    captured = capfd.readouterr()
    err = captured.out + captured.err
    assert "Traceback" not in err and "size mismatch" not in err
    assert err.count("does not fit") == 1 and len(err) < 2000, err
    assert str(wide / LORA_FILE) in err and "tensors have another shape" in err
    assert err.count(": expected (") == 3 and "... and " in err
    assert "trained with lora.rank=4 lora.targets=full" in err
    assert not (tmp_path / "out").exists()


def test_wrong_rank_adapter_names_the_files_rank(rank4_lora, base_model):
    unet = _components(base_model).unet
    with pytest.raises(ModelError) as info:
        load_adapter(unet, rank4_lora / LORA_FILE, lora_config(8, 8, 0.0, "full"), "A")
    message = str(info.value)
    assert "an adapter with lora.rank=8 lora.targets=full" in message
    assert "expected (8, " in message and "found (4, " in message
    assert "trained with lora.rank=4 lora.targets=full" in message and len(message) < 1500


def test_rank_and_targets_read_off_shapes_without_metadata(rank4_lora, base_model, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    save_file(load_file(str(rank4_lora / LORA_FILE)), str(bare / LORA_FILE))
    unet = _components(base_model).unet
    with pytest.raises(ModelError, match=r"trained with lora.rank=4 lora.targets=full;"):
        load_adapter(unet, bare / LORA_FILE, lora_config(2, 2, 0.0, "full"), "A")


def test_fitting_lora_still_loads(rank4_lora, base_model):
    from privtune.models.lora import load_lora

    components = _components(base_model)
    load_lora(components, rank4_lora)
    assert len(lora_state_dict(components.unet)) == len(load_file(str(rank4_lora / LORA_FILE)))
