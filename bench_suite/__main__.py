"""``python -m bench_suite``: the signal policy is in force from the first line (a Ctrl-C while the heavy
packages are still importing stops cleanly too, see :mod:`bench_suite.signals`)."""
import sys

from bench_suite import signals

signals.install()
try:
    from bench_suite.cli import main
except KeyboardInterrupt:
    print(signals.stop_message(), file=sys.stderr)
    sys.exit(signals.exit_code())

sys.exit(main())
