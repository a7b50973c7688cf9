"""The loaders on the real benchmark files, where they are at hand: format, counts and labels as the
datasets define them. Point MPIS_DATA at a folder holding fashion-mnist/, mnist/, n-mnist-subset/ and
cifar-10-subset/ (each in its standard layout; Fashion-MNIST is also Debian's `dataset-fashion-mnist`);
without them these tests skip."""

import gzip
import hashlib
import os
from pathlib import Path

import pytest
import torch

from mpis.errors import MpisError
from mpis.train.data import KNOWN_IDX, load_dataset

DATA = Path(os.environ.get("MPIS_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def folder(name: str) -> Path:
    path = DATA / name
    if not path.is_dir():
        pytest.skip(f"{path} not found: set MPIS_DATA to a folder with the {name} files")
    return path


TEST_CLASS_COUNTS = {  # as published with each dataset
    "fashion-mnist": [1000] * 10,
    "mnist": [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009],
}


@pytest.mark.parametrize("dataset", ["fashion-mnist", "mnist"])
def test_the_official_idx_files_load_whole(dataset):
    data = load_dataset(dataset, folder(dataset))
    assert (len(data.train), len(data.test), data.input_shape, data.classes) == (60_000, 10_000, (1, 28, 28), 10)
    labels = torch.stack([data.test[i][1] for i in range(len(data.test))])
    assert torch.bincount(labels).tolist() == TEST_CLASS_COUNTS[dataset]
    x = data.train[0][0]
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0 and float(x.max()) > 0.5


@pytest.mark.parametrize("dataset", ["fashion-mnist", "mnist"])
def test_every_official_idx_file_is_known_as_itself(dataset):
    paths = sorted(folder(dataset).glob("*-ubyte.gz"))
    assert len(paths) == 4
    for path in paths:
        digest = hashlib.sha256(gzip.decompress(path.read_bytes())).hexdigest()
        assert KNOWN_IDX.get(digest) == (dataset, path.name.removesuffix(".gz")), path


@pytest.mark.parametrize(
    ("files", "asked", "message"),
    [
        ("mnist", "fashion-mnist", "is MNIST's, not Fashion-MNIST's: pass --dataset mnist"),
        ("fashion-mnist", "mnist", "is Fashion-MNIST's, not MNIST's: pass --dataset fashion-mnist"),
    ],
)
def test_mnist_and_fashion_mnist_are_refused_under_each_others_name(files, asked, message):
    with pytest.raises(MpisError, match=message):
        load_dataset(asked, folder(files))


def test_the_nmnist_subset_loads_as_event_frames():
    data = load_dataset("nmnist", folder("n-mnist-subset"), frames=10, events="frames")
    assert (len(data.train), len(data.test), data.input_shape, data.classes) == (1000, 100, (2, 34, 34), 10)
    frames, label = data.test[0]
    assert frames.shape == (10, 2, 34, 34) and float(frames.sum()) > 100  # a saccade's events, two polarities
    assert 0 <= int(label) <= 9
    mean, _ = load_dataset("nmnist", folder("n-mnist-subset"), frames=10).test[0]  # the default, --events mean
    torch.testing.assert_close(mean, frames.mean(0))


def test_the_cifar10_subset_trains_on_its_one_batch_and_says_so():
    data = load_dataset("cifar10", folder("cifar-10-subset"))
    assert (len(data.train), len(data.test), data.input_shape, data.classes) == (4000, 1000, (3, 32, 32), 10)
    assert "missing data_batch_2, data_batch_3, data_batch_4, data_batch_5" in data.note
    labels = torch.stack([data.train[i][1] for i in range(len(data.train))])
    assert len(torch.unique(labels)) == 10
