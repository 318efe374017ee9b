#!/usr/bin/env python
"""Install, offline, the wheels of bench/prepare_gpu_wheels.sh that this Python lacks.

    python bench/install_wheels.py WHEELS_DIR

A distribution already installed is kept, whatever its version (the image's own packages are the ones its
torch was tested with), and said so; the others are installed with --no-index --no-deps, pip choosing each
one's wheel for this Python. Needs nothing but the standard library and pip. Exit status 1 if pip fails.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path


def distribution(wheel: Path) -> str:
    return re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheels", type=Path, help="the folder bench/prepare_gpu_wheels.sh filled")
    folder = parser.parse_args(argv).wheels
    names = sorted({distribution(w) for w in folder.glob("*.whl")})
    if not names:
        print(f"install_wheels.py: error: no wheel in {folder}", file=sys.stderr)
        return 2
    missing = []
    for name in names:
        try:
            print(f"found {name} {metadata.version(name)} (kept)")
        except metadata.PackageNotFoundError:
            missing.append(name)
    if not missing:
        return 0
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-cache-dir",
           "--find-links", str(folder), *missing]
    if subprocess.run(pip).returncode != 0:
        print(f"install_wheels.py: pip could not install {' '.join(missing)} from {folder}", file=sys.stderr)
        return 1
    for name in missing:
        print(f"installed {name} {metadata.version(name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
