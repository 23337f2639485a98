"""The built wheel installs into a fresh virtualenv, needs no compiler there, and works."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SMOKE = """
import msgnet, msgnet._frame, msgnet._packet, msgnet._engine
async def main():
    async with msgnet.MessageHost() as a, msgnet.MessageHost() as b:
        b.set_message_handler("/echo/1", lambda m: m.reply(m.data))
        a.add_peer(b.addrs[0])
        assert await a.request(b.peer_id, "/echo/1", b"wheel", timeout=5) == b"wheel"
msgnet.run(main())
print("ok", msgnet.__version__)
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_wheel_installs_into_fresh_venv_and_runs(tmp_path: Path) -> None:
    if not (ROOT / "pyproject.toml").exists():
        pytest.fail("run the tests from a source checkout: pyproject.toml not found")
    dist = tmp_path / "dist"
    # Build as a user's pip does: in an isolated environment with the declared build deps.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist),
                    str(ROOT)], check=True)
    wheels = list(dist.glob("msgnet-*.whl"))
    assert len(wheels) == 1, wheels
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", str(wheels[0])], check=True)
    # Run from an empty folder so the source tree cannot shadow the installed package.
    result = subprocess.run([str(python), "-c", SMOKE], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok ")
    names = subprocess.run([str(python), "-m", "zipfile", "-l", str(wheels[0])],
                           capture_output=True, text=True, check=True).stdout
    assert "msgnet/py.typed" in names and "msgnet/_engine.pyi" in names
    files = [line.split()[0] for line in names.splitlines()[1:] if line.strip()]
    assert not [f for f in files if f.endswith((".c", ".h", ".pyx"))], files
    assert any(f.startswith("msgnet/_engine.") and f.endswith(".so") for f in files)
