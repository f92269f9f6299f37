"""What an .npz archive declares, read before anything is decompressed: the zip central directory
gives each member's declared size, each member's .npy header its dtype and shape. An archive whose
members would inflate to more than allowed, or whose headers declare more data than the member
holds (numpy would allocate the declared size first), is refused from these alone.

zipfile never inflates a member past its declared size (a member that does fails its CRC), and
numpy allocates what the header declares, so these checks bound the memory a later np.load uses."""
from __future__ import annotations

import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .errors import EdgeRuntimeError

LIMIT_ENV = "EDGETL_MAX_DATA_BYTES"
MAX_MEMBERS = 4096
MAX_HEADER_BYTES = 10000  # numpy's own default limit for .npy headers


class NpzError(EdgeRuntimeError):
    """An archive is not a readable .npz, or declares more than is allowed."""


@dataclass(frozen=True)
class Member:
    name: str  # the array's key (the member name without .npy)
    dtype: np.dtype
    shape: tuple[int, ...]
    nbytes: int  # what the header declares
    declared: int  # the member's uncompressed size in the zip directory


def default_limit() -> int:
    """Bytes an archive may inflate to: $EDGETL_MAX_DATA_BYTES, else half of the physical memory."""
    env = os.environ.get(LIMIT_ENV)
    if env:
        try:
            return max(0, int(env))
        except ValueError:
            raise NpzError(f"cannot be checked: ${LIMIT_ENV} must be a number of bytes, got {env!r}") from None
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def inspect(path: "str | Path | BinaryIO", max_bytes: int | None = None) -> dict[str, Member]:
    """(NpzError messages are verb phrases that leave the file's name to the caller.) The members of the archive at `path`, checked: total declared size within `max_bytes`
    (default: default_limit()), every member an .npy whose header fits in its declared size.
    Object (pickled) arrays are listed with their dtype; callers refuse them."""
    path = path if hasattr(path, "read") else Path(path)  # a path, or an open binary file (bytes read once)
    limit = default_limit() if max_bytes is None else max_bytes
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
            if len(infos) > MAX_MEMBERS:
                raise NpzError(f"has {len(infos)} members; an .npz of arrays has far fewer")
            total = sum(i.file_size for i in infos)
            if total > limit:
                hint = f" (set ${LIMIT_ENV} to allow more)" if max_bytes is None else ""
                raise NpzError(f"would inflate to {_mb(total)}, more than the {_mb(limit)} allowed{hint}")
            members = {}
            for info in infos:
                m = _member(z, info)
                members[m.name] = m
            return members
    except NpzError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, OSError, NotImplementedError,
            RuntimeError) as e:  # RuntimeError: an encrypted member
        why = e.strerror if isinstance(e, OSError) and e.strerror else " ".join(str(e).split())[:100]
        raise NpzError(f"is not a readable .npz archive ({why or type(e).__name__})") from None


def _member(z: zipfile.ZipFile, info: zipfile.ZipInfo) -> Member:
    if not info.filename.endswith(".npy"):
        raise NpzError(f"holds '{info.filename[:80]}', which is not an .npy array")
    name = info.filename[: -len(".npy")]
    with z.open(info) as f:  # reads (and inflates) only the header's few bytes
        version = np.lib.format.read_magic(f)
        read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read is None:
            raise NpzError(f"has an array '{name}' of an unsupported .npy version {version}")
        shape, _, dtype = read(f, max_header_size=MAX_HEADER_BYTES)
        offset = f.tell()
    if not isinstance(shape, tuple) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise NpzError(f"has an array '{name}' of an invalid shape {shape!r}")
    nbytes = math.prod(shape) * dtype.itemsize
    if not dtype.hasobject and offset + nbytes > info.file_size:
        raise NpzError(f"has an array '{name}' that declares shape {shape} ({_mb(nbytes)}) but its member holds "
                       f"only {_mb(info.file_size - offset)}; the archive is corrupt")
    return Member(name, dtype, shape, nbytes, info.file_size)
