"""One image module: the same files are images for evaluation, calibration and the quick look; walks end (loops,
FIFOs and broken links refused by name); sizes are checked from the header; 16-bit images keep their range."""

from __future__ import annotations

import os
import struct
import threading
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tofu_export.calibration.images import CalibrationDataError, image_files
from tofu_export.evaluation.data import EvalImageError, image_folder
from tofu_export.images import (
    IMAGE_SUFFIXES,
    MAX_IMAGE_PIXELS,
    ImageError,
    decode_problem,
    evenly_spaced,
    find_images,
    load_rgb,
)
from tofu_export.quicklook import QuickLookDataError
from tofu_export.quicklook import image_files as quick_look_files


def _png(path: Path, value: int = 7) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)
    return path


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that declares ``width x height`` pixels but holds almost no data (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def _finishes(fn, timeout: float = 20.0) -> BaseException | None:
    """Run ``fn`` in a thread; fail if it does not end (a walk that hangs), return what it raised."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as error:  # handed to the test
            raised.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "the walk did not end"
    return raised[0] if raised else None


def test_a_pgm_folder_is_images_for_calibration_evaluation_and_the_quick_look(tmp_path: Path) -> None:
    assert ".pgm" in IMAGE_SUFFIXES
    for i in range(2):
        path = tmp_path / str(i) / f"{i}.pgm"
        path.parent.mkdir()
        Image.fromarray(np.full((8, 8), 9 * i, np.uint8)).save(path)
    expected = sorted(tmp_path.rglob("*.pgm"))
    assert find_images(tmp_path) == expected
    assert image_files(tmp_path)[1] == expected
    assert quick_look_files(tmp_path) == expected
    assert [Path(p) for p, _ in image_folder(tmp_path, lambda image: image).samples] == expected


def test_evenly_spaced_keeps_the_ends_balanced() -> None:
    assert evenly_spaced(list(range(10)), 5) == [0, 2, 4, 6, 8]
    assert evenly_spaced([1, 2], 5) == [1, 2]
    assert evenly_spaced([1, 2, 3], None) == [1, 2, 3]


def test_a_symbolic_link_loop_is_refused_by_name_and_never_hangs(tmp_path: Path) -> None:
    _png(tmp_path / "0" / "a.png")
    (tmp_path / "0" / "loop0").symlink_to("..")
    for call, kind in ((lambda: find_images(tmp_path), ImageError), (lambda: image_files(tmp_path),
                       CalibrationDataError), (lambda: quick_look_files(tmp_path), QuickLookDataError),
                       (lambda: image_folder(tmp_path, lambda image: image), EvalImageError)):
        error = _finishes(call)
        assert isinstance(error, kind) and "loop0" in str(error) and "loop" in str(error), error


def test_a_fifo_named_like_an_image_is_refused_without_opening_it(tmp_path: Path) -> None:
    _png(tmp_path / "0" / "a.png")
    os.mkfifo(tmp_path / "0" / "pipe.png")
    for call in (lambda: find_images(tmp_path), lambda: image_folder(tmp_path, lambda image: image)):
        error = _finishes(call)
        assert isinstance(error, ImageError) and "pipe.png" in str(error) and "FIFO" in str(error), error


def test_a_broken_link_named_like_an_image_is_refused(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    (tmp_path / "b.png").symlink_to(tmp_path / "gone.png")
    with pytest.raises(ImageError, match=r"b\.png is a broken symbolic link"):
        find_images(tmp_path)


def test_sixteen_bit_images_are_scaled_with_their_real_range_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257, 32896, 65535]] * 4, dtype=np.uint16)  # 0, 1, 128, 255 in 8 bit
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode in ("I;16", "I")
    rgb = np.asarray(load_rgb(tmp_path / "deep.png"))
    assert rgb.shape == (4, 4, 3) and rgb[0, :, 0].tolist() == [0, 1, 128, 255]
    assert decode_problem(tmp_path / "deep.png") is None


def test_float_images_are_refused_with_the_reason(tmp_path: Path) -> None:
    Image.fromarray(np.full((4, 4), 0.5, np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(ImageError, match="float image"):
        load_rgb(tmp_path / "float.tif")


@pytest.mark.parametrize("side", [10_000, 20_000])  # over our limit; over Pillow's own bomb limit too
def test_an_image_too_large_is_refused_from_its_header_before_decoding(tmp_path: Path, side: int) -> None:
    assert side * side > MAX_IMAGE_PIXELS
    path = _png_header_only(tmp_path / "huge.png", side, side)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with pytest.raises(ImageError, match=r"huge\.png") as caught:
            load_rgb(path)
        assert "huge.png" in (decode_problem(path) or "")
    assert "pixels" in str(caught.value) or "DecompressionBomb" in str(caught.value)
    # Pillow's own warning (above its limit, below twice it: the 10,000 case) would only repeat the error
    assert MAX_IMAGE_PIXELS < Image.MAX_IMAGE_PIXELS
    assert [str(w.message) for w in shown] == []


def test_an_undecodable_file_names_itself(tmp_path: Path) -> None:
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(ImageError, match=r"broken\.png is not a readable image"):
        load_rgb(tmp_path / "broken.png")
