"""What writing a tuned tower back into the whole checkpoint it came from reads and checks, for every family that
does it (open_clip, a transformers two-tower model): the source must still be what was loaded; only the tensors
outside the tower are read (of a safetensors file the tower's shapes come from its header, so the old tower is never
held beside the tuned one); the tuned tensors must map back onto the tower's, name for name and shape for shape."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path

from torch import Tensor

from tofu_export.checkpoint import CheckpointError, load_state_dict
from tofu_export.checkpoint_limits import inspect_safetensors, is_safetensors

__all__ = ["check_maps_back", "check_unchanged", "read_rest"]


def check_unchanged(source: Path, digest: str, loaded: str | None) -> None:
    """The source's content hash now (``digest``) is the one it was loaded with: the rest of the model written back
    beside the tuned tower must come from the weights that were tuned."""
    if loaded and digest != loaded:
        raise CheckpointError(f"{source} changed after it was loaded; the tuned tower was not written beside its "
                              "new contents")


def read_rest(files: Sequence[Path], in_tower: Callable[[str], bool],
              name: Callable[[str], str] = lambda key: key) -> tuple[dict[str, Tensor], dict[str, tuple[int, ...]]]:
    """Of the checkpoint's weights ``files``, under ``name(key)``: every tensor outside the tower (``in_tower``), as
    stored, and the tower's shapes. A pickle is read whole, as plain weights only (``weights_only``)."""
    from safetensors import safe_open

    rest: dict[str, Tensor] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        if not is_safetensors(file):
            for key, tensor in load_state_dict(file).items():
                if in_tower(name(key)):
                    shapes[name(key)] = tuple(tensor.shape)
                else:
                    rest[name(key)] = tensor
            continue
        header = inspect_safetensors(file)[0]
        shapes.update({name(key): tuple(shape) for key, shape in header.items() if in_tower(name(key))})
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            rest.update({name(key): handle.get_tensor(key) for key in header if not in_tower(name(key))})
    return rest, shapes


def check_maps_back(source: Path, shapes: Mapping[str, tuple[int, ...]], tuned: Mapping[str, Tensor],
                    reshaped: Collection[str] = ()) -> None:
    """The tuned tensors are the source tower's (``shapes``), name for name and shape for shape (``reshaped``
    excepted: the position embeddings of a tower tuned at another input size), or an error saying what differs."""
    missing, extra = sorted(set(shapes) - set(tuned)), sorted(set(tuned) - set(shapes))
    shaped = sorted(key for key in set(shapes) & set(tuned)
                    if shapes[key] != tuple(tuned[key].shape) and key not in reshaped)
    problems = [f"{what}: {', '.join(keys[:3])}" for what, keys in
                (("not in the tuned tower", missing), ("not in the source", extra), ("shaped differently", shaped))
                if keys]
    if problems:
        raise CheckpointError(f"the tuned tower does not map back onto the tower's weights in {source} "
                              f"({'; '.join(problems)}), so it was not written")
