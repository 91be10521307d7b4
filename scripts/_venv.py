"""The Python environment of the scripts in scripts/: one virtual environment, pinned, re-entered.

Every script starts with

    import _venv                      # scripts/ is on sys.path: scripts run as `python3 scripts/NAME.py`
    if __name__ == "__main__":
        _venv.bootstrap(__file__)

Outside the venv, `bootstrap()` creates third_party/venv-fixtures when missing, installs
scripts/requirements-fixtures.txt into it when the file changed (sha256 stamp in the venv), and
re-executes the script with the venv's python (same arguments; PYTHONHASHSEED=0 unless set). Inside the venv it
returns at once, after setting the Hugging Face offline/quiet environment variables (`hf_env=True`,
the default: nothing is downloaded from a hub, no progress bars; must happen before transformers or
diffusers are imported).

Only the standard library is used here: this module runs under any python3 before the venv exists.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV = REPO / "third_party" / "venv-fixtures"
REQS = REPO / "scripts" / "requirements-fixtures.txt"
VENV_PYTHON = VENV / "bin" / "python"

# Set inside the venv by bootstrap(hf_env=True); the children of a script inherit them.
HF_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "DIFFUSERS_VERBOSITY": "error",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}
HF_ENV_DEFAULTS = {  # only when not set already
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONWARNINGS": "ignore",
}


def in_venv() -> bool:
    return Path(sys.prefix).resolve() == VENV.resolve()


def bootstrap(script: str | os.PathLike, *, hf_env: bool = True) -> None:
    """Re-executes `script` inside the venv (creating/updating it first); returns only inside it."""
    if not in_venv():
        stamp = VENV / ".requirements.sha256"
        want = hashlib.sha256(REQS.read_bytes()).hexdigest()
        if not VENV_PYTHON.exists():
            print(f"[bootstrap] creating venv {VENV}", flush=True)
            subprocess.check_call([sys.executable, "-m", "venv", str(VENV)])
        if not stamp.exists() or stamp.read_text().strip() != want:
            print(f"[bootstrap] installing {REQS.name} into the venv (takes a few minutes)", flush=True)
            subprocess.check_call([str(VENV_PYTHON), "-m", "pip", "install", "--disable-pip-version-check", "-q",
                                   "-r", str(REQS)])
            stamp.write_text(want + "\n")
        env = dict(os.environ)
        env.setdefault("PYTHONHASHSEED", "0")
        os.execve(str(VENV_PYTHON), [str(VENV_PYTHON), str(Path(script).resolve()), *sys.argv[1:]], env)
    if hf_env:
        os.environ.update(HF_ENV)
        for k, v in HF_ENV_DEFAULTS.items():
            os.environ.setdefault(k, v)
