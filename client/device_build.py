"""Builds ``fedge-device``, the C++ device client (``client/device/``), against the
installed ExecuTorch wheel: its headers and shared libraries, no libtorch, no Python.

The wheel's CMake package wants CMake ≥ 3.28 for its targets, so the build is given the
wheel's include and lib directories directly; the binary's run path names the lib
directory, so it runs without ``LD_LIBRARY_PATH`` (and needs that wheel where it is).
"""

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

from fedge.errors import FedgeError

SOURCE = Path(__file__).resolve().parent / "device"
BINARY = "fedge-device"
CONFIGURE_TIMEOUT = 180.0  # seconds
BUILD_TIMEOUT = 900.0
SHOWN_LINES = 40  # of a failed step's output, in its error


def executorch_dirs() -> tuple[Path, Path]:
    """The installed executorch wheel's ``include`` and ``lib`` directories."""
    spec = importlib.util.find_spec("executorch")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        include, lib = Path(location) / "include", Path(location) / "lib"
        if ((include / "executorch/extension/module/module.h").is_file()
                and (lib / "libexecutorch.so").is_file()
                and (lib / "libexecutorch_kernels_optimized.so").is_file()):
            return include, lib
    if not locations:
        raise FedgeError("fedge-device builds against ExecuTorch, which is not installed: "
                         "pip install 'fedge[edge]'")
    raise FedgeError(f"the installed executorch ({locations[0]}) lacks the C++ runtime's "
                     "headers or shared libraries (include/executorch, lib/libexecutorch.so, "
                     "lib/libexecutorch_kernels_optimized.so); reinstall it: "
                     "pip install 'fedge[edge]'")


def _compiler() -> str:
    named = os.environ.get("CXX")
    for candidate in ([named] if named else []) + ["c++", "g++", "clang++"]:
        found = shutil.which(candidate)
        if found:
            return found
    if named:
        raise FedgeError(f"the C++ compiler CXX={named} does not exist")
    raise FedgeError("building fedge-device needs a C++17 compiler (g++ or clang++), and none "
                     "is installed (e.g. apt-get install g++)")


def _run(command: list[str], what: str, timeout: float) -> None:
    try:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, errors="replace", timeout=timeout, check=False)
    except subprocess.TimeoutExpired as expired:
        output = expired.stdout if isinstance(expired.stdout, str) else ""
        raise FedgeError(f"{what} timed out after {timeout:g} s; its last output:\n"
                         f"{_tail(output)}") from None
    except OSError as error:
        raise FedgeError(f"{what} could not start ({command[0]}): {error.strerror}") from None
    if done.returncode != 0:
        hint = ""
        if "OpenSSL" in done.stdout and "Could NOT find" in done.stdout:
            hint = " (OpenSSL's headers are missing: e.g. apt-get install libssl-dev)"
        raise FedgeError(f"{what} failed{hint}; its last output:\n{_tail(done.stdout)}")


def _tail(output: str) -> str:
    lines = output.strip().splitlines()
    return "\n".join(lines[-SHOWN_LINES:]) or "(none)"


def build_device(out_dir: Path, jobs: int = 2) -> Path:
    """Configure and build ``fedge-device`` in ``out_dir/build`` (kept for rebuilds) and
    put the binary at ``out_dir/fedge-device``; returns that path."""
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise FedgeError(f"jobs must be a positive integer, not {jobs!r}")
    include, lib = executorch_dirs()
    cmake = shutil.which("cmake")
    if cmake is None:
        raise FedgeError("building fedge-device needs CMake 3.18 or newer, and cmake is not "
                         "installed (e.g. apt-get install cmake, or pip install cmake)")
    compiler = _compiler()
    out_dir = Path(out_dir)
    build = out_dir / "build"
    try:
        build.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise FedgeError(f"cannot create the build folder {build}: {error.strerror}") from None
    _run([cmake, "-S", str(SOURCE), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
          f"-DCMAKE_CXX_COMPILER={compiler}", f"-DEXECUTORCH_INCLUDE_DIR={include}",
          f"-DEXECUTORCH_LIB_DIR={lib}"], "configuring fedge-device (cmake)", CONFIGURE_TIMEOUT)
    _run([cmake, "--build", str(build), "--parallel", str(jobs)],
         "building fedge-device (cmake --build)", BUILD_TIMEOUT)
    built = build / BINARY
    if not built.is_file():
        raise FedgeError(f"the build finished without {built}")
    target = out_dir / BINARY
    temporary = out_dir / f".{BINARY}.tmp"
    try:
        shutil.copy2(built, temporary)
        temporary.replace(target)
    except OSError as error:
        raise FedgeError(f"cannot write {target}: {error.strerror}") from None
    return target
