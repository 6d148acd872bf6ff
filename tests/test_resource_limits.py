"""Small untrusted files cannot drive memory: sizes are checked from headers and metadata before allocation.

Each crafted file is loaded in a forked child whose address space is capped at what it already uses plus 2 GB
(``RLIMIT_AS``), so a regression fails with a MemoryError-like error instead of swapping the machine.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from tofu_export.checkpoint_limits import MAX_DEPTH

CAP = 2 << 30


SERVER = r"""
import os, resource, sys
from pathlib import Path
from tofu_export.checkpoint import load_state_dict  # imported once; no torch op runs before the forks

def vm_bytes():
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmSize"))
    return int(line.split()[1]) * 1024

for path in sys.stdin.read().split("\n"):
    if not path:
        continue
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            limit = vm_bytes() + int(sys.argv[1])
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            result = f"ok {len(load_state_dict(path))}"
        except BaseException as error:
            result = f"{type(error).__name__}: {error}"
        os.write(write, result.replace("\n", " ").encode()[:4000])
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        print(pipe.read(), flush=True)
    os.waitpid(pid, 0)
"""


def load_capped(*paths: Path) -> list[str]:
    """Load each path in a forked child of a fresh server process (forking this test process, whose torch thread
    pool has run, can deadlock), under an address-space cap; ``"ok N"`` or the error's type and message."""
    done = subprocess.run([sys.executable, "-c", SERVER, str(CAP)], input="\n".join(map(str, paths)),
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


class _Storage:
    pass


class _Tensor:
    def __init__(self, numel: int) -> None:
        self.storage, self.numel = _Storage(), numel

    def __reduce__(self) -> tuple:
        return torch._utils._rebuild_tensor_v2, (self.storage, 0, (self.numel,), (1,), False, OrderedDict())


def _legacy_declaring(path: Path, numel: int) -> None:
    """A legacy (pre-zip) torch.save file whose one storage declares ``numel`` floats but holds 64 bytes."""
    class Pickler(pickle.Pickler):
        def persistent_id(self, obj: object) -> object:
            return ("storage", torch.FloatStorage, "0", "cpu", numel) if isinstance(obj, _Storage) else None

    with open(path, "wb") as handle:
        for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}):
            pickle.dump(header, handle, protocol=2)
        Pickler(handle, protocol=2).dump({"w": _Tensor(numel)})
        pickle.dump(["0"], handle, protocol=2)
        handle.write(struct.pack("<q", numel) + b"\0" * 64)


def _deflated(path: Path) -> None:
    """A torch zip whose 16 MB storage is deflate-compressed into a few KB."""
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(16 << 20, dtype=torch.uint8)}, buffer)
    source = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as bomb:
        for member in source.infolist():
            bomb.writestr(member.filename, source.read(member))


def _lying_header(path: Path) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [100000, 100000], "data_offsets": [0, 4]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)


GOOD = ("zip.pth", "legacy.pth", "w.safetensors", "half.pth")


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, str], int, Path]:
    """Every file below made once and loaded once (one server process): ``(name -> result, tensor count, dir)``."""
    folder = tmp_path_factory.mktemp("limits")
    torch.manual_seed(0)
    state = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=1, img_size=32).state_dict()
    torch.save(state, folder / "zip.pth")
    torch.save({"model": state}, folder / "legacy.pth", _use_new_zipfile_serialization=False)
    save_file(state, str(folder / "w.safetensors"))
    torch.save({key: value.half() for key, value in state.items()}, folder / "half.pth")
    torch.save({**state, "head.weight": torch.zeros(1).expand(10**10)}, folder / "expanded.pth")
    _deflated(folder / "bomb.pth")
    _legacy_declaring(folder / "legacy_40gb.pth", 10**10)
    torch.save({**state, "blocks.99999.norm1.weight": torch.ones(192)}, folder / "deep.pth")
    wide = {**state, "cls_token": torch.zeros(1, 1, 8192), "blocks.200.norm1.weight": torch.ones(4)}
    save_file(wide, str(folder / "wide.safetensors"))
    _lying_header(folder / "lie.safetensors")
    names = sorted(path.name for path in folder.iterdir())
    return dict(zip(names, load_capped(*(folder / name for name in names)), strict=True)), len(state), folder


def _refused(loaded: tuple[dict[str, str], int, Path], name: str, *phrases: str) -> None:
    result = loaded[0][name]
    assert result.startswith("CheckpointLimitError"), result
    for phrase in phrases:
        assert phrase in result, f"{phrase!r} not in {result}"


def test_real_checkpoints_in_every_format_still_load(loaded: tuple[dict[str, str], int, Path]) -> None:
    results, count, _ = loaded
    assert [results[name] for name in GOOD] == [f"ok {count}"] * len(GOOD)


def test_a_stride_zero_expansion_is_refused_before_it_is_read(loaded: tuple[dict[str, str], int, Path]) -> None:
    _refused(loaded, "expanded.pth", "head.weight", "10,000,000,000", "storage holds 1")


def test_a_compressed_member_that_expands_past_the_file_is_refused(loaded: tuple[dict[str, str], int, Path]) -> None:
    assert (loaded[2] / "bomb.pth").stat().st_size < 1 << 20
    _refused(loaded, "bomb.pth", "compressed", "data/0")


def test_a_legacy_file_declaring_more_than_it_holds_is_refused(loaded: tuple[dict[str, str], int, Path]) -> None:
    _refused(loaded, "legacy_40gb.pth", "declares 40.00 GB")


def test_a_stray_block_index_is_named_not_built(loaded: tuple[dict[str, str], int, Path]) -> None:
    _refused(loaded, "deep.pth", "blocks.99999.norm1.weight", f"at most {MAX_DEPTH} blocks")


def test_keys_describing_a_model_far_larger_than_the_file_are_refused(loaded: tuple[dict[str, str], int, Path]) -> None:
    _refused(loaded, "wide.safetensors", "201 blocks x width 8192")


def test_a_safetensors_header_whose_shapes_exceed_its_data_is_refused(loaded: tuple[dict[str, str], int, Path]) -> None:
    _refused(loaded, "lie.safetensors", "[100000, 100000]")
