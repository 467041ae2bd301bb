"""``scripts/flwr_run.sh`` and ``fl-unlearn``'s runner interrupted: whatever ends them, no SuperLink is left behind.

A stand-in ``flwr`` takes the real one's place on PATH (the real run is
``test_strategies.test_flwr_run_script_completes_and_stops_its_superlink``): ``flwr run`` starts a "SuperLink"
(a process in its own session listening on the script's HTTP API port, as the real one outlives ``flwr run``)
and streams log lines; ``flwr list`` says the run is still going. Then the script's caller goes away.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "flwr_run.sh"

FAKE_FLWR = textwrap.dedent("""\
    #!{python}
    import os, subprocess, sys, time
    if sys.argv[1] == "list":
        print('{{"runs": [{{"status": "running"}}]}}')
        sys.exit(0)
    listener = (
        "import os, socket, time\\n"
        "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\\n"
        "s.bind(('127.0.0.1', int(os.environ['FLWR_LOCAL_SUPERLINK_HTTP_API_PORT']))); s.listen()\\n"
        "open(os.environ['FAKE_READY'], 'w').write(str(os.getpid()))\\n"
        "time.sleep(600)\\n")
    subprocess.Popen([sys.executable, "-c", listener], start_new_session=True)
    while True:
        print("INFO: round", flush=True)
        time.sleep(0.05)
    """)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    """Running and not a zombie (an orphan's zombie waits for init to reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _default_signals() -> None:
    """In the script's process, before exec: the default disposition for the signals the tests send. A shell
    cannot trap a signal that was ignored when it started, and a suite launched under ``nohup`` (SIGHUP) or as a
    background job without job control (SIGINT) passes those on: the script would then be tested in a setting
    where nothing it does could catch them."""
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


@pytest.fixture
def started(tmp_path):
    """Start the script on the stand-in ``flwr``; yields (process, the SuperLink's pid, its port)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "flwr"
    fake.write_text(FAKE_FLWR.format(python=sys.executable))
    fake.chmod(0o755)
    port = _free_port()
    ready = tmp_path / "superlink.pid"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_READY": str(ready),
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port), "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
           "FLWR_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen(["bash", str(SCRIPT), str(tmp_path)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=_default_signals)
    deadline = time.monotonic() + 30
    while not (ready.exists() and ready.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists(), "the stand-in SuperLink did not start"
    assert proc.stdout is not None and "INFO: round" in proc.stdout.readline() + proc.stdout.readline()
    superlink = int(ready.read_text())
    yield proc, superlink, port
    if _alive(superlink):  # the test failed: still end what it started
        os.killpg(superlink, signal.SIGKILL)
    proc.kill()


def _assert_stopped(proc: subprocess.Popen, superlink: int, port: int, code: int) -> None:
    assert proc.wait(timeout=30) == code
    deadline = time.monotonic() + 10
    while _alive(superlink) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(superlink), "the SuperLink outlived the interrupted script"
    with socket.socket() as s:  # and its port is free again
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_stops_the_superlink_the_script_started(started, sig):
    proc, superlink, port = started
    proc.send_signal(sig)
    _assert_stopped(proc, superlink, port, 128 + sig)


def test_a_reader_gone_stops_the_superlink_the_script_started(started):
    """The caller died (``fl-unlearn`` killed): the next line the run streams finds no reader."""
    proc, superlink, port = started
    assert proc.stdout is not None
    proc.stdout.close()
    _assert_stopped(proc, superlink, port, 128 + signal.SIGPIPE)


RUNNER_CHILD = """\
trap 'echo stopped > "$MARKER"; exit 143' TERM
echo started
while true; do sleep 0.05; done
"""


def test_fl_unlearn_passes_sigterm_to_the_runner_and_waits_for_it(tmp_path):
    """``fl_unlearn.cli.run_subprocess`` killed with SIGTERM (a scheduler, ``timeout``): the runner gets SIGTERM
    too (``flwr_run.sh`` then stops its SuperLink), is waited for, and the launcher exits as interrupted."""
    marker, log = tmp_path / "marker", tmp_path / "run.log"
    code = (f"import sys; from pathlib import Path; from fl_unlearn.cli import run_subprocess\n"
            f"run_subprocess(['bash', '-c', {RUNNER_CHILD!r}], Path({str(log)!r}), stream=True)\n")
    launcher = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "MARKER": str(marker)},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert launcher.stdout is not None and launcher.stdout.readline().strip() == "started"
    launcher.send_signal(signal.SIGTERM)
    _, err = launcher.communicate(timeout=30)
    assert marker.read_text().strip() == "stopped", "the runner was not told to stop"
    assert "KeyboardInterrupt: signal 15" in err and "stopping the run" in err
    assert launcher.returncode != 0
