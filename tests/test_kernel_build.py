"""The kernel library's lookup (ms_xent/_backends/cpu/build.py): prebuilt variant choice, the
first-use build's cache (validation before loading, rebuild of a damaged library, file modes, no
compiler for a valid library, errors naming MS_XENT_CACHE_DIR).

Loading a damaged library can kill the process (a truncated one with SIGBUS), so every cache test
runs the lookup in a subprocess with its own MS_XENT_CACHE_DIR under tmp_path. The compiler those
subprocesses see is a stand-in ``g++`` placed first on PATH that copies a real kernel library and
leaves a marker file: whether a rebuild ran is then observable, and fast. The real compiler build is
exercised by the sanitizer run and by every source checkout's first use.
"""

import ctypes
import hashlib
import importlib.util
import json
import os
import shutil
import stat
import subprocess
import sys

import pytest

# The ms_xent that the tests import (the checkout's, or an installed wheel's), found without
# importing it.
PACKAGE_DIR = importlib.util.find_spec("ms_xent").submodule_search_locations[0]
BUILD_PY = os.path.join(PACKAGE_DIR, "_backends", "cpu", "build.py")
SYMBOL = "BceWithLogitsForward"


def load_build_module():
    """build.py loaded by path (it imports only the standard library), as setup.py does."""
    spec = importlib.util.spec_from_file_location("ms_xent_kernel_build_under_test", BUILD_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", name="real_library")
def real_library_fixture():
    """A real kernel library (the one the rest of the suite loads)."""
    return load_build_module().kernel_library()


@pytest.fixture(name="fake_compiler")
def fake_compiler_fixture(tmp_path, real_library):
    """A directory holding a ``g++`` that copies the real library to its -o argument."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    marker = tmp_path / "compiler_ran"
    script = bin_dir / "g++"
    script.write_text(
        "#!/bin/sh\n"
        f"echo \"$@\" >> '{marker}'\n"
        "for last; do :; done\n"
        f"cp '{real_library}' \"$last\"\n")
    script.chmod(0o755)
    return bin_dir, marker


def run_lookup(cache_dir, bin_dir, umask=0o022, extra_env=None, patch=""):
    """kernel_library() in a fresh process with a forced first-use build; loads the result."""
    code = (
        "import ctypes, importlib.util, json, os, sys\n"
        f"os.umask({umask})\n"
        f"spec = importlib.util.spec_from_file_location('kernel_build', {BUILD_PY!r})\n"
        "build = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(build)\n"
        f"{patch}\n"
        "try:\n"
        "    library = build.kernel_library()\n"
        "except build.KernelBuildError as error:\n"
        "    print(json.dumps({'error': str(error)}))\n"
        "    sys.exit(0)\n"
        f"ctypes.CDLL(library).{SYMBOL}\n"
        "print(json.dumps({'library': library}))\n")
    env = dict(os.environ, MS_XENT_CACHE_DIR=str(cache_dir), MS_XENT_MARCH="x86-64", CXX="g++",
               PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("MS_XENT_EXTRA_CXXFLAGS", None)
    env.update(extra_env or {})
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_first_use_build_writes_world_readable_files_and_a_checksum_record(tmp_path, fake_compiler):
    bin_dir, marker = fake_compiler
    cache = tmp_path / "cache" / "nested"
    result, stderr = run_lookup(cache, bin_dir, umask=0o077)
    library = result["library"]
    assert marker.exists()
    assert "compiling the CPU kernels" in stderr and "MS_XENT_MARCH set" in stderr
    assert mode(library) == 0o644
    assert mode(library + ".sha256") == 0o644
    assert mode(os.path.dirname(library)) == 0o755
    assert mode(cache) == 0o755 and mode(cache.parent) == 0o755
    size, sha256 = open(library + ".sha256", encoding="utf-8").read().split()
    content = open(library, "rb").read()
    assert int(size) == len(content) and sha256 == hashlib.sha256(content).hexdigest()


def test_valid_cached_library_loads_without_running_the_compiler(tmp_path, fake_compiler):
    bin_dir, marker = fake_compiler
    first, _ = run_lookup(tmp_path / "cache", bin_dir)
    marker.unlink()
    (bin_dir / "g++").write_text(f"#!/bin/sh\ntouch '{marker}'\nexit 1\n")
    second, stderr = run_lookup(tmp_path / "cache", bin_dir)
    assert second == first
    assert not marker.exists()
    assert "compiling" not in stderr


@pytest.mark.parametrize("damage", ["truncated", "empty", "no_record", "replaced"])
def test_damaged_cached_library_is_rebuilt_not_loaded(tmp_path, fake_compiler, real_library,
                                                       damage):
    bin_dir, marker = fake_compiler
    library = run_lookup(tmp_path / "cache", bin_dir)[0]["library"]
    marker.unlink()
    content = open(library, "rb").read()
    if damage == "truncated":  # loading this one dies with SIGBUS
        open(library, "wb").write(content[: len(content) // 2])
    elif damage == "empty":
        open(library, "wb").close()
    elif damage == "no_record":  # e.g. left by an interrupted or older build
        os.unlink(library + ".sha256")
    else:
        open(library, "wb").write(content[:-1] + bytes([content[-1] ^ 1]))
    result, stderr = run_lookup(tmp_path / "cache", bin_dir)
    assert result["library"] == library
    assert marker.exists()
    assert open(library, "rb").read() == open(real_library, "rb").read()
    if damage != "no_record":
        assert "does not match its checksum record" in stderr


def test_cache_path_that_is_a_file_names_the_variable(tmp_path, fake_compiler):
    bin_dir, _ = fake_compiler
    blocker = tmp_path / "not_a_directory"
    blocker.write_text("")
    result, _ = run_lookup(blocker / "cache", bin_dir)
    assert "MS_XENT_CACHE_DIR" in result["error"]
    assert str(blocker) in result["error"]


def test_unwritable_cache_names_the_variable(tmp_path, fake_compiler):
    # Permission bits do not stop root, so the refusal is simulated at os.mkdir.
    bin_dir, _ = fake_compiler
    patch = ("def refuse(path, *args, **kwargs):\n"
             "    raise PermissionError(13, 'Permission denied', path)\n"
             "build.os.mkdir = refuse\n")
    result, _ = run_lookup(tmp_path / "cache", bin_dir, patch=patch)
    assert "MS_XENT_CACHE_DIR" in result["error"] and "Permission denied" in result["error"]


def test_missing_compiler_is_named_when_a_build_is_needed(tmp_path, fake_compiler):
    bin_dir, _ = fake_compiler
    result, _ = run_lookup(tmp_path / "cache", bin_dir, extra_env={"CXX": "no-such-compiler"})
    assert "no-such-compiler" in result["error"]


# ---- prebuilt variants -------------------------------------------------------------------

V3_CPU = ("cx16 lahf_lm popcnt sse4_1 sse4_2 ssse3 avx avx2 bmi1 bmi2 f16c fma abm movbe "
          "xsave").split()
V4_CPU = V3_CPU + "avx512f avx512bw avx512cd avx512dq avx512vl".split()


@pytest.fixture(name="prebuilt")
def prebuilt_fixture(tmp_path, monkeypatch):
    """build.py with PREBUILT_DIR pointing at a fake set of variant libraries and a manifest."""
    build = load_build_module()
    if not any(name == "x86-64-v3" for name, _, _ in build.VARIANTS):
        pytest.fail("these cases describe the x86-64 variants; run them on x86-64")
    directory = tmp_path / "prebuilt"
    directory.mkdir()
    variants = {}
    for name, _, _ in build.VARIANTS:
        library = directory / f"lib.{name}.so"
        library.write_bytes(name.encode())
        variants[name] = {"file": library.name, "size": len(name),
                          "sha256": hashlib.sha256(name.encode()).hexdigest()}
    manifest = {"sources_sha256": build.sources_digest(), "compiler": "test", "variants": variants}
    (directory / build.MANIFEST_NAME).write_text(json.dumps(manifest))
    monkeypatch.setattr(build, "PREBUILT_DIR", str(directory))
    return build, directory, manifest


@pytest.mark.parametrize("cpu, expected", [
    (V4_CPU + ["avx512_bf16"], "x86-64-v4-bf16"),
    (V4_CPU, "x86-64-v4"),
    (V3_CPU, "x86-64-v3"),
    (V3_CPU[:-1], "x86-64"),  # one v3 feature missing
    ([], "x86-64"),
])
def test_prebuilt_variant_follows_the_cpu_features(prebuilt, monkeypatch, cpu, expected):
    build, directory, _ = prebuilt
    monkeypatch.setattr(build, "_cpu_flags", lambda: cpu)
    library, reason = build._prebuilt_library()
    assert reason is None
    assert library == str(directory / f"lib.{expected}.so")


def test_prebuilt_built_from_other_sources_is_not_used(prebuilt):
    build, directory, manifest = prebuilt
    manifest["sources_sha256"] = "0" * 64
    (directory / build.MANIFEST_NAME).write_text(json.dumps(manifest))
    library, reason = build._prebuilt_library()
    assert library is None and "sources changed" in reason


def test_damaged_prebuilt_library_is_not_used(prebuilt, monkeypatch):
    build, directory, _ = prebuilt
    monkeypatch.setattr(build, "_cpu_flags", lambda: V3_CPU)
    (directory / "lib.x86-64-v3.so").write_bytes(b"x86-64-v")
    library, reason = build._prebuilt_library()
    assert library is None and "x86-64-v3" in reason and "damaged" in reason


def test_build_variables_bypass_the_prebuilt_library(prebuilt, monkeypatch, tmp_path):
    build, _, _ = prebuilt
    monkeypatch.setattr(build, "_cpu_flags", lambda: V3_CPU)
    builds = []
    monkeypatch.setattr(build, "_build_cached", lambda flags, reason: builds.append(reason) or "x")
    monkeypatch.delenv("MS_XENT_MARCH", raising=False)
    monkeypatch.delenv("MS_XENT_EXTRA_CXXFLAGS", raising=False)
    assert build.kernel_library().endswith("lib.x86-64-v3.so")
    build.kernel_library.cache_clear()
    monkeypatch.setenv("MS_XENT_EXTRA_CXXFLAGS", "-g")
    assert build.kernel_library() == "x"
    assert builds == ["MS_XENT_EXTRA_CXXFLAGS set"]


def test_no_prebuilt_directory_falls_back_to_a_build(prebuilt):
    build, directory, _ = prebuilt
    shutil.rmtree(directory)
    library, reason = build._prebuilt_library()
    assert library is None and "no prebuilt kernels" in reason


def test_real_library_exports_the_kernels(real_library):
    assert getattr(ctypes.CDLL(real_library), SYMBOL)
