"""`python -m treeseg_qgis`: the command line.

Stop signals are handled before the heavy imports, so a stop during start-up is clean too.
"""

import sys

from . import interrupts

with interrupts.stop_signals_handled():
    try:
        with interrupts.deferred():  # an exception inside torch's import can abort the interpreter
            from .cli import main
        status = main()
    except interrupts.Interrupted as stop:
        print(f"treeseg: {stop} while starting; nothing was written.", file=sys.stderr)
        status = stop.exit_status
sys.exit(status)
