"""Importing ms_xent.mindformers is quiet: MindFormers' and MindSpore's import-time WARNINGs go to
the log, not the console (a fresh interpreter, as a user's script starts)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_import_prints_nothing_and_logs_the_import_warnings(tmp_path):
    log_dir = tmp_path / "log"
    script = (
        "import ms_xent.mindformers\n"
        "from mindformers.tools.logger import logger\n"
        "logger.warning('a record after the import')\n")
    env = {key: value for key, value in os.environ.items() if key != "GLOG_v"}
    env.update(PYTHONPATH=str(REPO_ROOT), LOG_MF_PATH=str(log_dir),
               OM_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr == ""
    # Only the record logged after the import reaches the console, under the name "mindformers"
    # (MindFormers' own logger name has the log directory glued to it).
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and "a record after the import" in lines[0], result.stdout
    assert " - mindformers[<string>:3] - WARNING - " in lines[0]
    assert str(log_dir) not in lines[0]
    if importlib.util.find_spec("hyper_parallel") is None:
        # MindFormers 1.9 warns on import that its PyNative models need hyper_parallel.
        import_log = (log_dir / "import_console.log").read_text(encoding="utf-8")
        assert "hyper_parallel" in import_log
