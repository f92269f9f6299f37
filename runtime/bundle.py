"""Reading and verifying a bundle: the manifest is the only contract between host and device.

Everything the manifest says is checked before it is used: its own checksum (`manifest_sha256`,
when the exporter wrote one), its structure and field types, that every file it names lies inside
the bundle directory (no `..`, absolute paths or symlinks leading out) and matches its sha256.
Nothing is ever unpickled (numpy `allow_pickle=False`). Given a trusted key, the manifest's
signature is checked first (see signing.py); ONNX programs must hold all their tensors and match
the manifest (see programs.py); the initial state's declared sizes are checked before it is read
(see state.py)."""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BundleError
from .targets import BY_NAME, CONTRACT, PARAMS, STATE, TargetSpec, param_name, state_name, target_spec

_B = CONTRACT["bundle"]
FORMAT: str = _B["format"]
FORMAT_VERSION: int = _B["format_version"]
MANIFEST: str = _B["manifest"]
MAX_MANIFEST_BYTES: int = _B["max_manifest_bytes"]
MANIFEST_DIGEST: str = _B["manifest_digest"]
REQUIRED_FIELDS: tuple[str, ...] = tuple(_B["required_fields"])
_SHA256 = re.compile(r"[0-9a-f]{64}")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON, without its own `manifest_sha256` field (so that
    formatting does not matter, and any change of a value does)."""
    body = {k: v for k, v in manifest.items() if k != MANIFEST_DIGEST}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def safe_path(root: Path, rel: str) -> Path:
    """`root/rel`, refusing absolute paths and anything that resolves outside `root`."""
    if not isinstance(rel, str) or not rel or "\x00" in rel or Path(rel).is_absolute():
        raise BundleError(f"bundle file name {_short(rel)} is not a relative path")
    try:
        base = Path(root).resolve()
        p = (base / rel).resolve()
    except (OSError, RuntimeError, ValueError) as e:  # symlink loops, names too long
        raise BundleError(f"bundle file {_short(rel)} cannot be resolved ({type(e).__name__})") from None
    if base not in p.parents:
        raise BundleError(f"bundle file {_short(rel)} points outside the bundle directory")
    return p


def inside(root: str | Path, path: str | Path) -> bool:
    """Whether `path` (resolved, symlinks followed) is `root` or lies inside it: where a writer
    must not write, so that a bundle's own files are never overwritten."""
    try:
        return Path(path).resolve().is_relative_to(Path(root).resolve())
    except (OSError, RuntimeError, ValueError):
        return False


def _short(value, limit: int = 80) -> str:
    s = repr(value)
    return s if len(s) <= limit else s[: limit - 3] + "..."


# ---- manifest validation ---------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise BundleError(f"{MANIFEST}: {what}")


def _check_name_map(m, what: str, names: list[str]) -> None:
    _need(isinstance(m, dict) and all(isinstance(k, str) and isinstance(v, str) and v for k, v in m.items()),
          f"'{what}' must map names to strings")
    missing = [n for n in names if n not in m]
    _need(not missing, f"'{what}' lacks {', '.join(map(_short, missing[:3]))}")


def _check_tensors(entries, what: str) -> list[str]:
    _need(isinstance(entries, list), f"'{what}' must be a list of tensors")
    names = []
    for t in entries:
        _need(isinstance(t, dict) and isinstance(t.get("name"), str) and t["name"],
              f"'{what}' has an entry without a name")
        shape = t.get("shape")
        _need(isinstance(shape, list) and len(shape) <= 8 and all(_is_int(d) and 0 <= d < 2**31 for d in shape),
              f"tensor {_short(t['name'])} in '{what}' has an invalid shape {_short(shape)}")
        names.append(t["name"])
    _need(len(set(names)) == len(names), f"'{what}' names a tensor twice")
    return names


def _check_io(io, spec: TargetSpec, trainable: list[str], state: list[str]) -> None:
    """`io.params` / `io.state` map manifest names to the programs' names for `param.*` / `state.*`.
    Required where programs bind by name; where they bind by position (ExecuTorch) they are the
    spec's names in manifest order, and may be absent (bundles before they were written there)."""
    _need(isinstance(io, dict), "'io' must be an object")
    uses = {g for p in spec.programs for g in p.inputs}
    for key, group, names, canonical in (("params", PARAMS, trainable, param_name),
                                         ("state", STATE, state, state_name)):
        if group not in uses:
            continue
        if spec.bind == BY_NAME:
            _check_name_map(io.get(key, {} if not names else None), f"io.{key}", names)
        elif key in io:
            _check_name_map(io[key], f"io.{key}", names)
            wrong = [n for i, n in enumerate(names) if io[key][n] != canonical(i)]
            if wrong:
                raise BundleError(f"{MANIFEST}: 'io.{key}' gives {_short(wrong[0])} the program name "
                                  f"{_short(io[key][wrong[0]])}, but a {spec.name} program takes its tensors "
                                  f"by position, in manifest order ({canonical(names.index(wrong[0]))})")
    if spec.bind != BY_NAME and "params" not in io:
        _check_listed_io(io, spec, trainable, state)


def _check_listed_io(io: dict, spec: TargetSpec, trainable: list[str], state: list[str]) -> None:
    """The `io` of executorch bundles exported before the `io.params`/`io.state` maps (same format
    version): per program role, `inputs` lists the program's inputs in order, trainable tensors as
    `param:NAME` and state as `state:NAME`. Where present, it must list the spec's order."""
    for p in spec.programs:
        listed = io.get(p.role, {}).get("inputs") if isinstance(io.get(p.role), dict) else None
        if listed is not None and listed != p.input_names([f"param:{t}" for t in trainable],
                                                          [f"state:{s}" for s in state]):
            raise BundleError(f"{MANIFEST}: 'io.{p.role}.inputs' does not list the '{p.role}' program's inputs "
                              f"in the order the manifest and the {spec.name} target give them")


def validate_manifest(m: dict) -> None:
    """Check the structure and types of every manifest field the runtime reads."""
    for key in REQUIRED_FIELDS:
        _need(key in m, f"lacks '{key}'")
    _need(isinstance(m["target"], str), "'target' must be a string")
    spec = target_spec(m["target"])

    inp = m["input"]
    _need(isinstance(inp, dict), "'input' must be an object")
    shape = inp.get("shape")
    _need(isinstance(shape, list) and len(shape) in (2, 3) and all(_is_int(d) and 1 <= d <= 1 << 16 for d in shape),
          f"'input.shape' must be [channels, height, width] or [channels, length] of positive integers, "
          f"got {_short(shape)}")
    _need(_is_int(inp.get("batch_size")) and 1 <= inp["batch_size"] <= 1 << 20,
          f"'input.batch_size' must be a positive integer, got {_short(inp.get('batch_size'))}")
    if "micro_batch" in inp:  # the train_step program's samples per call; it accumulates batch_size / micro_batch calls
        mb = inp["micro_batch"]
        _need(_is_int(mb) and 1 <= mb and inp["batch_size"] % mb == 0,
              f"'input.micro_batch' must be a positive integer dividing input.batch_size, got {_short(mb)}")
        _need(spec.micro_batches, f"a {spec.name} bundle cannot take micro-batches (input.micro_batch): its "
              f"train program takes whole batches")
    pre = inp.get("preprocess")
    _need(isinstance(pre, dict), "'input.preprocess' must be an object")
    for k in ("mean", "std"):
        v = pre.get(k)
        _need(isinstance(v, list) and len(v) == shape[0] and all(_is_number(a) for a in v),
              f"'input.preprocess.{k}' must be {shape[0]} finite number(s), got {_short(v)}")
    _need(all(s > 0 for s in pre["std"]), "'input.preprocess.std' must be positive")
    _need(_is_int(m["num_classes"]) and 1 <= m["num_classes"] <= 1 << 24,
          f"'num_classes' must be a positive integer, got {_short(m['num_classes'])}")

    programs = m["programs"]
    _need(isinstance(programs, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in programs.items()),
          "'programs' must map roles to file names")
    missing = [r for r in spec.roles if r not in programs]
    _need(not missing, f"a {spec.name} bundle needs the program(s) {', '.join(missing)}")

    trainable = _check_tensors(m["trainable"], "trainable")
    opt = m["optimizer"]
    _need(isinstance(opt, dict), "'optimizer' must be an object")
    _need(_is_number(opt.get("lr")) and opt["lr"] > 0,
          f"'optimizer.lr' must be a positive number, got {_short(opt.get('lr'))}")
    state = _check_tensors(opt.get("state", []), "optimizer.state")
    _need(not set(trainable) & set(state), "'trainable' and 'optimizer.state' share a name")
    _need(spec.state_in_program or not state, f"a {spec.name} bundle keeps its optimizer state in "
          f"{spec.optimizer_state}, so 'optimizer.state' must be empty")
    _need(isinstance(m["state_file"], str), "'state_file' must be a file name")
    _check_name_map(m["state_keys"], "state_keys", trainable + state)

    _check_io(m.get("io", {}), spec, trainable, state)

    files = m["files"]
    _need(isinstance(files, dict) and all(isinstance(k, str) for k in files),
          "'files' must map file names to sha256 digests")
    for rel, digest in files.items():
        _need(isinstance(digest, str) and _SHA256.fullmatch(digest) is not None,
              f"'files' gives {_short(rel)} a malformed sha256 {_short(digest)}")
    for rel in [*programs.values(), m["state_file"], *spec.files]:
        if rel not in files:
            raise BundleError(f"bundle file {_short(rel)} has no checksum in the manifest")


@dataclass
class Bundle:
    root: Path
    manifest: dict

    @property
    def target(self) -> str:
        return self.manifest["target"]

    @property
    def spec(self) -> TargetSpec:
        return target_spec(self.manifest["target"])

    @property
    def batch_size(self) -> int:
        return int(self.manifest["input"]["batch_size"])

    @property
    def micro_batch(self) -> int:
        """The samples one call of the train_step program takes (batch_size unless it accumulates micro-batches)."""
        return int(self.manifest["input"].get("micro_batch", self.batch_size))

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["input"]["shape"])

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    @property
    def trainable(self) -> list[str]:
        return [t["name"] for t in self.manifest["trainable"]]

    @property
    def state_names(self) -> list[str]:
        return [t["name"] for t in self.manifest["optimizer"].get("state", [])]

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of the trainable parameters and optimizer state, by manifest name."""
        entries = self.manifest["trainable"] + self.manifest["optimizer"].get("state", [])
        return {t["name"]: tuple(t["shape"]) for t in entries}

    def program(self, role: str) -> Path:
        programs = self.manifest["programs"]
        if role not in programs:
            raise BundleError(f"bundle has no '{role}' program")
        return safe_path(self.root, programs[role])

    def program_bytes(self, role: str) -> bytes:
        """The `role` program's bytes, checked against the manifest's sha256 as they are read: a
        runtime given these (not the path) runs exactly what was checked, even if the file is
        replaced after the bundle was loaded."""
        self.program(role)  # a known role
        return self.file_bytes(self.manifest["programs"][role])

    def file_bytes(self, rel: str) -> bytes:
        """The bytes of the bundle file `rel` (one the manifest lists), read once and checked
        against the manifest's sha256: what a caller parses is exactly what was checked."""
        digest = self.manifest["files"].get(rel)
        if digest is None:
            raise BundleError(f"bundle file {_short(rel)} has no checksum in the manifest")
        try:
            data = safe_path(self.root, rel).read_bytes()
        except OSError as e:
            raise BundleError(f"cannot read bundle file {_short(rel)}: {e.strerror or type(e).__name__}") from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise BundleError(f"bundle file {_short(rel)} fails its sha256 check (changed since the bundle was loaded)")
        return data

    def initial_state(self) -> dict[str, np.ndarray]:
        """Initial trainable parameters and optimizer state, keyed by manifest name (checked
        against the manifest's shapes; finite floats only; never unpickled). See state.py."""
        from . import state

        rel = self.manifest["state_file"]
        name = safe_path(self.root, rel).name
        # read once, checked, parsed from memory
        return state.read(self.file_bytes(rel), name, self.manifest["state_keys"], self.tensor_shapes())


def load_bundle(path: str | Path, trusted_key=None) -> Bundle:
    """Read a bundle directory, checking format, version, structure, every file's sha256 and the
    programs' signatures. With `trusted_key` (a *.pub path or an Ed25519 public key; default: the
    file named by $EDGETL_TRUSTED_KEY, if set) the bundle must be signed by that key."""
    from . import signing
    from .programs import check_onnx_programs

    root = Path(path)
    key = signing.resolve_trusted_key(trusted_key)
    try:
        if not root.is_dir():
            raise BundleError(f"bundle '{root}' is a file, not a directory" if root.exists()
                              else f"bundle directory '{root}' does not exist")
        mpath = safe_path(root, MANIFEST)
        if not mpath.is_file():
            raise BundleError(f"'{root}' is not an edgetl bundle: no {MANIFEST}")
        if mpath.stat().st_size > MAX_MANIFEST_BYTES:
            raise BundleError(f"{MANIFEST} is larger than {MAX_MANIFEST_BYTES >> 20} MiB; not an edgetl manifest")
        raw = mpath.read_bytes()
        if key is not None:  # authenticity first: nothing unsigned is even parsed
            signing.verify(raw, signing.read_signature(root), key)
    except OSError as e:
        raise BundleError(f"cannot read bundle '{root}': {e.strerror or type(e).__name__}") from None
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: JSON, huge integers
        raise BundleError(f"{MANIFEST} is not valid JSON: {str(e)[:120]}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{MANIFEST} is not an edgetl bundle manifest")
    version = manifest.get("format_version")
    if not _is_int(version) or version != FORMAT_VERSION:
        raise BundleError(f"bundle format version {_short(version)} is not supported "
                          f"(this runtime reads version {FORMAT_VERSION}); re-export the bundle")
    if MANIFEST_DIGEST not in manifest:
        raise BundleError(f"{MANIFEST} lacks its own checksum '{MANIFEST_DIGEST}'; re-export the bundle")
    try:
        ok = manifest[MANIFEST_DIGEST] == manifest_digest(manifest)
    except (ValueError, TypeError, RecursionError):
        ok = False
    if not ok:
        raise BundleError(f"{MANIFEST} fails its sha256 check (corrupt or altered)")
    validate_manifest(manifest)
    for rel, digest in manifest["files"].items():
        p = safe_path(root, rel)
        try:
            if not p.is_file():
                raise BundleError(f"bundle file {_short(rel)} is missing")
            ok = sha256(p) == digest
        except OSError as e:
            raise BundleError(f"cannot read bundle file {_short(rel)}: {e.strerror or type(e).__name__}") from None
        if not ok:
            raise BundleError(f"bundle file {_short(rel)} fails its sha256 check (corrupt or altered)")
    bundle = Bundle(root, manifest)
    check_onnx_programs(manifest, bundle.program)
    for rel in bundle.spec.files:
        # ONNX Runtime reads a checkpoint's external data from `<checkpoint>.data` beside it
        sidecar = f"{rel}.data"
        if safe_path(root, sidecar).exists() and sidecar not in manifest["files"]:
            raise BundleError(f"bundle file {_short(sidecar)} (external data onnxruntime would read) has no checksum "
                              "in the manifest; it is refused")
    return bundle
