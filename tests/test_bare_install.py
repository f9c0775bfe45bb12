"""``pip install .`` with no extras is the client: it must work without torch or transformers."""

from __future__ import annotations

import subprocess
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # pip installs the package into a fresh venv
@pytest.mark.timeout(600)
def test_bare_install_is_a_working_torch_free_client(tmp_path):
    venv.EnvBuilder(with_pip=True).create(tmp_path / "env")
    python = str(tmp_path / "env" / "bin" / "python")
    install = subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(ROOT)],
        capture_output=True, text=True, timeout=540,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    probe = (
        "import importlib.util, sys\n"
        "import filterserve.client, filterserve.client.cli, filterserve.cli\n"
        "from filterserve.client import FilterClient\n"
        "assert importlib.util.find_spec('torch') is None, 'torch was installed'\n"
        "assert 'transformers' not in sys.modules\n"
        "print('ok')\n"
    )
    # Outside the checkout: `python -c` puts the working directory first on sys.path, and the
    # source tree's filterserve/ folder would shadow the installed package.
    check = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert check.stdout.strip() == "ok", check.stderr
    cli = str(tmp_path / "env" / "bin" / "filterserve")
    usage = subprocess.run([cli, "score", "--help"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert usage.returncode == 0 and "--url" in usage.stdout
    export = subprocess.run(
        [cli, "export", "--base", "b", "--adapter", str(tmp_path), "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert export.returncode == 2
    assert "pip install 'filterserve[all]'" in export.stderr and "Traceback" not in export.stderr
