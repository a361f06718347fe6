#!/usr/bin/env python3
"""Provision the ONNX Runtime shared libraries that elite-ort loads at run time.

The libraries come from the official `onnxruntime` wheel (or `onnxruntime-gpu` with --gpu, or
with --openvino the `onnxruntime-ep-openvino` plugin that `--precision bf16` loads), fetched
with pip's own client, checked against a pinned sha256, and unpacked into
`<repo>/.ort/<package>-<version>/`. The directory appears atomically (everything is
prepared in a temporary directory beside it and renamed into place), so a present directory is
always complete, and a second run does nothing and needs no network.

Standard library only. `build.rs` runs this for the CPU flavour when the library is missing.
Prints the path of the main library on stdout; progress and errors go to stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

ORT_VERSION = "1.31.1"
WHEEL_PLATFORM = "manylinux_2_28_x86_64"
# The shared libraries are the same in every CPython build of the wheel; this only picks one.
WHEEL_PYTHON = "3.11"
MAIN_LIBRARY = f"libonnxruntime.so.{ORT_VERSION}"
SHARED_PROVIDERS = "libonnxruntime_providers_shared.so"
WHEEL_LIB_DIR = "onnxruntime/capi/"
PROVENANCE_FILE = "PROVENANCE"


@dataclass(frozen=True)
class Flavour:
    """One ONNX Runtime wheel and what to take out of it."""

    package: str
    version: str
    dir_name: str
    # sha256 of the cp311 manylinux_2_28_x86_64 wheel; None: not pinned yet (see --sha256).
    sha256: str | None
    libraries: tuple[str, ...]
    # The folder of the wheel that holds them, and the one whose path is printed.
    member_dir: str = WHEEL_LIB_DIR
    main: str = MAIN_LIBRARY


CPU = Flavour(
    package="onnxruntime",
    version=ORT_VERSION,
    dir_name=f"onnxruntime-{ORT_VERSION}",
    sha256="5752bd508126ae7c49894d3b9d2e83f0c3d487319246d04c444b393308d7ad7f",
    libraries=(MAIN_LIBRARY, SHARED_PROVIDERS),
)

GPU = Flavour(
    package="onnxruntime-gpu",
    version=ORT_VERSION,
    dir_name=f"onnxruntime-gpu-{ORT_VERSION}",
    # The 256 MB cp311 wheel, fetched once with `pip download` (which checks the registry's
    # published hash) on 2026-11-27.
    sha256="e26c475fe361b2015f45b4b824bd13f0bb20204e59b62814e6f0acd5f3d491a6",
    libraries=(
        MAIN_LIBRARY,
        SHARED_PROVIDERS,
        "libonnxruntime_providers_cuda.so",
        "libonnxruntime_providers_tensorrt.so",
    ),
)


OPENVINO_EP_VERSION = "1.8.1"
OPENVINO_PLUGIN = "libonnxruntime_providers_openvino_plugin.so"

# ONNX Runtime's OpenVINO execution provider as a plugin library (ONNX Runtime >= 1.23 loads
# it into its own process at run time; `--precision bf16`), with the OpenVINO 2026.4 runtime
# and the parts of it a CPU needs: the ONNX reader, the CPU device and the meta devices
# (AUTO, HETERO, BATCH) that OpenVINO's device list opens, TBB and hwloc. The GPU and NPU
# devices (52 MB) and their kernel cache are left out: this runtime uses OpenVINO on the CPU.
OPENVINO = Flavour(
    package="onnxruntime-ep-openvino",
    version=OPENVINO_EP_VERSION,
    dir_name=f"onnxruntime-ep-openvino-{OPENVINO_EP_VERSION}",
    # The 53 MB py3-none wheel, fetched with `pip download` (which checks the registry's
    # published hash) on 2026-12-01.
    sha256="3832643158c8c187fcab6db661cde2a8c06a2b3559d95d0f2411ac0e51c5e924",
    libraries=(
        OPENVINO_PLUGIN,
        "libopenvino.so.2641",
        "libopenvino_onnx_frontend.so.2641",
        "libopenvino_ir_frontend.so.2641",
        "libopenvino_intel_cpu_plugin.so",
        "libopenvino_auto_plugin.so",
        "libopenvino_auto_batch_plugin.so",
        "libopenvino_hetero_plugin.so",
        "libtbb.so.12",
        "libtbbbind_2_5.so.3",
        "libtbbmalloc.so.2",
        "libtbbmalloc_proxy.so.2",
        "libhwloc.so.15",
        "third-party-programs.txt",
    ),
    member_dir="onnxruntime_ep_openvino/",
    main=OPENVINO_PLUGIN,
)


class ProvisionError(Exception):
    """A provisioning step failed; the message says which and why."""


def log(message: str) -> None:
    print(f"provision_ort: {message}", file=sys.stderr, flush=True)


def is_complete(directory: Path, flavour: Flavour) -> bool:
    return all((directory / name).is_file() for name in flavour.libraries)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_host() -> None:
    machine = platform.machine().lower()
    if not sys.platform.startswith("linux") or machine not in ("x86_64", "amd64"):
        raise ProvisionError(
            f"the {WHEEL_PLATFORM} wheel's libraries run on x86_64 Linux only; "
            f"this is {sys.platform}/{machine}. Point elite-ort at an ONNX Runtime "
            f"{ORT_VERSION} library with --ort-lib or ORT_DYLIB_PATH instead"
        )


def download_wheel(flavour: Flavour, dest: Path) -> Path:
    requirement = f"{flavour.package}=={flavour.version}"
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--platform",
        WHEEL_PLATFORM,
        "--python-version",
        WHEEL_PYTHON,
        "--disable-pip-version-check",
        # Bounded, so that a build on a machine without network fails in seconds, not minutes.
        "--retries",
        "2",
        "--timeout",
        "30",
        "--quiet",
        "--dest",
        str(dest),
        requirement,
    ]
    log(f"downloading the {requirement} wheel with pip")
    # pip's stdout goes to our stderr: stdout is reserved for the resulting path.
    result = subprocess.run(command, stdout=sys.stderr, stderr=sys.stderr, check=False)
    if result.returncode != 0:
        raise ProvisionError(
            f"`{' '.join(command[1:4])} ... {requirement}` failed with exit status "
            f"{result.returncode} (is the package registry reachable? pip's own message is above)"
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        found = ", ".join(w.name for w in wheels) or "nothing"
        raise ProvisionError(f"expected one wheel for {requirement} in {dest}, found {found}")
    return wheels[0]


def extract_libraries(wheel: Path, flavour: Flavour, into: Path) -> None:
    into.mkdir()
    with zipfile.ZipFile(wheel) as archive:
        members = {info.filename: info for info in archive.infolist()}
        for name in flavour.libraries:
            info = members.get(flavour.member_dir + name)
            if info is None:
                raise ProvisionError(f"{wheel.name} has no {flavour.member_dir}{name}")
            target = into / name
            with archive.open(info) as source, target.open("wb") as sink:
                shutil.copyfileobj(source, sink, 1 << 20)
            target.chmod(0o755)
            # Keep the archive's timestamp: the file then looks unchanged to cargo's
            # rerun-if-changed on later builds.
            stamp = time.mktime(info.date_time + (0, 0, -1))
            os.utime(target, (stamp, stamp))


def provision(flavour: Flavour, root: Path, expected_sha256: str | None) -> Path:
    """Make `<root>/.ort/<flavour dir>/` hold the flavour's libraries; return the main one."""
    ort_dir = root / ".ort"
    final = ort_dir / flavour.dir_name
    if is_complete(final, flavour):
        log(f"{final} is already provisioned")
        return final / flavour.main
    if final.exists():
        raise ProvisionError(
            f"{final} exists but lacks some of {', '.join(flavour.libraries)}; "
            "it was not made by this script: remove it and run again"
        )
    check_host()
    expected = (expected_sha256 or flavour.sha256 or "").lower() or None
    ort_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{flavour.dir_name}.", dir=ort_dir))
    try:
        wheel = download_wheel(flavour, work / "download")
        actual = sha256_of(wheel)
        if expected is None:
            raise ProvisionError(
                f"the sha256 of {flavour.package} {flavour.version} is not pinned in "
                f"{Path(__file__).name}; the downloaded {wheel.name} has sha256 {actual}. "
                "Check it against the registry's published hash, then pin it or pass --sha256"
            )
        if actual != expected:
            raise ProvisionError(
                f"{wheel.name}: sha256 mismatch: expected {expected}, got {actual}; "
                "refusing to use it"
            )
        staged = work / "lib"
        extract_libraries(wheel, flavour, staged)
        (staged / PROVENANCE_FILE).write_text(
            f"package: {flavour.package}=={flavour.version}\n"
            f"wheel: {wheel.name}\n"
            f"sha256: {actual}\n"
            f"members: {', '.join(flavour.member_dir + name for name in flavour.libraries)}\n",
            encoding="utf-8",
        )
        try:
            os.rename(staged, final)
        except OSError:
            # Another build provisioned it meanwhile; theirs is as good as ours.
            if not is_complete(final, flavour):
                raise
        log(f"provisioned {flavour.package} {flavour.version} into {final}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final / flavour.main


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--gpu",
        action="store_true",
        help=f"provision onnxruntime-gpu {ORT_VERSION} (CUDA and TensorRT providers) instead",
    )
    which.add_argument(
        "--openvino",
        action="store_true",
        help=f"provision the OpenVINO execution provider plugin {OPENVINO_EP_VERSION} "
        "(for --precision bf16) instead",
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=Path(__file__).resolve().parent.parent,
        help="repository root that holds .ort/ (default: this script's repository)",
    )
    parser.add_argument(
        "--sha256",
        help="expected sha256 of the wheel, overriding (or standing in for) the pinned one",
    )
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    flavour = GPU if args.gpu else OPENVINO if args.openvino else CPU
    try:
        library = provision(flavour, args.root.resolve(), args.sha256)
    except (ProvisionError, OSError, zipfile.BadZipFile) as error:
        log(f"error: {error}")
        return 1
    print(library)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
