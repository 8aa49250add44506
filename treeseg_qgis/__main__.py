"""`python -m treeseg_qgis`: the command line.

Stop signals are handled from before the heavy imports (a stop during start-up is
clean too) and ignored once the command is done. The process then exits without
tearing the interpreter down (`interrupts.exit_now`). An address-space limit too low
for the libraries is refused before they load.
"""

import sys

from .engine import interrupts

interrupts.handle_stop_signals()
if len(sys.argv) > 1 and sys.argv[1] in ("segment", "teach"):
    from .memory import address_space_problem

    problem = address_space_problem(None)  # before numpy, OpenBLAS and torch load under a limit too low for them
    if problem is not None:
        print(f"treeseg: error: {problem}", file=sys.stderr)
        sys.exit(2)
try:
    with interrupts.deferred():  # an exception inside torch's import can abort the interpreter
        from .engine.cli import main
    status = main()
except interrupts.Interrupted as stop:
    print(f"treeseg: {stop} while starting; nothing was written.", file=sys.stderr)
    status = stop.exit_status
interrupts.ignore_stop_signals()
interrupts.exit_now(status)
