"""Test session setup: keep MindSpore's and MindFormers' files out of the working directory."""

import os
import tempfile

_SCRATCH = tempfile.mkdtemp(prefix="ms_xent_tests_")
os.environ.setdefault("LOG_MF_PATH", os.path.join(_SCRATCH, "mindformers_log"))
os.environ.setdefault("OM_MODULES_CACHE", os.path.join(_SCRATCH, "modules"))
# MindSpore writes rank_*/om/analyze_fail.ir for graphs that fail to compile (the bad-input
# tests do that on purpose) under MS_OM_PATH, or the working directory without it.
os.environ.setdefault("MS_OM_PATH", os.path.join(_SCRATCH, "om"))
