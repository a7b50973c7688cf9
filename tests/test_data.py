import gzip
import hashlib
import pickle
import struct

import numpy as np
import pytest
import torch

from mpis.errors import MpisError
from mpis.train import data as data_module
from mpis.train.data import bin_events, load_dataset


def write_idx(path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


def make_idx_set(folder, n_train=6, n_test=4, compress=True):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    suffix = ".gz" if compress else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28)), compress)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", np.arange(n) % 10, compress)


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize(("name", "subdir"), [("mnist", "MNIST/raw"), ("fashion-mnist", "")])
def test_idx_loader_reads_standard_files(tmp_path, name, subdir, compress):
    make_idx_set(tmp_path / subdir if subdir else tmp_path, compress=compress)
    data = load_dataset(name, tmp_path)
    x, y = data.train[3]
    assert data.input_shape == (1, 28, 28) and data.classes == 10
    assert len(data.train) == 6 and len(data.test) == 4
    assert x.shape == (1, 28, 28) and 0.0 <= x.min() and x.max() <= 1.0 and int(y) == 3


def test_idx_loader_names_the_missing_file(tmp_path):
    make_idx_set(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(MpisError, match="t10k-labels-idx1-ubyte"):
        load_dataset("mnist", tmp_path)


def test_idx_loader_rejects_truncated_file(tmp_path):
    make_idx_set(tmp_path, compress=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(MpisError, match="corrupt file .*train-images-idx3-ubyte"):
        load_dataset("mnist", tmp_path)


def content_sha256(path) -> str:
    raw = path.read_bytes()
    return hashlib.sha256(gzip.decompress(raw) if path.suffix == ".gz" else raw).hexdigest()


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize(
    ("owner", "asked", "owner_name", "asked_name"),
    [
        ("mnist", "fashion-mnist", "MNIST", "Fashion-MNIST"),
        ("fashion-mnist", "mnist", "Fashion-MNIST", "MNIST"),
    ],
)
def test_the_other_datasets_published_files_are_refused_naming_it(
    tmp_path, monkeypatch, compress, owner, asked, owner_name, asked_name
):
    make_idx_set(tmp_path, compress=compress)
    path = tmp_path / ("train-images-idx3-ubyte" + (".gz" if compress else ""))
    monkeypatch.setitem(data_module.KNOWN_IDX, content_sha256(path), (owner, "train-images-idx3-ubyte"))
    with pytest.raises(MpisError) as err:
        load_dataset(asked, tmp_path)
    assert str(err.value) == f"{path} is {owner_name}'s, not {asked_name}'s: pass --dataset {owner}"
    assert len(load_dataset(owner, tmp_path).train) == 6  # under its own name it loads


def test_a_published_test_file_renamed_as_the_training_file_is_refused(tmp_path, monkeypatch):
    make_idx_set(tmp_path)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    monkeypatch.setitem(data_module.KNOWN_IDX, content_sha256(path), ("mnist", "t10k-labels-idx1-ubyte"))
    with pytest.raises(MpisError, match="is MNIST's t10k-labels-idx1-ubyte, not its train-labels-idx1-ubyte"):
        load_dataset("mnist", tmp_path)


def write_cifar_batch(path, n, label_key, classes):
    rng = np.random.default_rng(1)
    batch = {b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8), label_key: list(np.arange(n) % classes)}
    with path.open("wb") as handle:
        pickle.dump(batch, handle)


def test_cifar10_loader_reads_pickle_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 6):
        write_cifar_batch(folder / f"data_batch_{i}", 2, b"labels", 10)
    write_cifar_batch(folder / "test_batch", 3, b"labels", 10)
    data = load_dataset("cifar10", tmp_path)
    assert (len(data.train), len(data.test), data.classes) == (10, 3, 10)
    assert data.train[0][0].shape == (3, 32, 32)
    augmented = data.augment(torch.stack([data.train[i][0] for i in range(4)]))
    assert augmented.shape == (4, 3, 32, 32)


class _RunsCode:
    """A pickle payload that would create a marker file when unpickled by a plain `pickle.load`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_cifar_batch_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "ran"
    for name in ("data_batch_1", "test_batch"):
        with (folder / name).open("wb") as handle:
            pickle.dump({b"data": _RunsCode(marker), b"labels": [0]}, handle)
    with pytest.raises(MpisError, match="corrupt file .*not part of a CIFAR batch"):
        load_dataset("cifar10", tmp_path)
    assert not marker.exists()


def test_cifar100_loader_uses_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    write_cifar_batch(folder / "train", 5, b"fine_labels", 100)
    write_cifar_batch(folder / "test", 2, b"fine_labels", 100)
    data = load_dataset("cifar100", tmp_path)
    assert data.classes == 100 and [int(data.train[i][1]) for i in range(5)] == [0, 1, 2, 3, 4]


def test_cifar_loader_rejects_a_corrupt_batch(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    (folder / "train").write_bytes(b"not a pickle")
    write_cifar_batch(folder / "test", 2, b"fine_labels", 100)
    with pytest.raises(MpisError, match="corrupt file .*train"):
        load_dataset("cifar100", tmp_path)


def test_a_partial_cifar10_copy_trains_on_what_is_there_and_names_what_is_missing(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    write_cifar_batch(folder / "data_batch_1", 4, b"labels", 10)
    write_cifar_batch(folder / "test_batch", 3, b"labels", 10)
    data = load_dataset("cifar10", tmp_path)
    assert (len(data.train), len(data.test)) == (4, 3)
    assert "training on data_batch_1 (4 images); missing data_batch_2, data_batch_3" in data.note


def test_cifar10_without_any_training_batch_is_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    write_cifar_batch(folder / "test_batch", 3, b"labels", 10)
    with pytest.raises(MpisError, match="needs at least one of data_batch_1"):
        load_dataset("cifar10", tmp_path)


def encode_events(events) -> bytes:
    out = bytearray()
    for x, y, p, ts in events:
        out += bytes([x, y, (p << 7) | ((ts >> 16) & 127), (ts >> 8) & 255, ts & 255])
    return bytes(out)


def test_nmnist_loader_decodes_and_bins_events(tmp_path):
    for split in ("Train", "Test"):
        for digit in (3, 7):
            folder = tmp_path / split / str(digit)
            folder.mkdir(parents=True)
            # events at t = 0, 49, 99 µs: two equal bins [0, 50) and [50, 100)
            (folder / "00001.bin").write_bytes(encode_events([(1, 2, 0, 0), (33, 0, 1, 49), (5, 5, 1, 99)]))
    data = load_dataset("nmnist", tmp_path, frames=2, events="frames")
    frames, label = data.train[0]
    assert label == 3 and frames.shape == (2, 2, 34, 34) and frames.sum() == 3
    assert frames[0, 0, 2, 1] == 1 and frames[0, 1, 0, 33] == 1 and frames[1, 1, 5, 5] == 1
    mean, _ = load_dataset("nmnist", tmp_path, frames=2).train[0]  # the default: one static input
    assert torch.equal(mean, frames.mean(0))  # events per step: what the rate graph sees of the frames
    with pytest.raises(MpisError, match="unknown --events 'stream'"):
        load_dataset("nmnist", tmp_path, events="stream")


def test_nmnist_rejects_a_truncated_event_file(tmp_path):
    for split in ("Train", "Test"):
        folder = tmp_path / split / "0"
        folder.mkdir(parents=True)
        (folder / "1.bin").write_bytes(b"\x01\x02\x03")
    data = load_dataset("nmnist", tmp_path, frames=4)
    with pytest.raises(MpisError, match="corrupt file .*1.bin"):
        data.train[0]


def test_nmnist_names_the_missing_folder(tmp_path):
    with pytest.raises(MpisError, match="Train"):
        load_dataset("nmnist", tmp_path)


def test_binning_an_empty_recording_gives_zero_frames():
    assert bin_events(np.zeros((0, 4), dtype=np.int64), 3).sum() == 0


def test_digits_needs_no_files_and_is_upscaled_to_16x16():
    data = load_dataset("digits")
    assert data.input_shape == (1, 16, 16)
    assert len(data.train) + len(data.test) == 1797 and len(data.test) == 360


def test_file_datasets_require_a_data_dir():
    with pytest.raises(MpisError, match="--data-dir"):
        load_dataset("cifar10")
