"""Builds ms_xent's C++ CPU kernels into the package (metadata lives in setup.cfg).

``build_ext`` compiles ``ms_xent/csrc/*.cc`` once per ISA variant (the variants, flags and
manifest are defined in ``ms_xent/_backends/cpu/build.py``, loaded here by path so that the flags
live in one place) into ``ms_xent/_backends/cpu/prebuilt/``: into the build tree for ``pip
install .`` / ``pip wheel .``, into the source tree for the editable install. The kernels are not
Python extension modules (MindSpore loads them by path), so the command drives the compiler itself.
"""

import importlib.util
import os

from setuptools import Distribution, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
PREBUILT = os.path.join("ms_xent", "_backends", "cpu", "prebuilt")


def _kernel_build():
    path = os.path.join(HERE, "ms_xent", "_backends", "cpu", "build.py")
    spec = importlib.util.spec_from_file_location("ms_xent_kernel_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildKernels(build_ext):
    """Compiles the prebuilt kernel libraries and their manifest."""

    def run(self):
        root = HERE if self.inplace else self.build_lib
        self._outputs = _kernel_build().build_prebuilt(os.path.join(root, PREBUILT),
                                                        announce=self.announce_always)

    def announce_always(self, message):
        self.announce(message, level=2)

    def get_outputs(self):
        return list(getattr(self, "_outputs", []))

    def get_output_mapping(self):
        return {}


class BinaryDistribution(Distribution):
    """The wheel carries compiled libraries: tag it for the platform, not as pure Python."""

    def has_ext_modules(self):
        return True


setup(distclass=BinaryDistribution, cmdclass={"build_ext": BuildKernels})
