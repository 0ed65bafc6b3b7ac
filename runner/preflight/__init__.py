"""Preflight: the parts of `runner doctor` (runner/doctor.py, which tells the story: flags, join, benchmark).

- launch.py: who this process is (its rank layout from the launcher's variables) and the report it sends
- watchdog.py: ends a process whose phase (joining, one collective) outlasts --timeout
- verdict.py: how the doctor ends early (exit code and one error line)
- checkin.py: joining the ranks on a TCP store, rank 0 collecting the reports and answering with its verdict
- checks.py: the consistency checks over all ranks' reports
- summary.py: the table of all ranks and the checks that rank 0 prints
- collectives.py: the all-reduce and barrier benchmark

Nothing is imported here, and torch only inside the functions that use it: `--help` and bad flags are
answered without it.
"""
