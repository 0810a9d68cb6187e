"""An aarch64 user space for qemu-user, so edge bundles run here as they would on an Arm board:
Debian's arm64 Python 3.11 (the .debs unpacked, nothing installed) and the aarch64 wheels of
numpy, onnxruntime and apache-tvm (unzipped), under ~/.cache/winnow/aarch64.

Needs qemu-user (Debian: `apt-get install qemu-user`), apt-get with network to the Debian
mirror, and pip with network to PyPI. `python tests/aarch64_userland.py` builds it;
`unavailable()` says why it cannot be built on this machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(os.environ.get("WINNOW_AARCH64_ROOT", Path.home() / ".cache/winnow/aarch64"))
SYSROOT, SITE, APT = ROOT / "sysroot", ROOT / "site", ROOT / "apt"
PYTHON = SYSROOT / "usr/bin/python3.11"
DEBS = ["python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib", "libc6",
        "libexpat1", "zlib1g", "libssl3", "libffi8", "libbz2-1.0", "liblzma5", "libstdc++6",
        "libgcc-s1", "libsqlite3-0", "libncursesw6", "libtinfo6", "libreadline8", "libuuid1",
        "libcrypt1", "libgomp1", "libdb5.3", "libnsl2", "libtirpc3", "libgssapi-krb5-2",
        "libkrb5-3", "libk5crypto3", "libcom-err2", "libkrb5support0", "libkeyutils1"]
WHEELS = ["numpy", "onnxruntime", "apache-tvm", "apache-tvm-ffi", "typing_extensions"]
PLATFORMS = ["manylinux_2_28_aarch64", "manylinux_2_27_aarch64", "manylinux_2_24_aarch64",
             "manylinux2014_aarch64", "manylinux_2_17_aarch64", "any"]
# qemu-user shows the host's x86 /proc/cpuinfo, on which onnxruntime's CPU detection crashes;
# qemu opens paths under its -L prefix first, so the sysroot gets an Arm one (a Neoverse N1).
CPUINFO = "".join(f"processor\t: {n}\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes pmull "
                  "sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\n"
                  "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x3\n"
                  "CPU part\t: 0xd0c\nCPU revision\t: 1\n\n" for n in range(2))
APT_OPTIONS = [f"-oDir::State::Lists={APT / 'lists'}", f"-oDir::Cache={APT / 'cache'}",
               "-oAPT::Architecture=arm64", "-oAPT::Architectures::=arm64"]


def _pins() -> dict[str, str]:
    """Exact versions from constraints.txt, so the device runs what the host tested."""
    pins = {}
    for line in (Path(__file__).resolve().parents[1] / "constraints.txt").read_text().splitlines():
        name, _, version = line.partition("==")
        if version:
            pins[name.strip().lower()] = version.strip()
    return pins


def unavailable() -> str | None:
    """Why the aarch64 user space cannot be used or built here, or None when it can."""
    if shutil.which("qemu-aarch64") is None:
        return "qemu-aarch64 is not installed (apt-get install qemu-user)"
    if PYTHON.is_file() and (SITE / "onnxruntime").is_dir() and (SITE / "tvm").is_dir():
        return None
    if shutil.which("apt-get") is None:
        return "building the aarch64 user space needs apt-get (Debian) to fetch arm64 Python"
    return None


def build() -> None:
    """Fetch and unpack the arm64 Python and the aarch64 wheels (a few minutes, once)."""
    for folder in (APT / "lists/partial", APT / "cache/archives/partial", APT / "debs", SITE,
                   ROOT / "wheels"):
        folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["apt-get", *APT_OPTIONS, "update", "-qq"], check=True)
    subprocess.run(["apt-get", *APT_OPTIONS, "download", "-qq", *DEBS], check=True,
                   cwd=APT / "debs")
    for deb in sorted((APT / "debs").glob("*.deb")):
        subprocess.run(["dpkg", "-x", str(deb), str(SYSROOT)], check=True)
    (SYSROOT / "proc").mkdir(exist_ok=True)
    (SYSROOT / "proc/cpuinfo").write_text(CPUINFO)
    pins = _pins()
    specs = [f"{w}=={pins[w]}" if w in pins else w for w in WHEELS]
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                    "--only-binary=:all:", "--python-version", "3.11", *platforms, *specs,
                    "-d", str(ROOT / "wheels")], check=True)
    for wheel in sorted((ROOT / "wheels").glob("*.whl")):
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(SITE)


def run(script: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run `script` with the aarch64 Python under qemu-user, in the script's folder."""
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(SITE), "HOME": str(ROOT)}
    return subprocess.run(["qemu-aarch64", "-L", str(SYSROOT), str(PYTHON), script.name, *args],
                          cwd=script.parent, env=env, capture_output=True, text=True,
                          timeout=timeout)


if __name__ == "__main__":
    problem = unavailable()
    if problem:
        sys.exit(f"cannot build the aarch64 user space: {problem}")
    build()
    print(f"aarch64 user space ready under {ROOT}")
