"""Builds the C++ CPU kernels (``ms_xent/csrc/*.cc``) into one shared library on first use.

The library is compiled for the host CPU (``-march=native``) and cached outside the working
directory, under ``$MS_XENT_CACHE_DIR`` (default ``$XDG_CACHE_HOME/ms_xent`` or
``~/.cache/ms_xent``). The cache key covers the kernel sources, the compiler, the flags and the
CPU's feature flags, so editing a source, changing compiler or moving the cache to another CPU
triggers a rebuild instead of loading a binary that could die with an illegal instruction.
Concurrent processes (e.g. ``msrun`` workers) build once: a file lock serialises them and the
library is renamed into place atomically.

Environment:
    MS_XENT_CACHE_DIR       where built libraries live.
    CXX                     the C++ compiler (default ``g++``).
    MS_XENT_MARCH           value for ``-march`` (default ``native``; ``x86-64`` for a portable build).
    MS_XENT_EXTRA_CXXFLAGS  extra flags, e.g. ``-fsanitize=address,undefined`` for sanitizer runs.
"""

import fcntl
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile

# The kernel sources live at ms_xent/csrc (the kernel-source layer), two levels above this module.
CSRC_DIR = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir,
                                        os.pardir, "csrc"))
LIBRARY_NAME = "libms_xent_kernels.so"

# -fno-trapping-math lets GCC vectorise the exp/select loops; -ffp-contract=fast allows FMA.
# No -ffast-math: NaN and inf must propagate exactly as the SPEC says.
# -D_GLIBCXX_USE_CXX11_ABI=0: MindSpore passes std::string through AotExtra's virtual calls.
BASE_FLAGS = [
    "-O3", "-std=gnu++17", "-fPIC", "-shared", "-fopenmp",
    "-fno-trapping-math", "-fno-math-errno", "-ffp-contract=fast",
    "-D_GLIBCXX_USE_CXX11_ABI=0", "-Wall", "-Wno-unused-function",
    # GCC 12 reports its own AVX-512 intrinsics' `__Y = __Y` idiom as maybe-uninitialised.
    "-Wno-maybe-uninitialized",
]


class KernelBuildError(RuntimeError):
    """The CPU kernels could not be compiled."""


def cache_root():
    root = os.environ.get("MS_XENT_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "ms_xent")
    return root


def _compiler():
    cxx = os.environ.get("CXX", "g++")
    path = shutil.which(cxx)
    if path is None:
        raise KernelBuildError(
            f"ms_xent builds its CPU kernels on first use and needs a C++ compiler, but CXX={cxx!r} "
            "was not found on PATH. Install one (e.g. `apt-get install g++`) or set CXX.")
    return path


def _cpu_signature():
    """The CPU's feature flags: the same binary is only reused on a CPU with the same ISA."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _sources():
    return sorted(os.path.join(CSRC_DIR, name) for name in os.listdir(CSRC_DIR)
                  if name.endswith((".cc", ".h")))


def build_flags():
    march = os.environ.get("MS_XENT_MARCH", "native")
    extra = shlex.split(os.environ.get("MS_XENT_EXTRA_CXXFLAGS", ""))
    flags = BASE_FLAGS + ([f"-march={march}"] if march else [])
    if platform.machine() in ("x86_64", "AMD64"):
        # GCC defaults to 256-bit vectors even on AVX-512 CPUs; 512-bit ones made the kernels
        # 20-30% faster here. Without AVX-512 the flag has no effect.
        flags.append("-mprefer-vector-width=512")
    return flags + extra


def _cache_key(compiler, flags):
    digest = hashlib.sha256()
    for path in _sources():
        digest.update(os.path.basename(path).encode())
        with open(path, "rb") as source:
            digest.update(source.read())
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False)
    for part in (compiler, version.stdout, " ".join(flags), _cpu_signature(), platform.machine()):
        digest.update(part.encode())
    return digest.hexdigest()[:20]


def _compile(compiler, flags, output):
    sources = [path for path in _sources() if path.endswith(".cc")]
    command = [compiler, *flags, "-I", CSRC_DIR, *sources, "-o", output]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise KernelBuildError(
            "compiling the ms_xent CPU kernels failed:\n  " + " ".join(command) + "\n" + result.stderr)


@functools.lru_cache(maxsize=None)
def kernel_library():
    """Absolute path of the compiled kernel library, building it if no valid copy is cached."""
    compiler = _compiler()
    flags = build_flags()
    directory = os.path.join(cache_root(), _cache_key(compiler, flags))
    library = os.path.join(directory, LIBRARY_NAME)
    if os.path.exists(library):
        return library
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, ".lock"), "w", encoding="utf-8") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(library):
            handle, partial = tempfile.mkstemp(suffix=".so", dir=directory)
            os.close(handle)
            try:
                _compile(compiler, flags, partial)
                os.replace(partial, library)
            finally:
                if os.path.exists(partial):
                    os.unlink(partial)
    return library
