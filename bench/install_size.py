"""Size of the light install (`pip install edgetl`, the device runtime) on each Python: build the
wheel of this checkout, install it into a fresh venv per Python, and measure its site-packages
without pip and setuptools (the sum of the files' sizes, as tests/test_light_install.py does).

    python bench/install_size.py                       # Python 3.10, 3.11, 3.12, 3.13 (found on PATH or in pyenv)
    python bench/install_size.py --versions 3.10 --without sympy mpmath   # and after `pip uninstall` of those

Prints a markdown table: total MiB, the packages over 0.5 MiB, and the versions pip chose.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SKIP = ("pip", "setuptools", "_distutils_hack", "pkg_resources")


def python(version: str) -> str | None:
    for c in [shutil.which(f"python{version}"), *sorted(map(str, Path.home().glob(f".pyenv/versions/{version}.*/bin/python{version}")))]:
        if c and subprocess.run([c, "-c", f"import sys; assert sys.version_info[:2] == {tuple(map(int, version.split('.')))}"],
                                capture_output=True).returncode == 0:
            return c
    return None


def sizes(venv: Path) -> dict[str, int]:
    (site,) = venv.glob("lib/python3.*/site-packages")
    out: dict[str, int] = {}
    for e in site.iterdir():
        key = e.name.split("-")[0].split(".")[0]
        if key in SKIP:
            continue
        files = [e] if e.is_file() else [p for p in e.rglob("*") if p.is_file()]
        out[key] = out.get(key, 0) + sum(p.stat().st_size for p in files)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--versions", nargs="+", default=["3.10", "3.11", "3.12", "3.13"])
    ap.add_argument("--without", nargs="*", default=[], help="packages to pip-uninstall after the install")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="edgetl-install-size-"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(ROOT), "-w", str(tmp)], check=True)
    (wheel,) = tmp.glob("edgetl-*.whl")
    print("| Python | site-packages MiB | largest packages (MiB) | numpy | onnxruntime |")
    print("|---|---|---|---|---|")
    for v in args.versions:
        base = python(v)
        if base is None:
            print(f"| {v} | not installed | | | |")
            continue
        venv = tmp / f"py{v}"
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, "install", str(wheel)], check=True)
        if args.without:
            subprocess.run([*pip, "uninstall", "-y", *args.without], check=True)
        got = sizes(venv)
        ver = lambda name: subprocess.run([str(venv / "bin" / "python"), "-c", f"import importlib.metadata as m; print(m.version({name!r}))"],  # noqa: E731
                                          capture_output=True, text=True).stdout.strip()
        big = ", ".join(f"{k} {s / 2**20:.1f}" for k, s in sorted(got.items(), key=lambda kv: -kv[1]) if s > 2**19)
        print(f"| {v}{' without ' + ', '.join(args.without) if args.without else ''} | {sum(got.values()) / 2**20:.1f} | {big} | "
              f"{ver('numpy')} | {ver('onnxruntime')} |", flush=True)
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
