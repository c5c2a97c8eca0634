"""``python -m bench_suite``: the signal policy is in force from the first line (a Ctrl-C while the heavy
packages are still importing is recorded and stops the command cleanly once they are imported, see
:mod:`bench_suite.signals`)."""
import os
import sys

from bench_suite import signals

signals.install(defer=True)  # while torch, timm and Lightning import: record a signal, raise nothing
try:
    from bench_suite.cli import main
except KeyboardInterrupt:  # Python's own SIGINT handler, if a package restored it: the policy's 130
    stopped = True
else:
    stopped = signals.received() is not None
if stopped:
    print(signals.stop_message(), file=sys.stderr, flush=True)
    # leave at once with the policy's status (no finalisation of the freshly imported extension modules)
    os._exit(signals.exit_code())
signals.install()

code = main()
if signals.received() is not None:  # stopped by a signal: no finalisation may turn the status into a signal death
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
