"""`python -m treeseg_qgis`: the command line.

Stop signals are handled from before the heavy imports (a stop during start-up is
clean too) and ignored once the command is done and the interpreter shuts down.
"""

import sys

from . import interrupts

interrupts.handle_stop_signals()
try:
    with interrupts.deferred():  # an exception inside torch's import can abort the interpreter
        from .cli import main
    status = main()
except interrupts.Interrupted as stop:
    print(f"treeseg: {stop} while starting; nothing was written.", file=sys.stderr)
    status = stop.exit_status
interrupts.ignore_stop_signals()
sys.exit(status)
