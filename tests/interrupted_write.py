"""Run one tdvmcall command whose N-th file write is cut halfway by a real Ctrl-C, as a user's
Ctrl-C lands while a report is being written: ``python tests/interrupted_write.py N ARGS...``.

The first N-1 writes (``Path.write_text`` / ``write_bytes``) are whole; the N-th writes half of its
data, then the process sends itself SIGINT and waits, so the signal is handled by the command's own
``console.run_app`` in the middle of that write.  A command whose outputs did not go through those
calls is not interrupted at all, and a test that expects the interrupt (exit 130) fails.  Used by
the tests of issue 18's "no partial output under a final name" (test_scan.py, test_export_c.py,
test_kernel_series.py, test_check_html.py) through :func:`interrupted`; not a test module itself."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any


def _cut(nth: int, original: Callable[..., Any], seen: list[int]) -> Callable[..., Any]:
    def write(self: pathlib.Path, data: Any, *args: Any, **kwargs: Any) -> Any:
        seen[0] += 1
        if seen[0] != nth:
            return original(self, data, *args, **kwargs)
        original(self, data[: len(data) // 2], *args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(30)  # the interrupt is raised here
        raise AssertionError("the interrupt never came")

    return write


def interrupted(nth: int, *args: str) -> None:
    """Run ``tdvmcall ARGS`` with its ``nth`` write cut by a Ctrl-C, and check that it ended as an
    interrupt must (docs/cli.md): exit 130, its last line ``tdvmcall: interrupted``, no traceback."""
    r = subprocess.run([sys.executable, __file__, str(nth), *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 130, r.stderr
    assert r.stderr.splitlines()[-1] == "tdvmcall: interrupted" and "Traceback" not in r.stderr


def main() -> None:
    from tdvmcall import cli

    nth, seen = int(sys.argv[1]), [0]
    pathlib.Path.write_text = _cut(nth, pathlib.Path.write_text, seen)  # type: ignore[method-assign]
    pathlib.Path.write_bytes = _cut(nth, pathlib.Path.write_bytes, seen)  # type: ignore[method-assign]
    cli.main(sys.argv[2:])


if __name__ == "__main__":
    main()
