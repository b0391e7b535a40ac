"""Progress bars of long work: drawn on a terminal only, and each one counts its work to the end
(training epochs, validation and ``dyshuffle evaluate``, the first decode of an image folder,
the extraction of an archive, ``dyshuffle inspect``)."""

from __future__ import annotations

import io
import tarfile

import pytest
import torch

import dyshuffle.data.datasets as datasets_mod
import dyshuffle.data.folder as folder_mod
import dyshuffle.deploy.inspect as inspect_mod
import dyshuffle.train.engine as engine
from dyshuffle._progress import progress_bar
from dyshuffle.data import InMemoryLoader, load_data
from dyshuffle.models import create_model
from test_data import make_image_tree, make_tgz
from test_inspect import SignModel, batches, sign_data


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal, enabled, drawn", [
    (True, True, True), (False, True, False), (True, False, False),
])  # fmt: skip
def test_a_bar_is_drawn_on_a_terminal_only(terminal, enabled, drawn, monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    out = _Terminal() if terminal else io.StringIO()
    with progress_bar(
        7, "decode images", enabled=enabled, unit="img", file=out, mininterval=0
    ) as bar:
        bar.update(7)
    assert ("decode images" in out.getvalue()) is drawn
    assert ("7/7" in out.getvalue()) is drawn


class _Recorder:
    """Stands in for :func:`progress_bar`: every bar made, with its updates."""

    def __init__(self) -> None:
        self.bars: list[dict] = []

    def __call__(self, total=None, desc="", *, enabled=True, unit="it", **kwargs):
        record = {"total": total, "desc": desc, "enabled": enabled, "n": 0, "closed": False}
        self.bars.append(record)

        class Bar:
            def update(self, n=1):
                record["n"] += n

            def close(self):
                record["closed"] = True

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.close()

            def set_postfix(self, **kw):
                pass

        return Bar()

    def named(self, prefix: str) -> list[dict]:
        return [b for b in self.bars if b["desc"].startswith(prefix)]


@pytest.fixture
def bars(monkeypatch) -> _Recorder:
    recorder = _Recorder()
    for module in (datasets_mod, folder_mod, inspect_mod, engine):
        monkeypatch.setattr(module, "progress_bar", recorder)
    return recorder


def test_the_first_decode_of_an_image_folder_counts_every_image(tmp_path, bars):
    make_image_tree(tmp_path / "tree", train=5, val=2)
    load_data("imagefolder", tmp_path / "tree", cache_dir=tmp_path / "cache", verbose=True)
    (bar,) = bars.named("decode images")
    assert bar == {"total": 21, "desc": "decode images", "enabled": True, "n": 21, "closed": True}
    load_data("imagefolder", tmp_path / "tree", cache_dir=tmp_path / "cache", verbose=True)
    assert len(bars.named("decode images")) == 1  # from the cache: nothing to decode
    load_data("imagefolder", tmp_path / "tree", cache_dir=tmp_path / "other", verbose=True,
              progress=False)  # fmt: skip
    assert bars.named("decode images")[1]["enabled"] is False  # (dyshuffle train --no-progress)


def test_extraction_counts_the_bytes_of_every_member(tmp_path, bars):
    make_image_tree(tmp_path / "tree", train=3, val=1)
    archive = make_tgz(tmp_path / "tree", tmp_path / "tree.tgz", "data")
    with tarfile.open(archive) as tf:
        size = sum(m.size for m in tf.getmembers())
    target = folder_mod.extract_once(archive, tmp_path / "cache", progress=True)
    (bar,) = bars.named("extract tree.tgz")
    assert bar["n"] == size > 0 and bar["closed"] and bar["enabled"]
    assert len(list(target.rglob("*.png"))) == 12  # and the extraction itself is whole


def test_evaluation_counts_its_batches_on_the_first_rank(bars):
    images = torch.randint(0, 256, (23, 3, 16, 16), dtype=torch.uint8)
    labels = torch.arange(23) % 3
    loader = InMemoryLoader(
        images, labels, batch_size=5, train=False, mean=(0.5,) * 3, std=(0.25,) * 3
    )
    model = create_model("shufflenet_v2_x0_5", num_classes=3, stem="cifar", mixer="dynamic")
    m = engine.evaluate(model, loader, torch.device("cpu"), progress=True, desc="validate")
    (bar,) = bars.bars
    assert bar["total"] == len(loader) == 5 and bar["n"] == 5 and bar["closed"]
    assert bar["enabled"] and m["count"] == 23
    engine.evaluate(model, loader, torch.device("cpu"))
    assert bars.bars[1]["enabled"] is False and bars.bars[1]["n"] == 5  # counted, not drawn


def test_inspection_counts_the_images_it_sees(bars):
    torch.manual_seed(0)
    x, y, _ = sign_data()
    stats = inspect_mod.collect_statistics(
        SignModel(3), batches(x, y, 4), ["a", "b", "c"], max_samples=6, progress=True
    )
    (bar,) = bars.named("inspect")
    assert bar["total"] == 6 and bar["n"] == stats.num_samples == 6 and bar["closed"]


def test_a_training_run_shows_its_epochs_and_validations(tmp_path, bars):
    from dyshuffle.train import cli

    argv = ["--train-subset", "64", "--val-subset", "40", "--batch-size", "32", "--epochs", "2",
            "--threads", "1", "--no-tensorboard", "--output", str(tmp_path / "run")]  # fmt: skip
    assert cli.main(argv) == 0
    epochs = [(b["desc"], b["total"], b["n"]) for b in bars.named("epoch ")]
    assert epochs == [("epoch 1/2", 2, 2), ("epoch 2/2", 2, 2)]
    assert [b["desc"] for b in bars.named("validate")] == [
        "validate epoch 1", "validate epoch 2", "validate (soft permutations)",
        "validate (identity factors)",
    ]  # fmt: skip
    assert all(b["closed"] and b["n"] == b["total"] == 1 for b in bars.named("validate"))
