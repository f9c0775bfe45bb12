"""What tritonserver needs before it starts: the binary, its environment, a backend directory,
and the repository's model configs.

The nvidia-pytriton wheel ships the server and the Python backend but no ONNX Runtime backend and
no stub on the backend path; :func:`prepare_backends` assembles a backend directory so the
repository the export writes for NVIDIA's container loads here unchanged.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from filterserve import contract
from filterserve.errors import FilterServeError
from filterserve.manifest import read_text

PYTHON_STUB = "triton_python_backend_stub"


def pytriton_dir() -> Path:
    try:
        import pytriton
    except ImportError:
        raise FilterServeError("nvidia-pytriton is not installed: pip install 'filterserve[serve]'") from None
    return Path(pytriton.__file__).resolve().parent


def tritonserver_binary() -> Path:
    return pytriton_dir() / "tritonserver" / "bin" / "tritonserver"


# Python-backend stand-ins for Triton's C++ tensor backends, one backend folder each.
STAND_IN_BACKENDS = ("onnxruntime", "openvino")


def _stand_in_backend(name: str) -> Path:
    """The stand-ins live in the model_repository.runtime package; resolved through it so installs work."""
    import filterserve.model_repository.runtime

    return Path(filterserve.model_repository.runtime.__file__).resolve().parent / "backends" / name / "model.py"


def server_env() -> dict[str, str]:
    """The server's environment: bundled libraries, and this interpreter's ``python3`` first.

    The Python backend stub ignores PYTHONPATH and imports from whichever ``python3`` is first on
    PATH, so this puts the running interpreter there to give the models its packages.
    """
    env = dict(os.environ)
    libs = str(pytriton_dir().parent / "nvidia_pytriton.libs")
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [libs, env.get("LD_LIBRARY_PATH")]))
    env["PATH"] = os.pathsep.join(filter(None, [str(Path(sys.executable).parent), env.get("PATH")]))
    return env


def _check_stub_libraries(stub: Path, env: dict[str, str]) -> None:
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    if shutil.which("ldd") is None:
        return  # nothing to ask; the server log names a missing library anyway
    out = subprocess.run(["ldd", str(stub)], env=env, capture_output=True, text=True).stdout
    missing = [line.split()[0] for line in out.splitlines() if "not found" in line]
    if any(name.startswith("libpython") for name in missing):
        raise FilterServeError(
            f"the Python backend stub needs libpython{version}.so.1.0, which is not installed: "
            f"install the Debian/Ubuntu package libpython{version} (apt-get install libpython{version})"
        )
    if missing:
        raise FilterServeError(f"the Python backend stub {stub} cannot find {', '.join(missing)}")


def prepare_backends(dest: Path, env: dict[str, str]) -> Path:
    """Fill ``dest`` with ``python/`` (backend + stub for this interpreter) and the ``onnxruntime`` and ``openvino`` stand-ins."""
    root = pytriton_dir()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "tritonserver" / "python_backend_stubs" / version / PYTHON_STUB
    if not stub.is_file():
        raise FilterServeError(f"nvidia-pytriton ships no Python backend stub for Python {version} (see {stub.parent.parent})")
    _check_stub_libraries(stub, env)
    python_dir = dest / "python"
    shutil.copytree(
        root / "tritonserver" / "backends" / "python",
        python_dir,
        ignore=shutil.ignore_patterns("__pycache__"),
        dirs_exist_ok=True,
    )
    shutil.copy2(stub, python_dir / PYTHON_STUB)
    for name in STAND_IN_BACKENDS:
        (dest / name).mkdir(exist_ok=True)
        shutil.copy2(_stand_in_backend(name), dest / name / "model.py")
    return dest


def read_model_config(config_file: Path) -> mc.ModelConfig:
    """One ``config.pbtxt``; a file Triton would refuse is one line naming it, not protobuf's traceback."""
    text = read_text(config_file, "Triton model config")
    try:
        return text_format.Parse(text, mc.ModelConfig())
    except text_format.ParseError as exc:
        raise FilterServeError(f"Triton model config {config_file} is not valid: {exc}") from None


def read_configs(repo: Path) -> dict[str, mc.ModelConfig]:
    """Model name → parsed config for every model folder; files at the root (the filters' records) are skipped."""
    configs = {}
    for config_file in sorted(repo.glob("*/config.pbtxt")):
        config = read_model_config(config_file)
        configs[config.name or config_file.parent.name] = config
    return configs


def filter_ensembles(configs: dict[str, mc.ModelConfig]) -> list[str]:
    """Ensembles that take a TEXT input: the filters, and the ones a text probe can exercise."""
    return [
        name
        for name, config in configs.items()
        if config.platform == "ensemble" and any(i.name == contract.TEXT for i in config.input)
    ]


def ensemble_steps(config: mc.ModelConfig) -> list[str]:
    """The composing models of an ensemble, in step order, as its config names them."""
    return [step.model_name for step in config.ensemble_scheduling.step]
