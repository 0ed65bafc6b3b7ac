"""How the doctor ends early: where a check fails or a rank is lost, a Verdict is raised, and runner/doctor.py
says its line (if any) and exits with its code. A lost rank exits with EXIT_LOST_RANK (runner/errors.py)."""

EXIT_CHECK_FAILED = 1


class Verdict(Exception):
    """How the doctor ends when it ends early: the exit code and the one error line (None: say nothing)."""

    def __init__(self, code: int, line: str | None):
        super().__init__(line)
        self.code, self.line = code, line
