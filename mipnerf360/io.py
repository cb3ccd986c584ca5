"""Reading and writing files: the one home of atomic writes.

Every file the package produces is written to a temporary name in the destination folder
and renamed into place (``os.replace``), so a killed process, a full disk or a concurrent
reader never sees half a file. Temporary names start with ``.tmp-`` so a run can remove
leftovers of killed writes (``remove_temporaries``). Files get the user's umask (0666 &
~umask), folders 0777 & ~umask, unlike ``tempfile``'s private 0600/0700.

OS errors (disk full, read-only folder, permission) are raised as ``errors.UserError``
naming the path.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mipnerf360.errors import UserError

TMP_PREFIX = ".tmp-"


def umask() -> int:
    """The process's umask (read without changing it for longer than one call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _os_error(path: str | os.PathLike, e: OSError) -> UserError:
    return UserError(f"{os.fspath(path)}: cannot write: {e.strerror or e}")


def make_temp(path: str | os.PathLike) -> str:
    """A new empty temporary file beside ``path`` (same suffix), with normal permissions."""
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=TMP_PREFIX, suffix=os.path.splitext(path)[1])
        os.close(fd)
        os.chmod(tmp, 0o666 & ~umask())
    except OSError as e:
        raise _os_error(path, e) from None
    return tmp


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename)."""
    tmp = make_temp(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise _os_error(path, e) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_yaml(path: str | os.PathLike, obj: Any) -> None:
    import yaml

    write_text(path, yaml.safe_dump(obj, sort_keys=False))


def write_csv(path: str | os.PathLike, rows: list[dict]) -> None:
    """Rows (dicts) to CSV; the header is the union of the keys in first-seen order."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    write_text(path, buf.getvalue())


def to_uint8(img: np.ndarray) -> np.ndarray:
    """[H,W,(C)] float in [0,1] -> uint8 with round(x * 255) (the metric quantisation)."""
    return np.clip(np.round(np.asarray(img, np.float64) * 255.0), 0, 255).astype(np.uint8)


def write_png(path: str | os.PathLike, img: np.ndarray) -> None:
    """PNG of a uint8 or uint16 [H,W] or [H,W,C] array (float arrays in [0,1] go through
    to_uint8)."""
    import imageio.v3 as iio

    arr = img if img.dtype in (np.uint8, np.uint16) else to_uint8(img)
    write_bytes(path, iio.imwrite("<bytes>", arr, extension=".png"))


def write_npy(path: str | os.PathLike, arr: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, arr)
    write_bytes(path, buf.getvalue())


def torch_save(obj: Any, path: str | os.PathLike) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(path, buf.getvalue())


def _read(path: str | os.PathLike, parse, kind: str, errors: tuple) -> Any:
    """``parse(open file)``; a missing, malformed or unreadable file is a UserError naming it."""
    try:
        with open(path) as f:
            return parse(f)
    except FileNotFoundError:
        raise UserError(f"{os.fspath(path)}: not found") from None
    except (*errors, UnicodeDecodeError) as e:
        raise UserError(f"{os.fspath(path)}: not valid {kind}: {e}") from None
    except OSError as e:
        raise UserError(f"{os.fspath(path)}: cannot read: {e.strerror or e}") from None


def read_json(path: str | os.PathLike) -> Any:
    """JSON file -> object (see ``_read`` for the errors)."""
    return _read(path, json.load, "JSON", (json.JSONDecodeError,))


def read_yaml(path: str | os.PathLike) -> Any:
    """YAML file -> object (see ``_read`` for the errors)."""
    import yaml

    return _read(path, yaml.safe_load, "YAML", (yaml.YAMLError,))


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Build a folder under a temporary name beside ``target``, then rename it into place.

    ``with atomic_dir(out) as tmp: ...write into tmp...``; on success an existing
    ``target`` is replaced (``replace=False``: kept, and the new build dropped: a cache
    another process built first), on an exception the temporary folder is removed. The
    folder gets the umask's permissions (not mkdtemp's 0700).
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f"{TMP_PREFIX}{target.name}-"))
        tmp.chmod(0o777 & ~umask())
    except OSError as e:
        raise _os_error(target, e) from None
    try:
        yield tmp
        if not replace:
            try:
                os.rename(tmp, target)  # fails if another process made target first
            except OSError:
                if not target.is_dir():
                    raise
            return
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except OSError as e:
        raise _os_error(target, e) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_temporaries(folder: str | os.PathLike) -> list[str]:
    """Delete leftover ``.tmp-*`` files/folders of killed writes in ``folder``; their paths."""
    removed = []
    if not os.path.isdir(folder):
        return removed
    for name in os.listdir(folder):
        if name.startswith(TMP_PREFIX):
            p = os.path.join(folder, name)
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)
            removed.append(p)
    return removed
