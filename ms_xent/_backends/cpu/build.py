"""The C++ CPU kernels (``ms_xent/csrc/*.cc``) as one shared library: prebuilt, or built on first use.

Prebuilt: ``pip install`` / ``pip wheel`` (``setup.py``, via :func:`build_prebuilt`) compile the
kernels once per ISA variant of :data:`VARIANTS` into ``prebuilt/`` next to this module, with a
manifest recording each library's size and SHA-256 and the digest of the sources they were built
from. At first use, :func:`kernel_library` picks the first variant whose CPU features the host has
(``/proc/cpuinfo``), checks the library against the manifest and loads it: no compiler needed.

Built on first use (the fallback, and the development path): when no prebuilt library fits (no
``prebuilt/`` directory, e.g. a source checkout on ``PYTHONPATH``; sources edited since the
package was built; no variant for this CPU) or when ``MS_XENT_MARCH`` / ``MS_XENT_EXTRA_CXXFLAGS``
ask for a different build, the kernels are compiled for the host CPU (``-march=native``) into a
cache outside the working directory, ``$MS_XENT_CACHE_DIR`` (default ``$XDG_CACHE_HOME/ms_xent``
or ``~/.cache/ms_xent``), with one WARNING log line, since the call then stalls for 15-60 s. The
cache key covers the kernel sources, the compiler's name, the flags and the CPU's feature flags:
editing a source or moving the cache to another CPU rebuilds instead of loading a binary that
could die with an illegal instruction. Each cached library has a ``.sha256`` record (size and
digest) written at build time; a library that does not match it (truncated, emptied, replaced) is
rebuilt rather than loaded (a truncated one would otherwise kill the process with SIGBUS).
Concurrent processes (e.g. ``msrun`` workers) build once: a file lock serialises them and the
library is renamed into place atomically. Files are made 0644 and directories 0755, so that other
users of a shared cache can load them.

This module imports only the standard library: ``setup.py`` and the sanitizer run load it by path.

Environment:
    MS_XENT_CACHE_DIR       where libraries built on first use live.
    CXX                     the C++ compiler (default ``g++``); only needed for a build.
    MS_XENT_MARCH           value for ``-march`` of a first-use build (default ``native``;
                            e.g. ``x86-64`` for a portable build). Setting it forces a build.
    MS_XENT_EXTRA_CXXFLAGS  extra flags, e.g. ``-fsanitize=address,undefined`` for sanitizer
                            runs. Setting it forces a build.
"""

import concurrent.futures
import fcntl
import functools
import hashlib
import json
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile

_LOG = logging.getLogger(__name__)

# The kernel sources live at ms_xent/csrc (the kernel-source layer), two levels above this module.
CSRC_DIR = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir,
                                        os.pardir, "csrc"))
PREBUILT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prebuilt")
MANIFEST_NAME = "manifest.json"
LIBRARY_NAME = "libms_xent_kernels.so"

# -fno-trapping-math lets GCC vectorise the exp/select loops; -ffp-contract=fast allows FMA.
# No -ffast-math: NaN and inf must propagate exactly as docs/semantics.md says.
# -D_GLIBCXX_USE_CXX11_ABI=0: MindSpore passes std::string through AotExtra's virtual calls.
BASE_FLAGS = [
    "-O3", "-std=gnu++17", "-fPIC", "-shared", "-fopenmp",
    "-fno-trapping-math", "-fno-math-errno", "-ffp-contract=fast",
    "-D_GLIBCXX_USE_CXX11_ABI=0", "-Wall", "-Wno-unused-function",
    # GCC 12 reports its own AVX-512 intrinsics' `__Y = __Y` idiom as maybe-uninitialised.
    "-Wno-maybe-uninitialized",
]

_X86_64 = platform.machine() in ("x86_64", "AMD64")
# GCC defaults to 256-bit vectors even on AVX-512 CPUs; 512-bit ones made the kernels 20-30%
# faster here. Without AVX-512 the flag has no effect.
_X86_FLAGS = ["-mprefer-vector-width=512"] if _X86_64 else []

# /proc/cpuinfo names of the features each x86-64 micro-architecture level requires ("abm" is
# how Linux lists LZCNT). The kernels' #ifs select AVX-512 code on __AVX512F__, __AVX512BW__ and
# __AVX512VL__ (row_kernels.h) and the one-instruction float32 -> bfloat16 rounding on
# __AVX512BF16__; everything else is auto-vectorised for whatever -march allows.
_X86_64_V2 = ("cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3")
_X86_64_V3 = _X86_64_V2 + ("avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave")
_X86_64_V4 = _X86_64_V3 + ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl")

# The prebuilt variants, best first: (name, compiler flags, CPU features required to run it).
# At first use the first variant whose features the CPU has is loaded. x86-64-v4 without BF16
# serves AVX-512 CPUs such as Skylake-X and Ice Lake; plain x86-64 serves any x86-64 CPU. On
# another architecture a single build with the compiler's default target is made.
if _X86_64:
    VARIANTS = (
        ("x86-64-v4-bf16", ["-march=x86-64-v4", "-mavx512bf16"], _X86_64_V4 + ("avx512_bf16",)),
        ("x86-64-v4", ["-march=x86-64-v4"], _X86_64_V4),
        ("x86-64-v3", ["-march=x86-64-v3"], _X86_64_V3),
        ("x86-64", ["-march=x86-64"], ()),
    )
else:
    VARIANTS = ((platform.machine() or "default", [], ()),)


class KernelBuildError(RuntimeError):
    """The CPU kernels could not be compiled, or their cache could not be written."""


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
            f"ms_xent needs to compile its CPU kernels (no prebuilt library fits: see the log) and "
            f"needs a C++ compiler, but CXX={cxx!r} was not found on PATH. Install one (e.g. "
            "`apt-get install g++`) or set CXX.")
    return path


def _cpu_flags():
    """The CPU's feature flags as listed by /proc/cpuinfo (empty when it cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].split()
    except OSError:
        pass
    return []


def _sources():
    return sorted(os.path.join(CSRC_DIR, name) for name in os.listdir(CSRC_DIR)
                  if name.endswith((".cc", ".h")))


def sources_digest():
    """SHA-256 of the kernel sources' names and contents: what a built library was built from."""
    digest = hashlib.sha256()
    for path in _sources():
        digest.update(os.path.basename(path).encode())
        with open(path, "rb") as source:
            digest.update(source.read())
    return digest.hexdigest()


def _file_record(path):
    """(size, SHA-256) of a file: what a library is checked against before it is loaded."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as data:
        for block in iter(lambda: data.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


def _matches(path, size, sha256):
    try:
        return os.path.getsize(path) == size and _file_record(path) == (size, sha256)
    except OSError:
        return False


def build_flags():
    """Flags of a first-use build: BASE_FLAGS, -march (MS_XENT_MARCH, default native), extras."""
    march = os.environ.get("MS_XENT_MARCH", "native")
    extra = shlex.split(os.environ.get("MS_XENT_EXTRA_CXXFLAGS", ""))
    return BASE_FLAGS + ([f"-march={march}"] if march else []) + _X86_FLAGS + extra


def _compile(compiler, flags, output):
    sources = [path for path in _sources() if path.endswith(".cc")]
    command = [compiler, *flags, "-I", CSRC_DIR, *sources, "-o", output]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise KernelBuildError(
            "compiling the ms_xent CPU kernels failed:\n  " + " ".join(command) + "\n" + result.stderr)


# ---- prebuilt libraries (package build time) -----------------------------------------------

def _compiler_accepts(compiler, flags):
    """Whether the compiler knows these target flags (e.g. GCC < 11 has no -march=x86-64-v4)."""
    result = subprocess.run([compiler, *flags, "-x", "c++", "-E", "-o", os.devnull, os.devnull],
                            capture_output=True, check=False)
    return result.returncode == 0


def build_prebuilt(output_dir, announce=print):
    """Compiles every variant the compiler supports into output_dir, with its manifest.

    Returns the paths written. Variants are compiled in parallel, one per available core.
    """
    compiler = _compiler()
    os.makedirs(output_dir, exist_ok=True)
    jobs = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for name, target_flags, _ in VARIANTS:
            if not _compiler_accepts(compiler, target_flags):
                announce(f"ms_xent: {compiler} does not support {' '.join(target_flags)}: "
                         f"no {name} kernels")
                continue
            output = os.path.join(output_dir, f"libms_xent_kernels.{name}.so")
            announce(f"ms_xent: compiling the CPU kernels for {name}")
            jobs[name] = (output, pool.submit(_compile, compiler, BASE_FLAGS + target_flags
                                              + _X86_FLAGS, output))
    variants = {}
    for name, (output, job) in jobs.items():
        job.result()
        os.chmod(output, 0o644)
        size, sha256 = _file_record(output)
        variants[name] = {"file": os.path.basename(output), "size": size, "sha256": sha256}
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False)
    manifest = {"sources_sha256": sources_digest(), "compiler": version.stdout.split("\n")[0],
                "variants": variants}
    manifest_path = os.path.join(output_dir, MANIFEST_NAME)
    with open(manifest_path, "w", encoding="utf-8") as out:
        json.dump(manifest, out, indent=1)
    return [os.path.join(output_dir, entry["file"]) for entry in variants.values()] + [manifest_path]


def _prebuilt_library():
    """The prebuilt library for this CPU, or (None, the reason there is none)."""
    try:
        with open(os.path.join(PREBUILT_DIR, MANIFEST_NAME), encoding="utf-8") as manifest_file:
            manifest = json.load(manifest_file)
    except FileNotFoundError:
        return None, "no prebuilt kernels are installed (a source checkout)"
    except (OSError, ValueError) as error:
        return None, f"the prebuilt kernels' manifest is unreadable ({error})"
    if manifest.get("sources_sha256") != sources_digest():
        return None, "the kernel sources changed since the prebuilt kernels were built"
    cpu = set(_cpu_flags())
    for name, _, required in VARIANTS:
        entry = manifest["variants"].get(name)
        if entry is None or not cpu.issuperset(required):
            continue
        library = os.path.join(PREBUILT_DIR, entry["file"])
        if not _matches(library, entry["size"], entry["sha256"]):
            return None, f"the prebuilt {name} library does not match its manifest (damaged)"
        _LOG.debug("ms_xent: using the prebuilt %s CPU kernels %s", name, library)
        return library, None
    return None, "no prebuilt variant suits this CPU"


# ---- first-use build (cached) ------------------------------------------------------------

def _cache_key(flags):
    """No compiler is run for the key: a valid cached library loads without a compiler."""
    digest = hashlib.sha256()
    cpu = " ".join(_cpu_flags()) or platform.processor()
    for part in (sources_digest(), os.environ.get("CXX", "g++"), " ".join(flags), cpu,
                 platform.machine()):
        digest.update(part.encode())
    return digest.hexdigest()[:20]


def _cache_error(path, error):
    return KernelBuildError(
        f"ms_xent cannot write its kernel cache at {path!r} ({error.strerror or error}): set "
        "MS_XENT_CACHE_DIR to a writable directory")


def _make_directory(path):
    """Creates path and its missing parents with mode 0755 (whatever the umask)."""
    path = os.path.abspath(path)
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory)
        except FileExistsError:
            if not os.path.isdir(directory):
                raise NotADirectoryError(20, "Not a directory", directory) from None
            continue
        os.chmod(directory, 0o755)


def _record_path(library):
    return library + ".sha256"


def _cached_library_valid(library):
    try:
        with open(_record_path(library), encoding="utf-8") as record:
            size, sha256 = record.read().split()
        return _matches(library, int(size), sha256)
    except (OSError, ValueError):
        return False


def _write_file_atomically(directory, suffix, target, write):
    """Writes a temporary file in directory with write(path), makes it 0644, renames it to target."""
    handle, partial = tempfile.mkstemp(suffix=suffix, dir=directory)
    os.close(handle)
    try:
        write(partial)
        os.chmod(partial, 0o644)
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def _build_cached(flags, reason):
    directory = os.path.join(cache_root(), _cache_key(flags))
    library = os.path.join(directory, LIBRARY_NAME)
    if _cached_library_valid(library):
        return library
    try:
        _make_directory(directory)
        lock = os.open(os.path.join(directory, ".lock"), os.O_RDONLY | os.O_CREAT, 0o644)
    except OSError as error:
        raise _cache_error(cache_root(), error) from error
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _cached_library_valid(library):
            return library
        if os.path.exists(library):
            reason = f"the cached library {library} does not match its checksum record; rebuilding"
        compiler = _compiler()
        _LOG.warning("ms_xent: compiling the CPU kernels (%s) into %s: %s; this takes 15-60 s "
                     "once", " ".join(flag for flag in flags if flag.startswith("-march")) or
                     "default target", directory, reason)
        try:
            _write_file_atomically(directory, ".so", library,
                                   lambda path: _compile(compiler, flags, path))
            size, sha256 = _file_record(library)
            _write_file_atomically(directory, ".sha256", _record_path(library),
                                   lambda path: _write_text(path, f"{size} {sha256}\n"))
        except OSError as error:
            raise _cache_error(directory, error) from error
    finally:
        os.close(lock)
    return library


def _write_text(path, text):
    with open(path, "w", encoding="utf-8") as out:
        out.write(text)


@functools.lru_cache(maxsize=None)
def kernel_library():
    """Absolute path of the kernel library for this CPU: prebuilt, cached, or built now."""
    forced = [name for name in ("MS_XENT_MARCH", "MS_XENT_EXTRA_CXXFLAGS") if os.environ.get(name)]
    if forced:
        reason = f"{' and '.join(forced)} set"
    else:
        library, reason = _prebuilt_library()
        if library is not None:
            return library
    return _build_cached(build_flags(), reason)
