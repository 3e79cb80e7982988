"""The `specmoe` command line: `main.py` dispatches to one module per command (estimate, plan, run,
presets, calibrate, profile-acceptance, report, demo); only the commands that run the engine import it."""
