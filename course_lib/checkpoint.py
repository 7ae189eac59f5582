"""Atomic checkpoint files, safe loading and random-number states.

A checkpoint is written to a temporary file in the same folder, flushed,
fsynced and then renamed over the target with `os.replace`. A crash at any
moment therefore leaves either the previous file or the new one, never a
partial file under the real name.

Loading always uses ``torch.load(weights_only=True)``: it restores tensors and
plain Python containers but refuses to import arbitrary classes, so opening a
downloaded checkpoint cannot run code hidden in it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import random
import re
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn

_ZIP_MAGIC = b"PK\x03\x04"
# Files that a training run writes atomically, plus the folder's write probe.
_RUN_FILE_NAMES = ("best.pt", "last.pt", "history.csv", "curves.png", "write-probe")
TEMP_SUFFIX = ".tmp"


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, damaged, unsafe or does not fit the model."""


class CheckpointWriteError(OSError):
    """A file of the run could not be written; the file under its name is unchanged."""


def to_cpu(obj: Any) -> Any:
    """Return a copy of `obj` with every tensor moved to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, Mapping):
        return {key: to_cpu(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [to_cpu(value) for value in obj]
    if isinstance(obj, tuple):
        return tuple(to_cpu(value) for value in obj)
    return obj


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write `state` to `path` atomically, with every tensor on the CPU.

    Saving CPU tensors lets the file load on any machine; `load_checkpoint`
    moves them to the target device.
    """
    cpu_state = to_cpu(state)
    return _write_atomic(path, lambda f: torch.save(cpu_state, f))


def write_text_atomic(text: str, path: str | os.PathLike) -> Path:
    """Write a UTF-8 text file atomically."""
    data = text.encode("utf-8")
    return _write_atomic(path, lambda f: f.write(data))


def write_bytes_atomic(data: bytes, path: str | os.PathLike) -> Path:
    """Write a binary file atomically."""
    return _write_atomic(path, lambda f: f.write(data))


def _write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    # The temporary file sits in the target's folder because os.replace is
    # only atomic within one file system.
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX
    )
    try:
        # mkstemp creates the file with mode 0600; give it the mode that
        # open() would, so other users can read the run as usual.
        os.fchmod(fd, _default_file_mode())
        with os.fdopen(fd, "wb") as f:
            try:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            except (OSError, RuntimeError) as err:
                # torch.save reports a short write as a RuntimeError about
                # zip positions, so both kinds get one message that names
                # the file and the likely causes.
                raise CheckpointWriteError(
                    errno.EIO, f"writing stopped after {f.tell()} bytes: a full "
                    "disk, a file size limit or an I/O error", str(path),
                ) from err
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_folder(path.parent)
    return path


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete temporary files that a killed write of course_lib left in `folder`.

    Only the names that `_write_atomic` and the folder check create are
    matched (``.last.pt.XXXX.tmp`` and the like), so other files stay.
    """
    removed = []
    patterns = [f".{name}.*{TEMP_SUFFIX}" for name in _RUN_FILE_NAMES]
    candidates = [tmp for pattern in patterns for tmp in Path(folder).glob(pattern)]
    for tmp in candidates:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            removed.append(tmp)
    return removed


def _default_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_folder(folder: Path) -> None:
    # The rename is only durable once the folder entry itself is on disk.
    # Some platforms (Windows) cannot open a folder; the rename is still atomic.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(
    path: str | os.PathLike,
    map_location: torch.device | str = "cpu",
    required_keys: Iterable[str] = (),
) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` onto `map_location`.

    Raises:
        CheckpointError: if the file is missing, truncated, not a checkpoint,
            needs unsafe unpickling (the error names the global), or lacks one
            of `required_keys`. It never retries with ``weights_only=False``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} not found; check the path or train a run first"
        )
    with path.open("rb") as f:
        magic = f.read(len(_ZIP_MAGIC))
    if magic != _ZIP_MAGIC:
        size = path.stat().st_size
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint (size {size} bytes, no zip header); "
            "pass a file written by torch.save, such as best.pt or last.pt"
        )

    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        match = re.search(r"GLOBAL ([\w.]+)", str(err))
        if match:
            name = match.group(1)
            raise CheckpointError(
                f"{path} needs unsafe unpickling of the global {name}, which could "
                "run arbitrary code, so it was not loaded. Only if you trust the "
                f"file and {name} is a plain data class (never a function such as "
                "os.system), allow it with torch.serialization.add_safe_globals "
                "and load the file again."
            ) from None
        raise CheckpointError(
            f"{path} could not be unpickled ({_first_line(err)}); "
            "it is damaged or not a checkpoint"
        ) from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as err:
        raise CheckpointError(
            f"{path} is truncated or damaged ({type(err).__name__}: {_first_line(err)}); "
            "use another checkpoint, for example best.pt instead of last.pt, "
            "or start a new run"
        ) from None

    if not isinstance(state, dict):
        raise CheckpointError(
            f"{path} contains a {type(state).__name__}, not a checkpoint dict; "
            "pass a file written by course_lib, such as best.pt or last.pt"
        )
    missing = [key for key in required_keys if key not in state]
    if missing:
        raise CheckpointError(
            f"{path} lacks the keys {missing}; pass a file written by course_lib "
            "(best.pt has model, epoch and metric; last.pt has the full state)"
        )
    return state


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "no message"


def load_weights(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint"
) -> None:
    """Load `state_dict` into `model`, listing every mismatched key on failure.

    Raises:
        CheckpointError: if keys are missing or unexpected, or shapes differ.
    """
    check_weights_fit(model, state_dict, source)
    model.load_state_dict(state_dict)


def check_weights_fit(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint"
) -> None:
    """Raise the CheckpointError of `load_weights` without changing `model`."""
    own = model.state_dict()
    missing = [key for key in own if key not in state_dict]
    unexpected = [key for key in state_dict if key not in own]
    wrong_shape = [
        f"{key} (checkpoint {tuple(state_dict[key].shape)}, "
        f"model {tuple(own[key].shape)})"
        for key in own
        if key in state_dict
        and hasattr(state_dict[key], "shape")
        and state_dict[key].shape != own[key].shape
    ]
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"missing keys {_short_list(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_short_list(unexpected)}")
        if wrong_shape:
            parts.append(f"shape mismatches {_short_list(wrong_shape)}")
        raise CheckpointError(
            f"{source} was saved from another architecture than "
            f"{type(model).__name__}: {'; '.join(parts)}. Build the same model "
            "that wrote it, or start a new run in another folder."
        )


def _short_list(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    if len(items) > limit:
        shown += f", and {len(items) - limit} more"
    return f"[{shown}]"


def capture_rng_state(generator: torch.Generator | None = None) -> dict[str, Any]:
    """Return every random-number state that affects a run.

    That is torch's CPU generator, every CUDA device's generator, NumPy's and
    Python's global generators, and the data-order `generator` if given. NumPy's
    state is stored as tensors and numbers so that ``weights_only`` loading
    accepts it.
    """
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
        "python": _python_state_to_plain(random.getstate()),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "data_order": generator.get_state() if generator is not None else None,
    }
    return state


def restore_rng_state(
    state: Mapping[str, Any], generator: torch.Generator | None = None
) -> None:
    """Restore the states saved by `capture_rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["name"],
            np_state["keys"].cpu().numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    random.setstate(_python_state_from_plain(state["python"]))
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available():
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])
        else:
            # NOTE: a different GPU count means the CUDA streams cannot match
            # the original run, so only the first device's state is restored.
            torch.cuda.set_rng_state(cuda_states[0].cpu())
    if generator is not None and state.get("data_order") is not None:
        generator.set_state(state["data_order"].cpu())


def _python_state_to_plain(state: tuple) -> dict[str, Any]:
    version, internal, gauss_next = state
    return {"version": version, "internal": list(internal), "gauss_next": gauss_next}


def _python_state_from_plain(plain: Mapping[str, Any]) -> tuple:
    return (plain["version"], tuple(plain["internal"]), plain["gauss_next"])


# --- checking a last.pt before a resume -------------------------------------

_RESUME_FIX = (
    "restore the file from a copy, or start a new run in another folder (--out)"
)


def check_last_checkpoint(state: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Check that `state`, loaded from a last.pt, has every field a resume reads.

    Each field must have the type that `train_model` writes, and the CPU
    random states the size of this process's generators. A resume runs this
    first, so that a damaged file stops it before the model, the optimizer,
    the random states or any file are changed.

    NOTE: only the structure is checked. A tensor of the wrong shape inside the
    optimizer state still loads and fails at the first optimizer step.

    Raises:
        CheckpointError: naming `path`, the missing or invalid field and the fix.
    """
    fields = _FieldReader(path)
    fields.get(state, "model", "a dict of tensors (a model state_dict)",
               _is_tensor_dict)

    optimizer = fields.get(state, "optimizer", "a dict (an optimizer state_dict)",
                           _is_dict)
    fields.get(optimizer, "optimizer.state", "a dict", _is_dict)
    fields.get(optimizer, "optimizer.param_groups",
               "a list of dicts that each have a params list", _is_param_groups)
    for name in ("scheduler", "scaler"):
        fields.get(state, name, f"None or a dict (a {name} state_dict)",
                   _is_optional(_is_dict), optional=True)

    epoch = fields.get(state, "epoch", "an integer of at least 1", _is_count(1))
    stopper = fields.get(state, "early_stopping", "a dict", _is_dict)
    fields.get(stopper, "early_stopping.best", "None or a number",
               _is_optional(_is_number))
    fields.get(stopper, "early_stopping.best_epoch",
               "None or an integer of at least 1", _is_optional(_is_count(1)))
    fields.get(stopper, "early_stopping.counter", "an integer of at least 0",
               _is_count(0))
    history = fields.get(state, "history",
                         "a list of dicts with the same columns, one row per epoch",
                         _is_history)
    if len(history) != epoch:
        raise CheckpointError(
            f"{path} has {len(history)} history rows but its epoch field is "
            f"{epoch}, and a resume needs one row per epoch; {_RESUME_FIX}"
        )

    fields.get(state, "config", "a dict of the run's settings", _is_dict)
    fields.get(state, "finished", "True or False", _is_bool, optional=True)
    _check_rng_fields(fields, fields.get(state, "rng", "a dict", _is_dict))


def _check_rng_fields(fields: _FieldReader, rng: Mapping[str, Any]) -> None:
    # The expected sizes come from this process's own generators, so a state
    # that restore_rng_state would reject is caught here first.
    torch_state = torch.get_rng_state()
    generator_state = f"a uint8 tensor of shape {tuple(torch_state.shape)}"
    fields.get(rng, "rng.torch", generator_state, _is_like(torch_state))
    fields.get(rng, "rng.data_order", f"None or {generator_state}",
               _is_optional(_is_like(torch_state)), optional=True)
    fields.get(rng, "rng.cuda", "a list of uint8 tensors", _is_byte_tensor_list,
               optional=True)

    numpy_state = fields.get(rng, "rng.numpy", "a dict", _is_dict)
    key_count = np.random.get_state()[1].size
    fields.get(numpy_state, "rng.numpy.name", "a string", _is_str)
    fields.get(numpy_state, "rng.numpy.keys", f"an integer tensor of {key_count} keys",
               _is_integer_tensor(key_count))
    fields.get(numpy_state, "rng.numpy.pos", f"an integer from 0 to {key_count}",
               _is_count(0, key_count))
    fields.get(numpy_state, "rng.numpy.has_gauss", "0 or 1", _is_count(0, 1))
    fields.get(numpy_state, "rng.numpy.cached_gaussian", "a number", _is_number)

    python_state = fields.get(rng, "rng.python", "a dict", _is_dict)
    word_count = len(random.getstate()[1])
    fields.get(python_state, "rng.python.version", "an integer of at least 0",
               _is_count(0))
    fields.get(python_state, "rng.python.internal", f"a list of {word_count} integers",
               _is_integer_list(word_count))
    fields.get(python_state, "rng.python.gauss_next", "None or a number",
               _is_optional(_is_number))


class _FieldReader:
    """Reader of a loaded last.pt that raises CheckpointError for a bad field."""

    def __init__(self, path: str | os.PathLike):
        self.path = path

    def get(
        self,
        container: Mapping[str, Any],
        name: str,
        expected: str,
        is_valid: Callable[[Any], bool],
        optional: bool = False,
    ) -> Any:
        """Return the field `name`, given dotted from the checkpoint's top level.

        A missing optional field returns None.
        """
        key = name.rsplit(".", 1)[-1]
        if key not in container:
            if optional:
                return None
            raise CheckpointError(
                f"{self.path} has no field {name}, which a resume needs; {_RESUME_FIX}"
            )
        value = container[key]
        if not is_valid(value):
            raise CheckpointError(
                f"{self.path} field {name} is {_describe(value)}, but a resume "
                f"needs {expected}; {_RESUME_FIX}"
            )
        return value


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"the {type(value).__name__} {text}"


def _is_dict(value: Any) -> bool:
    return isinstance(value, Mapping)


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_optional(is_valid: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or is_valid(value)


def _is_count(minimum: int, maximum: int | None = None) -> Callable[[Any], bool]:
    def is_count(value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, int):
            return False
        return value >= minimum and (maximum is None or value <= maximum)

    return is_count


def _is_like(reference: torch.Tensor) -> Callable[[Any], bool]:
    def is_like(value: Any) -> bool:
        return (
            isinstance(value, torch.Tensor)
            and value.dtype == reference.dtype
            and value.shape == reference.shape
        )

    return is_like


def _is_integer_tensor(size: int) -> Callable[[Any], bool]:
    def is_integer_tensor(value: Any) -> bool:
        if not isinstance(value, torch.Tensor) or torch.is_floating_point(value):
            return False
        return value.numel() == size

    return is_integer_tensor


def _is_integer_list(size: int) -> Callable[[Any], bool]:
    def is_integer_list(value: Any) -> bool:
        if not isinstance(value, (list, tuple)) or len(value) != size:
            return False
        return all(_is_count(0)(item) for item in value)

    return is_integer_list


def _is_byte_tensor_list(value: Any) -> bool:
    if not isinstance(value, list):
        return False
    return all(
        isinstance(item, torch.Tensor) and item.dtype == torch.uint8 for item in value
    )


def _is_tensor_dict(value: Any) -> bool:
    if not _is_dict(value):
        return False
    return all(
        isinstance(key, str) and isinstance(item, torch.Tensor)
        for key, item in value.items()
    )


def _is_param_groups(value: Any) -> bool:
    if not isinstance(value, list):
        return False
    return all(_is_dict(group) and isinstance(group.get("params"), list)
               for group in value)


def _is_history(value: Any) -> bool:
    if not isinstance(value, list) or not all(_is_dict(row) for row in value):
        return False
    # History requires every row to have the first row's columns, in order.
    return all(list(row) == list(value[0]) for row in value)
