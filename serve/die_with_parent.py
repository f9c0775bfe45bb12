"""Runs a command that the kernel stops when the process that started it dies.

Usage: ``python -I -S die_with_parent.py PARENT_PID SIGNAL COMMAND [ARG ...]``

Why a separate process rather than ``preexec_fn``: ``PR_SET_PDEATHSIG`` fires when the *thread*
that forked the child exits, not the process, and ``preexec_fn`` runs Python between fork and
exec in a copy of a threaded process, which can deadlock on locks other threads held. Here the
wrapper is single-threaded, sets the signal, checks that the parent did not die before that
(then the signal would never come), and replaces itself with the command: the command keeps this
pid, so callers see the tritonserver pid. The caller starts it from a thread that lives exactly as
long as the child (see ``process.TritonProcess``).

Standard library only, and run with ``-S``: it must start in milliseconds and import nothing of
the environment it guards.
"""

import ctypes
import os
import sys

PR_SET_PDEATHSIG = 1
EXIT_PARENT_GONE = 125  # the parent died before the signal was armed: run nothing


def main() -> None:
    parent_pid, signum, command = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
        sys.exit(f"die_with_parent: prctl(PR_SET_PDEATHSIG) failed: {os.strerror(ctypes.get_errno())}")
    if os.getppid() != parent_pid:
        sys.exit(EXIT_PARENT_GONE)
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
