"""``torch.hub`` entry points (hubconf.py) of a local checkout: every registered model, its
keywords as ``create_model``'s, and the models of training checkpoints by path or URL."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dyshuffle.models import create_model, list_models
from dyshuffle.train.checkpoint import CheckpointError
from test_predict import make_checkpoint

ROOT = str(Path(__file__).resolve().parents[1])


def hub(name: str, **kwargs):
    return torch.hub.load(ROOT, name, source="local", trust_repo=True, verbose=False, **kwargs)


def test_every_registered_model_is_an_entry_point_and_nothing_else_is_public():
    module = torch.hub._import_module("hubconf", str(Path(ROOT) / "hubconf.py"))
    public = [k for k in dir(module) if not k.startswith("_") and callable(getattr(module, k))]
    assert sorted(public) == sorted([*list_models(), "checkpoint"])


@pytest.mark.parametrize("name", ["shufflenet_v2_x0_5", "shufflenet_v1_g3_x0_5", "mobilenet_v2"])
def test_an_entry_point_is_create_model(name):
    kwargs = {"num_classes": 10, "stem": "cifar"}
    if name != "mobilenet_v2":
        kwargs["mixer"] = "dynamic"
    torch.manual_seed(0)
    got = hub(name, **kwargs)
    torch.manual_seed(0)
    expected = create_model(name, **kwargs)
    assert type(got) is type(expected) and got.model_args == expected.model_args
    for (k, a), (_, b) in zip(got.state_dict().items(), expected.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_pretrained_weights_are_refused_by_name():
    with pytest.raises(ValueError, match="no published weights for 'shufflenet_v2_x1_0'"):
        hub("shufflenet_v2_x1_0", pretrained=True)


def test_a_checkpoint_by_path_folder_and_url(tmp_path, monkeypatch):
    file, model = make_checkpoint(tmp_path / "run")
    x = torch.randn(3, 3, 32, 32)
    expected = model.eval()(x)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # hub dir for the download
    for source in (str(file), str(file.parent), file.as_uri()):
        got = hub("checkpoint", path=source)
        assert not got.training
        torch.testing.assert_close(got(x), expected, rtol=0, atol=0)
    assert (tmp_path / "torch-home" / "hub" / "checkpoints" / "last.pt").is_file()
    with pytest.raises(CheckpointError, match="nowhere.pt"):
        hub("checkpoint", path=str(tmp_path / "nowhere.pt"))
