"""StopRequest (train/signals.py): the first signal is the one the run stops for, later ones (but a
second Ctrl-C) change nothing; a request without a signal outranks every signal; the handlers go
back to what they were; a second Ctrl-C a second later aborts at once."""

import os
import signal
import subprocess
import sys

from gptoss_titan.train.signals import METRICS_FAILED, StopRequest


def test_first_signal_wins_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGUSR1)
    stop = StopRequest("SIGUSR1", distributed=False)
    assert stop.agreed() == 0
    os.kill(os.getpid(), signal.SIGUSR1)
    os.kill(os.getpid(), signal.SIGTERM)  # handled: the process goes on
    assert stop.agreed() == signal.SIGUSR1
    stop.request(METRICS_FAILED)
    assert stop.agreed() == METRICS_FAILED
    stop.close()
    assert signal.getsignal(signal.SIGUSR1) == before


def test_a_second_ctrl_c_aborts_at_once():
    code = (
        "import os, signal, time\n"
        "from gptoss_titan.train.signals import StopRequest\n"
        "s = StopRequest('SIGUSR1', distributed=False)\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"  # within a second: the same Ctrl-C delivered twice
        "assert s.requested == signal.SIGINT\n"
        "time.sleep(1.2)\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "time.sleep(5)\n"
        "print('not aborted')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 128 + signal.SIGINT and "not aborted" not in r.stdout
    assert r.stderr.strip() == "error: aborted by a second Ctrl-C; nothing was saved"
