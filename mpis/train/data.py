"""Dataset loaders that read the standard files from `--data-dir` (nothing is downloaded).

- digits: scikit-learn's bundled 8×8 handwritten digits (needs no files), upscaled ×2 bilinearly to
  16×16 so that both streams of the paper's nets keep a spatial extent; fixed stratified 80/20 split.
- mnist / fashion-mnist: the four IDX files (raw or .gz), in DIR, DIR/<name>/ or DIR/<Name>/raw/.
- cifar10 / cifar100: the python pickle batches (cifar-10-batches-py/, cifar-100-python/).
- nmnist: the original binary event files (Train/<digit>/*.bin, Test/<digit>/*.bin), 34×34, two
  polarities, binned into T frames at load time.
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from mpis.config import DATASETS, EVENT_PLAYBACK
from mpis.errors import MpisError


@dataclass
class DataSplit:
    """Train and test sets, the shape of one input (C, H, W), the class count, and train-time augmentation."""

    train: Dataset
    test: Dataset
    input_shape: tuple[int, int, int]
    classes: int
    augment: Callable[[Tensor], Tensor] | None = None
    note: str | None = None  # one line for the user about what was read (e.g. a partial copy)


def load_dataset(name: str, data_dir: str | Path | None = None, frames: int = 30, events: str = "mean") -> DataSplit:
    """`frames`: the T an event recording is binned into; `events`: `mean` gives its mean frame (events per
    step, one static input), `frames` the T frames (frames, C, H, W), played in order by the spiking network."""
    if name not in DATASETS:
        raise MpisError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if name == "digits":
        return _digits()
    if data_dir is None:
        raise MpisError(f"dataset {name!r} reads its standard files: pass --data-dir DIR")
    root = Path(data_dir)
    if not root.is_dir():
        raise MpisError(f"--data-dir {root} is not a folder")
    if name in ("mnist", "fashion-mnist"):
        return _idx_dataset(root, name)
    if name in ("cifar10", "cifar100"):
        return _cifar(root, name)
    if events not in EVENT_PLAYBACK:
        raise MpisError(f"unknown --events {events!r}; choose one of {', '.join(EVENT_PLAYBACK)}")
    return _nmnist(root, frames, events == "mean")


def playback_frames(events: str, steps: int, trained_steps: int) -> int:
    """The frames an event recording is binned into to drive a net trained at `trained_steps` for `steps`
    steps: T for in-order playback; the training T for the mean frame, so that its constant current is the
    events per step the model was trained on at any simulated T (binned at T = 100 instead, the N-MNIST
    net's inputs were 3.3x weaker and its rate graph scored 15 % instead of 64 %)."""
    return trained_steps if events == "mean" else steps


def _digits() -> DataSplit:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    images = F.interpolate(images, scale_factor=2, mode="bilinear", align_corners=False).clamp(0, 1)
    labels = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=0.2, random_state=0, stratify=digits.target
    )
    return DataSplit(
        TensorDataset(images[train_idx], labels[train_idx]),
        TensorDataset(images[test_idx], labels[test_idx]),
        (1, 16, 16),
        10,
    )


# ---- IDX (MNIST, Fashion-MNIST) ---------------------------------------------------------------
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_SUBDIRS = {
    "mnist": ("mnist", "MNIST", "MNIST/raw"),
    "fashion-mnist": ("fashion-mnist", "FashionMNIST", "FashionMNIST/raw"),
}


def _find(root: Path, subdirs: tuple[str, ...], stem: str, suffixes: tuple[str, ...] = ("", ".gz")) -> Path:
    for folder in (root, *(root / s for s in subdirs)):
        for suffix in suffixes:
            path = folder / (stem + suffix)
            if path.is_file():
                return path
    raise MpisError(f"missing file {stem}{suffixes[-1] if len(suffixes) > 1 else ''} (or {stem}) in {root}")


# SHA-256 of the published files' content (the IDX bytes, gunzipped), computed from the .gz files that match
# the datasets' published MD5s. Hashing the content, not the .gz, also knows a raw copy and a re-compressed
# one (Debian's dataset-fashion-mnist: other gzip headers, other MD5s). -> (dataset, file)
KNOWN_IDX = {
    "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db": ("mnist", "train-images-idx3-ubyte"),
    "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5": ("mnist", "train-labels-idx1-ubyte"),
    "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7": ("mnist", "t10k-images-idx3-ubyte"),
    "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2": ("mnist", "t10k-labels-idx1-ubyte"),
    "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888": ("fashion-mnist", "train-images-idx3-ubyte"),
    "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9": ("fashion-mnist", "train-labels-idx1-ubyte"),
    "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b": ("fashion-mnist", "t10k-images-idx3-ubyte"),
    "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34": ("fashion-mnist", "t10k-labels-idx1-ubyte"),
}
_IDX_NAMES = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}


def check_idx_identity(path: Path, raw: bytes, name: str, stem: str) -> None:
    """Refuse a published file read as another: MNIST's digits under --dataset fashion-mnist (or the other
    way round) have the same format and shapes and would train as clothing. Unknown content (one's own
    files) passes; one SHA-256 per file and load, 0.03 s for the 47 MB of training images."""
    known = KNOWN_IDX.get(hashlib.sha256(raw).hexdigest())
    if known is None or known == (name, stem):
        return
    dataset, role = known
    what = _IDX_NAMES[dataset] + "'s" + ("" if role == stem else f" {role}")
    if dataset != name:
        raise MpisError(f"{path} is {what}, not {_IDX_NAMES[name]}'s: pass --dataset {dataset}")
    raise MpisError(f"{path} is {what}, not its {stem}: the files are renamed")


def read_idx(path: Path, expect: tuple[str, str] | None = None) -> np.ndarray:
    """Read one IDX file (unsigned-byte data, any rank), raw or gzip-compressed; with `expect` (dataset,
    file stem) a published file of another dataset or role is refused (`check_idx_identity`)."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise MpisError(f"corrupt file {path}: {err}") from None
    if expect is not None:
        check_idx_identity(path, raw, *expect)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise MpisError(f"corrupt file {path}: not an unsigned-byte IDX file")
    rank = raw[3]
    header = 4 + 4 * rank
    if len(raw) < header:
        raise MpisError(f"corrupt file {path}: truncated header")
    dims = struct.unpack(f">{rank}I", raw[4:header])
    count = int(np.prod(dims))
    if len(raw) != header + count:
        raise MpisError(
            f"corrupt file {path}: expected {count} bytes of data for shape {dims}, found {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _idx_dataset(root: Path, name: str) -> DataSplit:
    parts = []
    for split in ("train", "test"):
        image_stem, label_stem = _IDX_FILES[split]
        image_path = _find(root, _IDX_SUBDIRS[name], image_stem)
        label_path = _find(root, _IDX_SUBDIRS[name], label_stem)
        images, labels = read_idx(image_path, (name, image_stem)), read_idx(label_path, (name, label_stem))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise MpisError(f"corrupt files {image_path} / {label_path}: {images.shape} images, {labels.shape} labels")
        if labels.max(initial=0) > 9:
            raise MpisError(f"corrupt file {label_path}: label {labels.max()} outside 0-9")
        x = torch.from_numpy(images.astype(np.float32) / 255.0)[:, None]
        parts.append(TensorDataset(x, torch.from_numpy(labels.astype(np.int64))))
    return DataSplit(parts[0], parts[1], tuple(parts[0].tensors[0].shape[1:]), 10)


# ---- CIFAR (python pickle batches) ------------------------------------------------------------
_CIFAR = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", 100),
}
_CIFAR_MEAN = torch.tensor([0.4914, 0.4822, 0.4465])[:, None, None]
_CIFAR_STD = torch.tensor([0.2470, 0.2435, 0.2616])[:, None, None]


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR batch holds — dicts, lists, bytes, numbers and numpy arrays — so that a
    crafted batch cannot name a function to call (the pickle format calls whatever `find_class` returns)."""

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),  # numpy 1 pickles (the published files)
        ("numpy._core.multiarray", "_reconstruct"),  # numpy 2 pickles
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),  # how protocol-2 pickles write bytes
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a CIFAR batch (refused: it could run code)")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path, label_key: bytes, classes: int) -> tuple[Tensor, Tensor]:
    if not path.is_file():
        raise MpisError(f"missing file {path}")
    try:
        with path.open("rb") as handle:
            batch = _CifarUnpickler(handle, encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except Exception as err:  # unpickling a damaged file can raise almost anything
        raise MpisError(f"corrupt file {path}: {type(err).__name__}: {err}") from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise MpisError(f"corrupt file {path}: data {data.shape}, labels {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        raise MpisError(f"corrupt file {path}: labels outside 0-{classes - 1}")
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0)
    return (images - _CIFAR_MEAN) / _CIFAR_STD, torch.from_numpy(labels)


def _cifar(root: Path, name: str) -> DataSplit:
    """The batches that are there: CIFAR-10's five training batches are independent shards, so a partial
    copy (say only `data_batch_1`) trains on what it has, with a note naming what is missing, rather than
    being refused; the test batch is required, so that accuracies stay comparable."""
    folder, train_files, test_files, label_key, classes = _CIFAR[name]
    base = root / folder if (root / folder).is_dir() else root
    present = [f for f in train_files if (base / f).is_file()]
    if not present:
        raise MpisError(f"missing file {base / train_files[0]}: {name} needs at least one of {', '.join(train_files)}")
    splits = []
    for files in (present, test_files):
        pieces = [_read_cifar_batch(base / f, label_key, classes) for f in files]
        splits.append(TensorDataset(torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces])))
    missing = [f for f in train_files if f not in present]
    note = None
    if missing:
        note = (
            f"{name}: a partial copy in {base}: training on {', '.join(present)} ({len(splits[0])} images); "
            f"missing {', '.join(missing)}"
        )
    return DataSplit(splits[0], splits[1], (3, 32, 32), classes, augment=crop_flip, note=note)


def crop_flip(images: Tensor) -> Tensor:
    """The usual CIFAR augmentation: random 32×32 crop of the 4-padded image and random h-flip."""
    batch, _, height, width = images.shape
    padded = F.pad(images, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (batch,))
    dx = torch.randint(0, 9, (batch,))
    rows = (dy[:, None] + torch.arange(height))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(width))[:, None, None, :]
    out = padded[
        torch.arange(batch)[:, None, None, None], torch.arange(images.shape[1])[None, :, None, None], rows, cols
    ]
    flip = torch.rand(batch) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


# ---- N-MNIST (binary event files) ------------------------------------------------------------
NMNIST_SIZE = 34


def read_nmnist_events(path: Path) -> np.ndarray:
    """Events of one N-MNIST .bin file as rows (x, y, polarity, timestamp µs); 5 bytes per event."""
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size % 5:
        raise MpisError(f"corrupt file {path}: {raw.size} bytes is not a whole number of 5-byte events")
    ev = raw.reshape(-1, 5).astype(np.int64)
    x, y = ev[:, 0], ev[:, 1]
    polarity = ev[:, 2] >> 7
    timestamp = ((ev[:, 2] & 127) << 16) | (ev[:, 3] << 8) | ev[:, 4]
    if (x >= NMNIST_SIZE).any() or (y >= NMNIST_SIZE).any():
        raise MpisError(f"corrupt file {path}: event address outside the 34×34 sensor")
    return np.stack([x, y, polarity, timestamp], axis=1)


def bin_events(events: np.ndarray, frames: int) -> Tensor:
    """Event counts in `frames` equal time bins: (frames, 2 polarities, 34, 34)."""
    out = torch.zeros(frames, 2, NMNIST_SIZE, NMNIST_SIZE)
    if len(events) == 0:
        return out
    t = events[:, 3] - events[:, 3].min()
    span = max(int(t.max()) + 1, 1)
    index = np.minimum(t * frames // span, frames - 1)
    flat = ((index * 2 + events[:, 2]) * NMNIST_SIZE + events[:, 1]) * NMNIST_SIZE + events[:, 0]
    counts = np.bincount(flat, minlength=out.numel())
    return torch.from_numpy(counts.astype(np.float32)).reshape(out.shape)


class NMNIST(Dataset):
    """Reads and bins one sample per access (the whole set binned at T=30 would need >4 GB); `mean`: the
    frames' mean (event counts / frames), the static input the rate graph sees."""

    def __init__(self, files: list[tuple[Path, int]], frames: int, mean: bool = False):
        self.files = files
        self.frames = frames
        self.mean = mean

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path, label = self.files[index]
        if self.mean:
            return bin_events(read_nmnist_events(path), 1)[0] / self.frames, label
        return bin_events(read_nmnist_events(path), self.frames), label


def _nmnist(root: Path, frames: int, mean: bool) -> DataSplit:
    base = root / "N-MNIST" if (root / "N-MNIST").is_dir() else root
    splits = []
    for split in ("Train", "Test"):
        folder = base / split
        if not folder.is_dir():
            raise MpisError(f"missing folder {folder} (N-MNIST expects {split}/<digit>/*.bin)")
        files = [(p, int(p.parent.name)) for p in sorted(folder.glob("[0-9]/*.bin"))]
        if not files:
            raise MpisError(f"missing files: no {split}/<digit>/*.bin event files under {base}")
        splits.append(NMNIST(files, frames, mean))
    return DataSplit(splits[0], splits[1], (2, NMNIST_SIZE, NMNIST_SIZE), 10)
