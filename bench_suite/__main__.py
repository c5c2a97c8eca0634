"""``python -m bench_suite``: the signal policy is in force from the first line (a Ctrl-C while the heavy
packages are still importing stops cleanly too, see :mod:`bench_suite.signals`)."""
import os
import sys

from bench_suite import signals

signals.install()
try:
    from bench_suite.cli import main
except KeyboardInterrupt:
    print(signals.stop_message(), file=sys.stderr, flush=True)
    # half-imported extension modules may not finalise cleanly: leave at once with the policy's status
    os._exit(signals.exit_code())

code = main()
if signals.received() is not None:  # stopped by a signal: no finalisation may turn the status into a signal death
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
