"""Nothing lost (issue 14): export replaces only an edgetl bundle and only once the new one is
written; export-inference never writes into the bundle; one run at a time on a checkpoint, and a
resume with another seed or schedule is refused; stale temporary files never block a save; a
corrupt newest checkpoint falls back to the previous generation; resuming to more epochs goes on;
JSON output is strict; arguments that would be silently ignored or misreported are errors."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import edgetl
from edgetl.errors import EdgeTLError
from edgetl.exporters import export
from edgetl.runtime import CheckpointError, InputError, RuntimeNotice, Trainer, load_bundle
from edgetl.runtime import checkpoint as ckpt

B = 16
LR = 0.05


@pytest.fixture(scope="module")
def prepared():
    return edgetl.prepare("mnist_cnn", "bias+mask", num_classes=10)


@pytest.fixture(scope="module")
def bundle(prepared, tmp_path_factory):
    opt = edgetl.OptimizerConfig.make("sgd", lr=LR, momentum=0.9)
    return export(prepared, "onnx", tmp_path_factory.mktemp("nothing_lost") / "bundle", opt, batch_size=B)


def _cli(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgetl.runtime", *map(str, args)], capture_output=True, text=True,
                          timeout=300, **kw)


def _one_line_error(r, *words) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr and r.stdout == "", r.stderr
    for w in words:
        assert w.lower() in lines[0].lower(), (w, lines[0])
    return lines[0]


def _state(t: Trainer) -> dict:
    return {k: v.copy() for k, v in t.backend.get_state().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _tree(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# ---- export ----------------------------------------------------------------------------------
def test_export_never_deletes_what_is_not_its_bundle(prepared, bundle, tmp_path):
    """A directory with a manifest.json and user files, a bundle the user added a file to, a
    plain file: refused, every byte left as it was."""
    foreign = tmp_path / "project"
    foreign.mkdir()
    (foreign / "manifest.json").write_text('{"name": "my-app"}')
    (foreign / "notes.txt").write_text("keep me")
    extended = tmp_path / "extended"
    shutil.copytree(bundle, extended)
    (extended / "results.csv").write_text("epoch,acc\n1,0.9\n")
    (extended / "runs").mkdir()
    (extended / "runs" / "ck.npz").write_bytes(b"mine")
    backup = tmp_path / "backup"  # a file named like the manifest is the user's too
    shutil.copytree(bundle, backup)
    (backup / "manifest.json.bak").write_text("my edited manifest")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    link = tmp_path / "link"  # to a directory elsewhere
    link.symlink_to(foreign)
    for out, words in [(foreign, "not an edgetl bundle"), (extended, "results.csv"), (backup, "manifest.json.bak"),
                       (a_file, "not a directory"), (link, "symbolic link")]:
        before = _tree(out) if out.is_dir() else out.read_bytes()
        with pytest.raises(EdgeTLError, match="refusing to overwrite") as info:
            export(prepared, "onnx", out, batch_size=B)
        assert words in str(info.value)
        assert (_tree(out) if out.is_dir() else out.read_bytes()) == before
    # no temporaries
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "backup", "extended", "link", "project"]


def test_export_replaces_a_bundle_only_once_the_new_one_is_written(prepared, bundle, tmp_path, monkeypatch):
    out = tmp_path / "b"
    shutil.copytree(bundle, out)
    before = _tree(out)
    import edgetl.exporters as exporters

    def failing_write_bundle(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(exporters, "write_bundle", failing_write_bundle)
    with pytest.raises(OSError, match="No space left"):
        export(prepared, "onnx", out, batch_size=8)
    assert _tree(out) == before  # the old bundle, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # the half-written one removed
    load_bundle(out)
    monkeypatch.undo()
    export(prepared, "onnx", out, batch_size=8)  # a bundle is replaced by the new one
    assert load_bundle(out).batch_size == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def test_export_recovers_what_a_killed_export_left(prepared, bundle, tmp_path, monkeypatch):
    """A kill between export's two renames leaves NAME absent and the old bundle in
    `.NAME.<pid>.*.old/bundle`: the next export to NAME puts it back first (so a failing export
    leaves it at NAME), and removes half-written `.NAME.<pid>.*.tmp` directories of dead exporters;
    those of a live exporter stay."""
    dead = _dead_pid()
    out = tmp_path / "b"
    old = tmp_path / f".b.{dead}.k2x9.old"
    old.mkdir()
    shutil.copytree(bundle, old / "bundle")
    before = _tree(old / "bundle")
    (tmp_path / f".b.{dead}.q1.tmp").mkdir()
    (tmp_path / f".b.{dead}.q1.tmp" / "training.onnx").write_bytes(b"half")
    live = tmp_path / f".b.{os.getppid()}.z3.tmp"  # another exporter, still running
    live.mkdir()
    (tmp_path / ".bb.1.x.tmp").mkdir()  # another name's: not ours to touch
    import edgetl.exporters as exporters

    def failing_write_bundle(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(exporters, "write_bundle", failing_write_bundle)
    with pytest.raises(OSError, match="No space left"):
        export(prepared, "onnx", out, batch_size=B)
    assert _tree(out) == before
    load_bundle(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["b", live.name, ".bb.1.x.tmp"])


def _umask() -> int:
    u = os.umask(0)
    os.umask(u)
    return u


def test_export_inference_never_writes_into_the_bundle(bundle, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(bundle, b)
    (tmp_path / "link").symlink_to(b)
    before = _tree(b)
    t = Trainer.load(b)
    for out in [b / "eval.onnx", b / "train_step.onnx", b / "new.onnx", b / "sub" / "m.onnx", b,
                tmp_path / "link" / "eval.onnx"]:
        with pytest.raises(InputError, match="inside the bundle"):
            t.export_inference(out)
    r = _cli("export-inference", b, "--out", b / "eval.onnx")
    _one_line_error(r, "inside the bundle")
    assert _tree(b) == before
    Trainer.load(b)
    assert t.export_inference(tmp_path / "model.onnx") == [tmp_path / "model.onnx"]


def test_data_and_profile_plot_never_write_into_the_bundle(bundle, tmp_path, capsys):
    """`edgetl data --out` and `profile --plot` inside the bundle (directly, without the .npz
    suffix data adds, or through a link to it) are refused, every file left as it was."""
    from edgetl.cli import main as host

    b = tmp_path / "b"
    shutil.copytree(bundle, b)
    (tmp_path / "link").symlink_to(b)
    before = _tree(b)
    for out in [b / "state.safetensors", b / "state", tmp_path / "link" / "new.npz"]:
        assert host(["data", "digits", "--bundle", str(b), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert "inside the bundle" in err and len(err.splitlines()) == 1, err
    for plot in [b / "eval.onnx", tmp_path / "link" / "memory.png"]:
        _one_line_error(_cli("profile", b, "--steps", "1", "--plot", plot), "inside the bundle")
    assert _tree(b) == before
    Trainer.load(b)
    assert host(["data", "digits", "--bundle", str(b), "--out", str(tmp_path / "d")]) == 0
    assert (tmp_path / "d.npz").is_file()


# ---- one run per checkpoint ------------------------------------------------------------------
def test_a_second_run_on_a_checkpoint_is_refused(bundle, digits, data_file, tmp_path):
    """A run (another process) holds the checkpoint: a fit on it from the API and from the CLI is
    refused with a clear error and changes nothing; once it is released, fit works."""
    ck = tmp_path / "ck.npz"
    Trainer.load(bundle).fit(*digits, epochs=1, checkpoint=ck)
    saved = ck.read_bytes()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom edgetl.runtime import checkpoint as c\n"
         "with c.locked(sys.argv[1]):\n    print('locked', flush=True)\n    sys.stdin.readline()\n", str(ck)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        t = Trainer.load(bundle)
        with pytest.raises(CheckpointError, match=f"in use by another run \\(process {holder.pid}\\)"):
            t.fit(*digits, epochs=2, checkpoint=ck)
        assert t.step == 0
        _one_line_error(_cli("fit", bundle, "--data", data_file, "--epochs", "2", "--checkpoint", ck, "--no-progress"),
                        "in use by another run")
        assert ck.read_bytes() == saved
    finally:
        holder.communicate("\n", timeout=60)
    assert holder.returncode == 0
    assert not (tmp_path / "ck.npz.lock").exists()
    r = Trainer.load(bundle).fit(*digits, epochs=2, checkpoint=ck)
    assert r.steps == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.npz", "ck.npz.prev"]  # no lock left


def test_resume_with_another_seed_or_schedule_is_refused(bundle, digits, tmp_path):
    ck = tmp_path / "ck.npz"
    Trainer.load(bundle).fit(*digits, epochs=1, seed=0, checkpoint=ck)
    saved = ck.read_bytes()
    for kw, words in [({"seed": 1}, "seed 0, not 1"), ({"schedule": "cosine"}, "constant schedule, not cosine")]:
        t = Trainer.load(bundle)
        with pytest.raises(CheckpointError, match=words):
            t.fit(*digits, epochs=2, checkpoint=ck, **kw)
        assert t.step == 0 and ck.read_bytes() == saved


def test_a_user_file_named_like_the_lock_is_never_touched(bundle, digits, tmp_path):
    """`CKPT.lock` that is not an edgetl lock file (a user's file, or a link to one) is refused,
    byte for byte intact; a lock file a killed run left (either format) is taken over."""
    ck = tmp_path / "ck.npz"
    lock = tmp_path / "ck.npz.lock"
    mine = tmp_path / "mine.txt"
    mine.write_text("my notes")
    for make in (lambda: lock.write_text("my notes"), lambda: lock.symlink_to(mine)):
        make()
        t = Trainer.load(bundle)
        with pytest.raises(CheckpointError, match="lock"):
            t.fit(*digits, epochs=1, checkpoint=ck)
        assert t.step == 0 and not ck.exists()
        assert lock.read_text() == "my notes" and mine.read_text() == "my notes"
        lock.unlink()
    for stale in (f"edgetl-checkpoint-lock {_dead_pid()}\n", str(_dead_pid()), ""):
        lock.write_text(stale)
        assert Trainer.load(bundle).fit(*digits, epochs=1, checkpoint=ck).steps == 10
        assert not lock.exists()
        ck.unlink()
        (tmp_path / "ck.npz.prev").unlink(missing_ok=True)


def test_a_first_save_never_deletes_a_prev_that_is_not_ours(bundle, digits, data_file, tmp_path):
    """A first save removes an earlier run's `CKPT.prev` of this bundle; anything else of that name
    (a user's file) is refused, intact."""
    ck = tmp_path / "ck.npz"
    prev = tmp_path / "ck.npz.prev"
    prev.write_bytes(b"my data")
    t = Trainer.load(bundle)
    with pytest.raises(CheckpointError, match="not a checkpoint of this bundle"):
        t.fit(*digits, epochs=1, checkpoint=ck)
    assert prev.read_bytes() == b"my data" and not ck.exists()
    _one_line_error(_cli("fit", bundle, "--data", data_file, "--epochs", "1", "--checkpoint", ck, "--no-progress"),
                    "not a checkpoint of this bundle")
    assert prev.read_bytes() == b"my data" and not ck.exists()
    prev.unlink()
    Trainer.load(bundle).fit(*digits, epochs=1, checkpoint=ck)
    ck.replace(prev)  # an earlier run's generation of this bundle: a first save may remove it
    Trainer.load(bundle).fit(*digits, epochs=1, checkpoint=ck)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.npz"]


# ---- stale temporary files, two generations --------------------------------------------------
def _dead_pid() -> int:
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(p.stdout)


def test_stale_temporary_files_are_removed_before_writing(bundle, tmp_path, monkeypatch):
    """Temporary files of killed writers go before the new one is written (on a full disk they are
    what fills it); one of a live writer stays."""
    t = Trainer.load(bundle)
    ck = tmp_path / "ck.npz"
    stale = [tmp_path / f"ck.npz.{_dead_pid()}.x1y2z3.tmp", tmp_path / "ck.npz.q8w7e6r5.tmp"]  # old name style too
    live = tmp_path / f"ck.npz.{os.getppid()}.a1b2c3.tmp"
    for p in [*stale, live]:
        p.write_bytes(b"\0" * 1000)
    seen = []
    real = ckpt.tempfile.mkstemp

    def mkstemp(*a, **k):
        seen.append(sorted(p.name for p in tmp_path.iterdir()))
        return real(*a, **k)

    monkeypatch.setattr(ckpt.tempfile, "mkstemp", mkstemp)
    t.save_checkpoint(ck)
    assert seen[0] == [live.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ck.npz", live.name])


def test_a_kill_mid_save_without_hard_links_leaves_the_checkpoint(bundle, digits, tmp_path, monkeypatch):
    """On a file system without hard links (FAT), the newest checkpoint stays in place while it
    becomes the previous generation: a kill right after that step (here: after the first rename)
    leaves it, so the next run resumes instead of starting over and deleting it."""
    import errno

    ck = tmp_path / "ck.npz"
    t = Trainer.load(bundle)
    t.fit(*digits, epochs=1, checkpoint=ck)

    def no_link(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    real_replace = os.replace

    def replace_then_killed(src, dst):
        real_replace(src, dst)
        raise KeyboardInterrupt  # the process dies here

    monkeypatch.setattr(os, "replace", replace_then_killed)
    with pytest.raises(KeyboardInterrupt):
        t.save_checkpoint(ck)
    monkeypatch.setattr(os, "replace", real_replace)
    assert ckpt.load_checkpoint(ck)[1]["step"] == 10
    u = Trainer.load(bundle)
    assert u.fit(*digits, epochs=2, checkpoint=ck).steps == 20  # resumed, still without hard links
    assert ckpt.load_checkpoint(ck)[1]["step"] == 20 and ckpt.load_checkpoint(f"{ck}.prev")[1]["step"] == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.npz", "ck.npz.prev"]


def _mount_tmpfs(where: Path, size_kb: int) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


def test_stale_temporary_file_on_a_full_disk(bundle, tmp_path):
    """A real full disk (a tmpfs; needs root with mount rights): a killed writer's temporary file
    fills it; the next save succeeds."""
    where = tmp_path / "disk"
    where.mkdir()
    if not _mount_tmpfs(where, 128):
        pytest.skip("cannot mount a tmpfs here")
    try:
        t = Trainer.load(bundle)
        ck = where / "ck.npz"
        stale = where / f"ck.npz.{_dead_pid()}.abcdefgh.tmp"
        try:
            with open(stale, "wb", buffering=0) as f:
                while True:
                    f.write(b"\0" * 4096)
        except OSError:
            pass
        t.save_checkpoint(ck)
        assert ckpt.load_checkpoint(ck)[1]["step"] == 0 and not stale.exists()
    finally:
        subprocess.run(["umount", str(where)], capture_output=True)


def _flip_middle(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x40
    p.write_bytes(bytes(data))


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(bundle, digits, data_file, tmp_path):
    ck = tmp_path / "ck.npz"
    t = Trainer.load(bundle)
    t.fit(*digits, epochs=1, checkpoint=ck)
    at_10 = _state(t)
    t.fit(*digits, epochs=2, checkpoint=ck)  # resumes: 10 more steps
    assert ckpt.load_checkpoint(ck)[1]["step"] == 20
    assert ckpt.load_checkpoint(tmp_path / "ck.npz.prev")[1]["step"] == 10
    _flip_middle(ck)
    t2 = Trainer.load(bundle)
    with pytest.warns(RuntimeNotice, match="ck.npz' fails its checksum .*using the previous checkpoint .*step 10"):
        t2.load_checkpoint(ck)
    assert t2.step == 10 and _same(_state(t2), at_10)
    r = _cli("evaluate", bundle, "--data", data_file, "--checkpoint", ck, "--json")
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgetl.runtime: warning:") and "previous checkpoint" in lines[0]
    with pytest.warns(RuntimeNotice, match="using the previous checkpoint"):
        assert Trainer.load(bundle).fit(*digits, epochs=2, checkpoint=ck).steps == 20
    assert _same(ckpt.load_checkpoint(ck)[0], _state(t))  # the same as the run that was not disturbed
    _flip_middle(ck)
    _flip_middle(tmp_path / "ck.npz.prev")
    with pytest.raises(CheckpointError, match="ck.npz' fails its checksum"):  # both bad: the newest's error
        Trainer.load(bundle).load_checkpoint(ck)


# ---- resume to more epochs, strict JSON ------------------------------------------------------
def test_resume_to_more_epochs_goes_on(bundle, digits, tmp_path):
    ck = tmp_path / "ck.npz"
    assert Trainer.load(bundle).fit(*digits, epochs=1, checkpoint=ck).steps == 10
    t = Trainer.load(bundle)
    r = t.fit(*digits, epochs=3, checkpoint=ck)
    assert r.steps == 30 and len(r.losses) == 20
    ref = Trainer.load(bundle)
    ref.fit(*digits, epochs=3)
    assert _same(_state(t), _state(ref))  # exactly the uninterrupted 3-epoch run
    again = Trainer.load(bundle).fit(*digits, epochs=3, checkpoint=ck)  # already done
    assert again.steps == 30 and again.final_loss is None and again.step_ms_median is None


def _strict_json(text: str) -> dict:
    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_cli_json_never_holds_nan(bundle, data_file, tmp_path):
    ck = tmp_path / "ck.npz"
    args = ["fit", bundle, "--data", data_file, "--epochs", "1", "--checkpoint", ck, "--no-progress", "--json"]
    first = _strict_json(_cli(*args).stdout)
    assert first["steps"] == 10 and isinstance(first["final_loss"], float)
    r = _cli(*args)  # nothing left to do
    assert r.returncode == 0, r.stderr
    out = _strict_json(r.stdout)
    assert out["steps"] == 10 and out["final_loss"] is None and out["step_ms_median"] is None


# ---- arguments -------------------------------------------------------------------------------
def test_arguments_that_were_ignored_or_misreported(bundle, digits, data_file, tmp_path):
    _one_line_error(_cli("fit", bundle, "--data", tmp_path, "--no-progress"), "is not a file")
    _one_line_error(_cli("fit", data_file, "--data", data_file, "--no-progress"), "is a file, not a directory")
    _one_line_error(_cli("fit", bundle, "--data", data_file, "--checkpoint-every", "5", "--no-progress"),
                    "--checkpoint-every needs --checkpoint")
    with pytest.raises(InputError, match="needs a checkpoint"):
        Trainer.load(bundle).fit(*digits, checkpoint_every=5)
    _one_line_error(_cli("profile", bundle, "--steps", "1", "--plot", tmp_path), "is a directory")
    assert not Path(f"{tmp_path}.png").exists()


def test_profile_plot_is_written_where_it_says(bundle, tmp_path):
    plot = tmp_path / "memory"  # no suffix: written as a PNG to exactly this path
    r = _cli("profile", bundle, "--steps", "1", "--plot", plot, "--json")
    assert r.returncode == 0, r.stderr
    assert _strict_json(r.stdout)["plot"] == str(plot)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory"]
