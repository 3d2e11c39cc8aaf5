"""Build the front-panel controller's bundle: every module of board/panel compiled by
mpy-cross for the RP2040 (Cortex-M0+, -march=armv6m), with the MicroPython packages it
uses from PyPI vendored beside them.

    python scripts/build_panel.py [--out build/panel] [--cache build/panel-vendor]

The PyPI packages of MicroPython modules are bare sdists (no setup.py, so pip cannot
install them); they are fetched once by their pinned URL, checked against their
SHA-256, unpacked and compiled with a header naming their package and licence.
The bundle is what goes on the controller's flash: the .mpy files plus main.py.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import shutil
import subprocess
import sys
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SOURCE = REPO / "board" / "panel"
ARCH = "armv6m"  # RP2040: Cortex-M0+


@dataclass(frozen=True)
class Vendored:
    name: str
    version: str
    url: str
    sha256: str
    licence: str
    #: member of the sdist -> path in the bundle (without .py)
    modules: tuple[tuple[str, str], ...]


VENDORED = (
    Vendored("micropython-ssd1306", "0.3",
             "https://files.pythonhosted.org/packages/01/d0/0841d47772962c80af3ab178ef062ed2"
             "cd524cb99eb38463e669428402a8/micropython-ssd1306-0.3.tar.gz",
             "d00cae1ff680e6ae504e258e700f002874b0d924b1a604253b6ea63144b58289",
             "MIT licence, Stefan Lehmann (PKG-INFO of the sdist)",
             (("micropython-ssd1306-0.3/ssd1306.py", "ssd1306"),)),
    Vendored("micropython-logging", "0.5.2",
             "https://files.pythonhosted.org/packages/b2/35/0cae2c36b7e0663ac56cbab3e61aa635"
             "af62965cce59c852f168c03832cd/micropython-logging-0.5.2.tar.gz",
             "4fe714775fa6cafc2466bac7fe28485c13610470d3ea2bddac956bcd89b4453d",
             "MIT licence, micropython-lib (PKG-INFO of the sdist)",
             (("micropython-logging-0.5.2/logging/__init__.py", "logging/__init__"),)),
    # HD44780 character LCDs through a PCF8574 I2C backpack (16x2, 20x4)
    Vendored("micropython-i2c-lcd", "0.1.1",
             "https://files.pythonhosted.org/packages/f1/22/fc67520efa386b42f71d622d8ff0195b"
             "9264f440d8aa26b6709700bae198/micropython-i2c-lcd-0.1.1.tar.gz",
             "e611d3f59ecbd3143cd132725508051619c8cc04632b87e4b7cd800fe512a6ab",
             "MIT licence, brainelectronics (PKG-INFO of the sdist)",
             tuple((f"micropython-i2c-lcd-0.1.1/lcd_i2c/{m}.py", f"lcd_i2c/{m}")
                   for m in ("__init__", "lcd_i2c", "const", "typing", "version"))),
)


class BuildError(Exception):
    pass


def mpy_cross() -> str:
    beside = Path(sys.executable).parent / "mpy-cross"
    found = str(beside) if beside.exists() else shutil.which("mpy-cross")
    if found is None:
        raise BuildError("mpy-cross is not installed (make setup installs the pinned one)")
    return found


def fetch(v: Vendored, cache: Path) -> bytes:
    path = cache / Path(v.url).name
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        try:
            with urllib.request.urlopen(v.url, timeout=60) as r:
                data = r.read()
        except OSError as e:
            raise BuildError(f"cannot fetch {v.name} {v.version}: {e}") from e
        tmp = path.with_suffix(".part")
        tmp.write_bytes(data)
        tmp.replace(path)
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != v.sha256:
        path.unlink()
        raise BuildError(f"{v.name} {v.version}: SHA-256 {digest}, expected {v.sha256}")
    return data


def compile_one(tool: str, src: Path, out: Path, name: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    # -s names the source in tracebacks as it is on the controller
    r = subprocess.run([tool, f"-march={ARCH}", "-s", name, "-o", str(out), str(src)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise BuildError(f"mpy-cross {src}: {r.stderr.strip()}")


def build(out: Path, cache: Path) -> list[Path]:
    tool = mpy_cross()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    staged = out.parent / (out.name + "-src")
    if staged.exists():
        shutil.rmtree(staged)
    built: list[Path] = []
    for src in sorted(SOURCE.glob("*.py")):
        mpy = out / (src.stem + ".mpy")
        compile_one(tool, src, mpy, src.name)
        built.append(mpy)
    # MicroPython runs main.py (not an .mpy) at power-up
    shutil.copy2(SOURCE / "main.py", out / "main.py")
    notes = []
    for v in VENDORED:
        with tarfile.open(fileobj=io.BytesIO(fetch(v, cache)), mode="r:gz") as tar:
            for member, target in v.modules:
                f = tar.extractfile(member)
                if f is None:
                    raise BuildError(f"{v.name}: {member} is not in the sdist")
                header = (f"# {v.name} {v.version} from PyPI, {v.licence}; "
                          "vendored unchanged by scripts/build_panel.py\n")
                src = staged / (target + ".py")
                src.parent.mkdir(parents=True, exist_ok=True)
                src.write_bytes(header.encode() + f.read())
                mpy = out / (target + ".mpy")
                compile_one(tool, src, mpy, target + ".py")
                built.append(mpy)
        notes.append(f"{v.name} {v.version}: {v.licence}; sha256 {v.sha256}")
    (out / "VENDORED.txt").write_text("\n".join(notes) + "\n")
    return built


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO / "build" / "panel")
    p.add_argument("--cache", type=Path, default=REPO / "build" / "panel-vendor")
    args = p.parse_args()
    try:
        built = build(args.out, args.cache)
    except BuildError as e:
        print(f"build_panel: {e}", file=sys.stderr)
        return 1
    print(f"build_panel: {len(built)} modules compiled for {ARCH} into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
