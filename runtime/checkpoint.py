"""Crash-safe checkpoints: one safetensors file (BUNDLE.md) with the parameters and
optimizer state as tensors and, in its `__metadata__`, the step count, schedule, seed, bundle and a
sha256 over the metadata, the tensor table and the tensor bytes. Written to a temporary file in the
same directory, fsynced, renamed over the old one and the directory fsynced, so a crash (or a full
disk) at any moment leaves the previous checkpoint intact; a torn or altered file fails its
checksum on load. Two generations are kept (`path` and `path`.prev): a newest checkpoint that fails
its checks on load falls back to the previous one, with a warning. A training run holds a lock on
its checkpoint (`locked`), so two runs cannot interleave their saves; temporary files a killed
writer left are removed before the next write. Version 3 checkpoints (an npz, no pickles) are still
read."""
from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import io
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np

from . import safetensors
from .errors import CheckpointError, RuntimeNotice
from .npz import NpzError, default_limit
from .targets import CONTRACT

# 2: the checksum covers the header's metadata too (1 covered the arrays only).
# 3: the header names its bundle's manifest digest and the run's seed.
# 4: safetensors, the header in its __metadata__, the checksum over raw bytes (no JSON canon).
VERSION: int = CONTRACT["checkpoint"]["version"]
READS: tuple[int, ...] = tuple(CONTRACT["checkpoint"]["reads"])
FORMAT: str = CONTRACT["checkpoint"]["format"]
# __metadata__ values are strings: these keys hold decimal integers, these JSON text.
INT_KEYS: tuple[str, ...] = tuple(CONTRACT["checkpoint"]["int_keys"])
JSON_KEYS: tuple[str, ...] = tuple(CONTRACT["checkpoint"]["json_keys"])
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,17}")
HEADER = "__header__"
SCHEDULES: tuple[str, ...] = tuple(CONTRACT["checkpoint"]["schedules"])
MAX_HEADER_CHARS = 1 << 20
PREVIOUS = ".prev"
LOCK = ".lock"
LOCK_MAGIC = "edgetl-checkpoint-lock"
# What a lock file holds: nothing yet (just created, or its writer killed before writing), the
# writer's pid (as earlier versions wrote it), or the magic and the pid.
_LOCK_TEXT = re.compile(rb"(?:(?:" + LOCK_MAGIC.encode() + rb" )?\d{1,20}\n?)?")


def _digest(arrays: dict[str, np.ndarray], meta: dict) -> str:
    """Version 3's checksum (JSON text of the header as Python writes it, and the arrays)."""
    h = hashlib.sha256()
    h.update(json.dumps(meta, sort_keys=True).encode())
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(k.encode())
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def digest(metadata: dict[str, str], entries: list[safetensors.Entry], data: bytes | memoryview) -> str:
    """Version 4's checksum: sha256 over netstrings (`<byte length>:<bytes>,`) of the metadata's
    count, then its keys and values (all but 'sha256', in ascending order of their UTF-8 bytes),
    the tensors' count, then each tensor's name, dtype and comma-joined shape in data order, and
    last the data section's raw bytes. Nothing depends on how a JSON writer formats numbers."""
    h = hashlib.sha256()

    def net(text: str) -> None:
        b = text.encode()
        h.update(b"%d:%s," % (len(b), b))

    keys = sorted((k for k in metadata if k != "sha256"), key=lambda k: k.encode())
    net(str(len(keys)))
    for k in keys:
        net(k)
        net(metadata[k])
    net(str(len(entries)))
    for e in entries:
        net(e.name)
        net(e.dtype)
        net(",".join(map(str, e.shape)))
    h.update(data)
    return h.hexdigest()


def _meta_strings(meta: dict) -> dict[str, str]:
    out = {}
    for k, v in meta.items():
        if k in JSON_KEYS or not isinstance(v, (str, int)) or isinstance(v, bool):
            out[k] = json.dumps(v, sort_keys=True, separators=(",", ":"))
        else:
            out[k] = str(v)
    return out


def encode(arrays: dict[str, np.ndarray], meta: dict) -> bytes:
    """The bytes of a version 4 checkpoint of `arrays` (by manifest name) and `meta`."""
    metadata = {"format": FORMAT, "version": str(VERSION), **_meta_strings(meta)}
    plain = safetensors.encode(arrays, metadata)
    entries, _, start = safetensors.read_header(plain)
    metadata["sha256"] = digest(metadata, entries, memoryview(plain)[start:])
    return safetensors.encode(arrays, metadata)


def previous_path(path: str | Path) -> Path:
    """Where the generation before `path`'s newest checkpoint is kept."""
    path = Path(path)
    return path.with_name(path.name + PREVIOUS)


def _tmp_prefix(path: Path) -> str:
    return f"{path.name}.{os.getpid()}."


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (a pid we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _remove_stale_temps(path: Path) -> None:
    """Temporary files beside `path` that a killed writer left (best effort). A temporary file is
    named after its writer's pid; one of a live writer other than this process is left alone."""
    pattern = re.compile(re.escape(path.name) + r"\.(\d+)\.[^/]*\.tmp")
    try:
        for p in path.parent.glob(glob.escape(path.name) + ".*.tmp"):
            m = pattern.fullmatch(p.name)
            if m and int(m.group(1)) != os.getpid() and pid_alive(int(m.group(1))):
                continue
            try:
                p.unlink()
            except OSError:
                pass
    except OSError:
        pass


def _keep_previous(path: Path, directory: Path) -> None:
    """Make the current checkpoint at `path` (if any) the previous generation, keeping `path` in
    place throughout (a kill at any moment leaves it, and a run started without it would begin
    anew): a hard link, or where the file system has none (FAT), a copy."""
    prev = previous_path(path)
    if not path.is_file():
        return
    fd, link = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=".prev.tmp", dir=directory)
    os.close(fd)
    os.unlink(link)
    try:
        try:
            os.link(path, link)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EROFS, errno.EIO, errno.EDQUOT):
                raise
            with open(path, "rb") as src, open(link, "xb") as dst:
                shutil.copyfileobj(src, dst)
                dst.flush()
                os.fsync(dst.fileno())
        os.replace(link, prev)
    except OSError:
        try:
            os.unlink(link)
        except OSError:
            pass
        raise


def _check_foreign_previous(path: Path, meta: dict) -> None:
    """A first save removes `path`.prev, an earlier run's generation that is not this checkpoint's;
    only a valid checkpoint of the same bundle is removed: anything else there is refused."""
    prev = previous_path(path)
    if not (prev.exists() or prev.is_symlink()):
        return
    try:
        if prev.is_symlink() or not prev.is_file():
            raise CheckpointError("not a file")
        header = load_checkpoint(prev)[1]
        ours = header.get("bundle_manifest") == meta.get("bundle_manifest")
    except CheckpointError:
        ours = False
    if not ours:
        raise CheckpointError(f"cannot write checkpoint '{path}': '{prev}' exists and is not a checkpoint of this "
                              f"bundle (edgetl keeps the previous checkpoint there); move it away")


def save_checkpoint(path: str | Path, arrays: dict[str, np.ndarray], meta: dict, keep_previous: bool = True) -> Path:
    """Atomically replace `path` with a checkpoint of `arrays` and `meta` (a JSON-able dict); the
    checkpoint it replaces becomes the previous generation (`path` + '.prev'), unless
    `keep_previous` is False (it is known to be bad: the previous generation stays). Raises
    CheckpointError (the previous checkpoint intact) when it cannot be written."""
    path = Path(path)
    data = encode({n: np.asarray(v) for n, v in arrays.items()}, meta)
    directory = path.parent

    def failed(e: BaseException) -> CheckpointError:
        try:
            kept = "the previous checkpoint is intact" if path.is_file() else "no checkpoint was written"
        except (OSError, ValueError):
            kept = "no checkpoint was written"
        return CheckpointError(f"cannot write checkpoint '{path}': {getattr(e, 'strerror', None) or e}; {kept}")

    try:
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
        directory.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(path)  # before writing: on a full disk they may be what fills it
        first = not path.is_file()
        if first:
            _check_foreign_previous(path, meta)
        fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=".tmp", dir=directory)
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
        raise failed(e) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous:
            _keep_previous(path, directory)
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise failed(e) from None
    if first:  # a previous generation from an earlier run is not this checkpoint's
        try:
            previous_path(path).unlink()
        except OSError:
            pass
    # The rename is done; make it durable. Some file systems refuse fsync on a directory: the
    # new checkpoint is in place either way, so this is best effort.
    try:
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    _remove_stale_temps(path)
    return path


@contextlib.contextmanager
def locked(path: str | Path):
    """Hold an exclusive lock on the checkpoint `path` (a lock file beside it, `path` + '.lock')
    for one training run: a second run on the same checkpoint is refused instead of interleaving
    its saves. The lock dies with its process (flock), so a killed run never leaves it held."""
    path = Path(path)
    lock = path.with_name(path.name + LOCK)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    while True:
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            # O_NOFOLLOW: a symbolic link there is not written through
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot write checkpoint '{path}' (its lock file): "
                                  f"{getattr(e, 'strerror', None) or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = ""
            try:
                pid = os.pread(fd, 64, 0).decode().strip().rpartition(" ")[2]
                holder = f" (process {pid})" if pid.isdigit() else ""
            except (OSError, UnicodeDecodeError):
                pass
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise CheckpointError(f"checkpoint '{path}' is in use by another run{holder}; wait for it to end "
                                      f"or use another checkpoint") from None
            yield  # a file system without locks: go on unlocked
            return
        try:  # the file locked must still be the lock file (a finishing run removes it)
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except OSError:
            same = False
        if same:
            break
        os.close(fd)
    try:  # never truncate a file this lock did not create: a user's file of that name is refused
        ours = _LOCK_TEXT.fullmatch(os.pread(fd, 64, 0)) is not None
    except OSError:
        ours = False
    if not ours:
        os.close(fd)
        raise CheckpointError(f"cannot lock checkpoint '{path}': '{lock}' exists and is not an edgetl lock file; "
                              f"move it away")
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{LOCK_MAGIC} {os.getpid()}\n".encode(), 0)
    except OSError:
        pass
    try:
        yield
    finally:
        try:
            os.unlink(lock)
        except OSError:
            pass
        os.close(fd)


def load_latest(path: str | Path) -> tuple[dict[str, np.ndarray], dict, Path]:
    """load_checkpoint(path), or where `path` exists but cannot be read back intact, its previous
    generation, with a warning; (arrays, header, the file used)."""
    path = Path(path)
    try:
        return (*load_checkpoint(path), path)
    except CheckpointError as err:
        prev = previous_path(path)
        try:
            if not (path.exists() and prev.is_file()):
                raise
        except OSError:
            raise err from None
        try:
            arrays, header = load_checkpoint(prev)
        except CheckpointError:
            raise err from None
        warnings.warn(f"{err}; using the previous checkpoint '{prev}' (step {header['step']}) instead",
                      RuntimeNotice, stacklevel=3)
        return arrays, header, prev


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_meta(path: Path, h: dict) -> None:
    """The trainer's fields, so that a checkpoint that passes here can be resumed from."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise CheckpointError(f"checkpoint '{path}' has an invalid header: {what}")

    need(_is_int(h.get("step")) and h["step"] >= 0, "'step' must be a non-negative integer")
    need(_is_int(h.get("epoch")) and h["epoch"] >= 0, "'epoch' must be a non-negative integer")
    s = h.get("schedule")
    need(isinstance(s, dict), "'schedule' must be an object")
    need(s.get("name") in SCHEDULES, f"'schedule.name' must be one of {', '.join(SCHEDULES)}")
    lr = s.get("lr")
    need(isinstance(lr, (int, float)) and not isinstance(lr, bool) and math.isfinite(lr) and lr > 0,
         "'schedule.lr' must be a positive number")
    need(_is_int(s.get("total_steps")) and s["total_steps"] >= 0,
         "'schedule.total_steps' must be a non-negative integer")
    need("start_step" not in s or (_is_int(s["start_step"]) and 0 <= s["start_step"] <= h["step"]),
         "'schedule.start_step' must be an integer between 0 and 'step'")
    need(isinstance(h.get("bundle"), dict), "'bundle' must be an object")
    need(isinstance(h.get("bundle_manifest"), str), "'bundle_manifest' must be a string")
    need(_is_int(h.get("seed")) and h["seed"] >= 0, "'seed' must be a non-negative integer")


def load_checkpoint(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """(arrays by name, header) of a checkpoint written by save_checkpoint (version 4, or an
    earlier runtime's version 3), verified against its checksum. Raises CheckpointError for
    anything else (never unpickles)."""
    path = Path(path)
    try:
        if not path.is_file():
            what = "is not a file" if path.exists() else "does not exist"
            raise CheckpointError(f"checkpoint '{path}' {what}")
        size, limit = path.stat().st_size, default_limit()
        if size > limit:
            raise CheckpointError(f"checkpoint '{path}' is {size} bytes, more than the {limit} allowed; "
                                  f"not an edgetl checkpoint")
        data = path.read_bytes()
    except NpzError as e:
        raise CheckpointError(f"checkpoint '{path}' {e}") from None
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint '{path}': {e.strerror or e}") from None
    arrays, header = _load_v3(path, data) if data[:2] == b"PK" else _load_v4(path, data)
    _check_meta(path, header)
    header["schedule"]["lr"] = float(header["schedule"]["lr"])  # JSON writers differ on 1 and 1.0
    for name, a in arrays.items():
        if a.dtype.kind != "f" or not np.isfinite(a).all():
            raise CheckpointError(f"checkpoint '{path}': '{name}' is not a finite float array")
    return arrays, header


def _version_error(path: Path, version) -> CheckpointError:
    return CheckpointError(f"checkpoint '{path}' has format version {version!r}; this runtime reads "
                           f"versions {' and '.join(map(str, READS))}")


def _load_v4(path: Path, data: bytes) -> tuple[dict[str, np.ndarray], dict]:
    try:
        entries, metadata, start = safetensors.read_header(data)
    except safetensors.SafetensorsError as e:
        raise CheckpointError(f"checkpoint '{path}' is corrupt or not an edgetl checkpoint: it {e}") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint '{path}' is not an edgetl checkpoint (its metadata lacks "
                              f"format '{FORMAT}')")
    version = metadata.get("version")
    if version != str(VERSION):
        raise _version_error(path, int(version) if _DECIMAL.fullmatch(version or "") else version)
    if digest(metadata, entries, memoryview(data)[start:]) != metadata.get("sha256"):
        raise CheckpointError(f"checkpoint '{path}' fails its checksum (corrupt or altered)")
    header = {}
    for k, v in metadata.items():
        if k in INT_KEYS:
            if not _DECIMAL.fullmatch(v):
                raise CheckpointError(f"checkpoint '{path}' has an invalid header: '{k}' must be a non-negative integer")
            header[k] = int(v)
        elif k in JSON_KEYS:
            try:
                header[k] = json.loads(v)
            except (ValueError, RecursionError):
                raise CheckpointError(f"checkpoint '{path}' has an invalid header: '{k}' is not JSON") from None
        else:
            header[k] = v
    return {e.name: safetensors.tensor(data, start, e) for e in entries}, header


def _load_v3(path: Path, data: bytes) -> tuple[dict[str, np.ndarray], dict]:
    """A version 3 checkpoint: an npz of arrays `a0`, `a1`, ... and `__header__`, a JSON string."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            files = {k: z[k] for k in z.files}
    except Exception as e:  # zip and npy parsers raise many types on corrupt input; pickles are refused
        if isinstance(e, ValueError) and "pickle" in str(e):
            raise CheckpointError(f"checkpoint '{path}' holds pickled objects, which are refused") from None
        raise CheckpointError(f"checkpoint '{path}' is corrupt ({type(e).__name__}) or not an edgetl "
                              f"checkpoint") from None
    raw = files.pop(HEADER, None)
    if raw is None or raw.dtype.kind != "U" or raw.shape != () or len(str(raw)) > MAX_HEADER_CHARS:
        raise CheckpointError(f"checkpoint '{path}' is not an edgetl checkpoint (no header)")
    try:
        header = json.loads(str(raw))
    except (ValueError, RecursionError):
        raise CheckpointError(f"checkpoint '{path}' has a corrupt header") from None
    if not isinstance(header, dict) or header.get("version") != 3 or not _is_int(header.get("version")):
        raise _version_error(path, header.get("version") if isinstance(header, dict) else None)
    keys = header.get("keys")
    if not isinstance(keys, dict) or not all(isinstance(v, str) for v in keys.values()):
        raise CheckpointError(f"checkpoint '{path}' has an invalid header: 'keys' must map names to arrays")
    missing = [k for k in keys.values() if k not in files]
    if missing or len(set(keys.values())) != len(keys) or set(files) - set(keys.values()):
        raise CheckpointError(f"checkpoint '{path}' does not hold exactly the arrays its header names")
    arrays = {name: files[key] for name, key in keys.items()}
    meta = {k: v for k, v in header.items() if k not in ("version", "sha256")}
    if _digest(arrays, meta) != header.get("sha256"):
        raise CheckpointError(f"checkpoint '{path}' fails its checksum (corrupt or altered)")
    return arrays, header
