"""Interrupts, kills and worker processes, on real processes (issue 18, items 2, 4, 5, 6, 17, 20).

The contract (docs/cli.md): Ctrl-C gives one line ``tdvmcall: interrupted`` and exit 130, SIGTERM
``tdvmcall: terminated`` and exit 143; no traceback; the worker processes of ``fuzz --mode fast``
and ``sweep`` end with their parent, even when it is killed; nothing partial stays under a final
name.  Each test starts the command in a session of its own (so that its process group is exactly
the command and its workers), sends the signal once the command is working (Ctrl-C goes to the
whole group, as a terminal sends it; SIGTERM to the parent alone, as a CI timeout sends it), then
checks the exit status, stderr and that no process of the group is left.  Time bounds are generous
timeouts against a hang, never speed assertions."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and process groups")

ENV = {**os.environ, "COLUMNS": "80", "PYTHONIOENCODING": "utf-8", "NO_COLOR": "1"}
#: a generous bound for anything that must end (a hang is what is tested, not speed)
HANG = 60.0


def start(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tdvmcall", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env or ENV,
        cwd=cwd,
        start_new_session=True,  # its own process group: the command and its workers
    )


def group(pgid: int) -> set[int]:
    """The live (not zombie) processes of a process group, from /proc."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after the command name, which may hold blanks
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state != "Z":
            found.add(int(entry.name))
    return found


def wait_for(predicate, timeout: float = HANG) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def read_until(proc: subprocess.Popen, needle: bytes, timeout: float = HANG) -> bytes:
    """stderr up to (and including) the first line holding ``needle``."""
    got = b""
    fd = proc.stderr.fileno()
    end = time.monotonic() + timeout
    while needle not in got and time.monotonic() < end:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            got += chunk
    assert needle in got, got.decode(errors="replace")
    return got


def end_with(
    proc: subprocess.Popen, sig: int, whole_group: bool, pid: int | None = None
) -> tuple[int, str, str, set[int]]:
    """Send ``sig`` (to the group, as a terminal sends Ctrl-C, or to the parent alone, or to the
    process ``pid`` of the group), wait for the parent; returns its status, stdout, stderr and the
    processes of its group still alive after a generous wait.  Whatever is left is killed, so a
    failing test leaves nothing behind."""
    if whole_group:
        os.killpg(proc.pid, sig)
    else:
        os.kill(proc.pid if pid is None else pid, sig)
    try:
        out, err = proc.communicate(timeout=HANG)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the command did not end within {HANG} s of the signal: {err.decode(errors='replace')}")
    finally:
        wait_for(lambda: not group(proc.pid), 10.0)
        left = group(proc.pid)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"), left


def assert_clean_end(status: int, err: str, left: set[int], expected: int, line: str) -> None:
    assert status == expected, err
    assert err.splitlines()[-1] == line, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert left == set(), f"processes left behind: {left}"


def fast_fuzz(tmp_path: Path) -> subprocess.Popen:
    proc = start(
        "fuzz",
        "--mode",
        "fast",
        "--workers",
        "2",
        "--seconds",
        "120",
        "--seed",
        "1",
        "--out",
        str(tmp_path / "ce.json"),
    )
    read_until(proc, b"mode fast")  # options checked, the campaign starting
    # working: the workers are forked (with one CPU available the campaign runs in the parent)
    wait_for(lambda: len(group(proc.pid)) >= min(2, len(os.sched_getaffinity(0))) + 1, 20.0)
    time.sleep(0.5)
    return proc


# --- Ctrl-C (items 2 and 4, and every command) ---------------------------------------------------------
def test_ctrl_c_ends_fast_fuzz_and_its_workers(tmp_path):
    # Ctrl-C reached the workers as well, which could die holding the pool's queue: the parent then
    # waited for them forever (4 tries in 12); and nothing said the run was interrupted
    for _ in range(3):
        status, _, err, left = end_with(fast_fuzz(tmp_path), signal.SIGINT, whole_group=True)
        assert_clean_end(status, err, left, 130, "tdvmcall: interrupted")
    assert not list(tmp_path.iterdir())  # no counterexample, nothing partial


def test_ctrl_c_ends_hypothesis_fuzz(tmp_path):
    # a Ctrl-C landing in hypothesis's garbage-collector callback was swallowed ("Exception ignored
    # in: gc_callback") and the campaign ran on
    proc = start("fuzz", "--seconds", "120", "--seed", "1", "--out", str(tmp_path / "ce.json"))
    read_until(proc, b"examples")  # the first batch is done
    status, _, err, left = end_with(proc, signal.SIGINT, whole_group=True)
    assert_clean_end(status, err, left, 130, "tdvmcall: interrupted")


@pytest.mark.parametrize(
    "args",
    [["run", "-"], ["check", "--catalog", "-"], ["sweep", "--exhaustive", "--jobs", "1"]],
    ids=["run", "check", "sweep"],
)
def test_ctrl_c_in_any_command_is_one_line_and_130(args):
    # every command: typer turned Ctrl-C into exit 130 and said nothing
    proc = subprocess.Popen(
        [sys.executable, "-m", "tdvmcall", *args],
        stdin=subprocess.PIPE,  # held open: run and check wait on it
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
        start_new_session=True,
    )
    time.sleep(2.0)  # started, and reading its input or sweeping
    status, _, err, left = end_with(proc, signal.SIGINT, whole_group=True)
    proc.stdin.close()
    assert_clean_end(status, err, left, 130, "tdvmcall: interrupted")


# --- SIGTERM and a killed parent (item 5) ----------------------------------------------------------------
def test_sigterm_to_fast_fuzz_ends_its_workers(tmp_path):
    # SIGTERM (what a CI timeout sends) killed the parent alone; its workers waited on the pool's
    # queue forever
    status, _, err, left = end_with(fast_fuzz(tmp_path), signal.SIGTERM, whole_group=False)
    assert_clean_end(status, err, left, 143, "tdvmcall: terminated")


def test_sigterm_to_exhaustive_sweep_ends_its_workers():
    proc = start("sweep", "--exhaustive", "--jobs", "2")
    wait_for(lambda: len(group(proc.pid)) >= min(2, len(os.sched_getaffinity(0))) + 1, 20.0)
    time.sleep(1.0)
    status, out, err, left = end_with(proc, signal.SIGTERM, whole_group=False)
    assert_clean_end(status, err, left, 143, "tdvmcall: terminated")
    assert out == ""  # no verdict for a sweep that did not finish


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one CPU: --workers 2 runs one worker, in the parent")
def test_workers_die_with_a_killed_parent(tmp_path):
    # SIGKILL cannot be caught: the workers ask the kernel for a SIGKILL of their own when the
    # parent dies (prctl PR_SET_PDEATHSIG)
    proc = fast_fuzz(tmp_path)
    workers = group(proc.pid) - {proc.pid}
    assert workers
    status, _, _, left = end_with(proc, signal.SIGKILL, whole_group=False)
    assert status == -signal.SIGKILL
    assert left == set()


# --- a worker that dies on its own ------------------------------------------------------------------------
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one CPU: --workers 2 runs one worker, in the parent")
@pytest.mark.parametrize("command", ["fuzz", "sweep"])
def test_a_worker_killed_on_its_own_is_one_line_and_exit_2(command, tmp_path):
    # the out-of-memory killer's SIGKILL to one worker ended the command with a BrokenProcessPool
    # traceback and exit 1, which CI reads as a finding
    if command == "fuzz":
        proc, option = fast_fuzz(tmp_path), "--workers"
    else:
        proc, option = start("sweep", "--exhaustive", "--jobs", "2"), "--jobs"
        wait_for(lambda: len(group(proc.pid)) >= 3, 20.0)
        time.sleep(1.0)
    workers = sorted(group(proc.pid) - {proc.pid})
    assert len(workers) == 2
    status, out, err, left = end_with(proc, signal.SIGKILL, whole_group=False, pid=workers[0])
    assert_clean_end(
        status,
        err,
        left,
        2,
        "tdvmcall: error: a worker process died (signal 9, SIGKILL, which the out-of-memory killer sends); "
        f"the run is incomplete, so there is no verdict: run it again (with fewer {option} if memory was short)",
    )
    assert out == ""  # no verdict for a run that did not finish
    assert not list(tmp_path.iterdir())  # no counterexample


# --- the mechanism, on a command made for it --------------------------------------------------------------
SCRIPT = """
import gc, os, signal, sys, time
import typer
from tdvmcall import console

app = typer.Typer()

@app.command()
def main(kind: str, path: str) -> None:
    if kind == "swallowed":
        # the interrupt lands in a __del__, where Python only prints "Exception ignored"
        class Late:
            def __del__(self):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.2)
        Late()
        gc.collect()
        sys.stderr.write("ran on\\n")
        while True:
            console.check_interrupt()
            time.sleep(0.01)
    if kind == "masked":
        # the interrupt turns into another error on its way out (as hypothesis's engine, or
        # compiled code returning with the exception set, did)
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        except KeyboardInterrupt:
            raise SystemError("returned a result with an exception set")
    if kind == "stuck":
        # a command that swallows KeyboardInterrupt itself and never ends
        with console.output_file(path + ".out") as tmp:
            tmp.write_text("half")
            while True:
                try:
                    time.sleep(60)
                except KeyboardInterrupt:
                    pass

sys.exit(console.run_app(app, sys.argv[1:]))
"""


def run_script(tmp_path: Path, kind: str) -> subprocess.Popen:
    script = tmp_path / "cmd.py"
    script.write_text(textwrap.dedent(SCRIPT))
    return subprocess.Popen(
        [sys.executable, str(script), kind, str(tmp_path / "result")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
        start_new_session=True,
    )


def test_an_interrupt_swallowed_by_the_interpreter_is_raised_again(tmp_path):
    proc = run_script(tmp_path, "swallowed")
    _, err = proc.communicate(timeout=HANG)
    text = err.decode()
    assert proc.returncode == 130, text
    assert "ran on" in text  # it was swallowed, silently, ...
    assert text.splitlines()[-1] == "tdvmcall: interrupted"  # ... and raised at the next check
    assert "Exception ignored" not in text and "Traceback" not in text


def test_an_interrupt_that_surfaces_as_another_error_is_still_an_interrupt(tmp_path):
    # hypothesis: "assert state._runner is not None" failed when Ctrl-C came early in its engine
    proc = run_script(tmp_path, "masked")
    _, err = proc.communicate(timeout=HANG)
    text = err.decode()
    assert proc.returncode == 130, text
    assert text == "tdvmcall: interrupted\n"


def test_a_command_stuck_after_ctrl_c_is_ended_with_its_partial_file(tmp_path):
    proc = run_script(tmp_path, "stuck")
    wait_for(lambda: any(p.name.endswith(".partial") for p in tmp_path.iterdir()), 20.0)
    status, _, err, left = end_with(proc, signal.SIGINT, whole_group=True)
    assert_clean_end(status, err, left, 130, "tdvmcall: interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cmd.py"]  # no result, nothing partial


# --- partial files -----------------------------------------------------------------------------------------
def test_output_file_holds_the_final_name_until_complete(tmp_path):
    from tdvmcall.console import output_file

    final = tmp_path / "ce.json"
    final.write_text("the old one\n")
    with pytest.raises(KeyboardInterrupt), output_file(final) as tmp:
        tmp.write_text("half of a new")
        assert tmp.parent == final.parent and tmp != final
        raise KeyboardInterrupt
    assert final.read_text() == "the old one\n"  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ce.json"]  # nothing partial
    with output_file(final) as one, output_file(final) as two:
        assert one != two  # two runs writing one name never share a temporary file
        one.write_text("one\n")
        two.write_text("two\n")
    assert final.read_text() == "one\n"  # the block that completes last renames last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ce.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert final.stat().st_mode & 0o777 == 0o666 & ~umask  # as a plain open() makes it


# --- how many workers (item 6) -----------------------------------------------------------------------------
@pytest.mark.parametrize("asked", [str(2**64 - 1), "64"])
def test_fuzz_workers_are_capped_as_sweep_jobs(asked, tmp_path):
    # 2**64 was an OverflowError traceback (2**64 - 1 as well: the largest number the grammar takes);
    # 100000 forked thousands of processes (64 here: a regression must not fork thousands here)
    r = subprocess.run(
        [sys.executable, "-m", "tdvmcall", "fuzz", "--mode", "fast", "--workers", asked]
        + ["--examples", "1000", "--seed", "0", "--json", "--out", str(tmp_path / "ce.json")],
        capture_output=True,
        env=ENV,
        timeout=HANG * 4,
    )
    assert r.returncode == 0, r.stderr.decode()
    cap = min(len(os.sched_getaffinity(0)), 5)  # one per CPU available, one per batch of 200
    assert json.loads(r.stdout)["workers"] == cap
    assert r.stderr.decode().splitlines()[0] == (
        f"tdvmcall: --workers {asked} lowered to {cap} "
        "(at most one per CPU available, and no more than there is work for)"
    )


def test_sweep_jobs_say_the_same():
    r = subprocess.run(
        [sys.executable, "-m", "tdvmcall", "sweep", "--call", "Instruction.HLT", "--jobs", "100000", "--json"],
        capture_output=True,
        env=ENV,
        timeout=HANG,
    )
    assert r.returncode == 0, r.stderr.decode()
    assert r.stderr.decode() == (
        "tdvmcall: --jobs 100000 lowered to 1 (at most one per CPU available, and no more than there is work for)\n"
    )


# --- screens (items 17 and 20) -----------------------------------------------------------------------------
def test_fuzz_progress_is_never_wrapped(tmp_path):
    # at 80 columns (and in a log) the progress line was cut in two
    r = subprocess.run(
        [sys.executable, "-m", "tdvmcall", "fuzz", "--examples", "200", "--seed", "3"]
        + ["--out", str(tmp_path / "ce.json")],
        capture_output=True,
        env={**ENV, "COLUMNS": "40"},
        timeout=HANG * 4,
    )
    assert r.returncode == 0, r.stderr.decode()
    lines = r.stderr.decode().splitlines()
    assert len(lines) == 3 and all(line.startswith("fuzz: ") for line in lines), lines
    assert "200 examples" in lines[-1]


def test_fuzz_and_sweep_answer_first(tmp_path):
    fuzz = subprocess.run(
        [sys.executable, "-m", "tdvmcall", "fuzz", "--examples", "20", "--seed", "0"]
        + ["--out", str(tmp_path / "ce.json")],
        capture_output=True,
        env=ENV,
        timeout=HANG * 4,
    )
    assert fuzz.returncode == 0
    assert fuzz.stdout.decode().splitlines()[0].startswith("clean: every property held on every execution (")
    sweep = subprocess.run(
        [sys.executable, "-m", "tdvmcall", "sweep", "--call", "Instruction.HLT", "--jobs", "1"],
        capture_output=True,
        env=ENV,
        timeout=HANG,
    )
    assert sweep.returncode == 0
    text = sweep.stdout.decode()
    assert text.splitlines()[0].startswith("simulation and leaf table agree for every call and case: 1 call x case, ")
    # the words of the table's headers are explained on the screen
    assert "legacy silent-ok: masks today's KVM handles silently correctly" in text
    assert "up-set (sim): yes when the masks hardened KVM completes are exactly" in text


# --- vectors export: never part of a corpus, never a user's file (item 15) ------------------------------
def _export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tdvmcall", "vectors", "export", *args], capture_output=True, env=ENV, timeout=HANG * 4
    )


def test_vectors_export_force_never_deletes_a_file_not_of_the_corpus(tmp_path):
    d = tmp_path / "corpus"
    assert _export(str(d)).returncode == 0
    mine = d / "vectors" / "mine.json"
    mine.write_text("my own vector\n")
    before = sorted(p.name for p in (d / "vectors").iterdir())
    r = _export(str(d), "--force")
    assert r.returncode == 2
    assert r.stderr.decode() == (
        f"tdvmcall: error: {d}: holds {mine}, which is not part of the corpus; replacing the corpus would "
        "delete it: move it away, or choose another directory\n"
    )
    assert mine.read_text() == "my own vector\n"
    assert sorted(p.name for p in (d / "vectors").iterdir()) == before  # nothing of the old corpus went


def test_vectors_export_replaces_what_an_interrupted_export_left(tmp_path):
    # an older export cut short left vectors/ without index.json: "not a corpus", and --force refused
    d = tmp_path / "corpus"
    assert _export(str(d)).returncode == 0
    (d / "index.json").unlink()
    r = _export(str(d))
    assert r.returncode == 2 and "an incomplete corpus (no index.json: an interrupted export)" in r.stderr.decode()
    assert _export(str(d), "--force").returncode == 0
    verify = subprocess.run(
        [sys.executable, "-m", "tdvmcall", "vectors", "verify", str(d)], capture_output=True, env=ENV, timeout=HANG * 4
    )
    assert verify.returncode == 0, verify.stdout.decode()


def test_ctrl_c_during_vectors_export_leaves_the_old_corpus_or_nothing(tmp_path):
    fresh, old = tmp_path / "fresh", tmp_path / "old"
    assert _export(str(old)).returncode == 0
    index = (old / "index.json").read_bytes()
    for d, extra in ((fresh, ()), (old, ("--force",))):
        proc = start("vectors", "export", str(d), *extra)
        # interrupted while it writes: its temporary directory exists
        assert wait_for(lambda d=d: any(p.name.startswith(f".{d.name}.") for p in tmp_path.iterdir()), HANG)
        status, _, err, left = end_with(proc, signal.SIGINT, whole_group=True)
        assert_clean_end(status, err, left, 130, "tdvmcall: interrupted")
    assert not fresh.exists()  # nothing under the name
    assert (old / "index.json").read_bytes() == index  # the old corpus, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]  # nothing partial
