"""Running ``smarter`` the way a user does: the installed console command, in a folder of its own with the
repository's ``configs/`` beside it, so that the README's commands run as written there. The CPU suite's
user-path tests and the GPU recipe matrix both run their commands through it.

Every command line run is recorded in ``EXECUTED``, so a test can check that each command the README shows
was run.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# every command line run, as typed in its folder
EXECUTED: list[str] = []


def smarter_executable() -> str:
    """The installed ``smarter`` console script of this interpreter's environment (``pip install -e .``)."""
    script = Path(sys.executable).with_name("smarter")
    if script.is_file():
        return str(script)
    found = shutil.which("smarter")
    if found is None:
        raise RuntimeError("the `smarter` command is not installed: run `pip install -e '.[dev]'` first")
    return found


def make_user_folder(folder: Path) -> Path:
    """A folder laid out like the repository's root for a user: ``configs/`` and ``tests/`` (which holds the
    README's subclassing example) and ``docs/`` (the README's own-text example) point at the repository's own."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("configs", "tests", "docs"):
        link = folder / name
        if not link.exists():
            link.symlink_to(REPO_ROOT / name, target_is_directory=True)
    return folder


@dataclass
class Job:
    """One command to run.

    Args:
        name: What the tests call it.
        command: The command line as a user types it (``VAR=value`` in front allowed), or a function that
            gives it when the job starts (for a file an earlier job wrote).
        cwd: The folder it runs in.
        stop_when: A glob (under ``cwd``) whose first match makes the job get SIGTERM, once.
        timeout: Seconds before it is killed (and fails).
        after: The jobs that must have ended before it starts.
    """

    name: str
    command: str | Callable[[], str]
    cwd: Path
    stop_when: str | None = None
    timeout: float = 900.0
    after: tuple[str, ...] = ()


@dataclass
class Ran:
    """What a job did."""

    job: Job
    command: str
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    signalled: bool = False
    notes: list[str] = field(default_factory=list)

    def check(self, *codes: int) -> Ran:
        """Itself, when it exited with one of ``codes`` (0 by default); else an assertion naming its output."""
        expected = codes or (0,)
        assert self.returncode in expected, (
            f"`{self.command}` exited {self.returncode} (expected {expected}):\n{self.stderr[-4000:]}"
        )
        return self


def _argv_and_env(command: str, threads: int | None) -> tuple[list[str], dict[str, str]]:
    words = shlex.split(command)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    while words and "=" in words[0] and words[0].split("=", 1)[0].isidentifier():
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    if words[0] == "smarter":
        words[0] = smarter_executable()
    elif words[0] in ("python", "python3"):
        words[0] = sys.executable  # the environment smarter is installed in
    return words, env


def run_job(job: Job, threads: int | None = None) -> Ran:
    """Run one job to its end (sending SIGTERM when its ``stop_when`` file appears).

    Args:
        job: What to run.
        threads: CPU threads for its torch (unset: torch's default, every core).
    """
    command = job.command() if callable(job.command) else job.command
    argv, env = _argv_and_env(command, threads)
    EXECUTED.append(command)
    start = time.perf_counter()
    signalled = False
    with subprocess.Popen(
        argv, cwd=job.cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        output: dict[str, str] = {}
        readers = [
            threading.Thread(target=lambda s=stream, k=key: output.__setitem__(k, s.read()))
            for key, stream in (("stdout", process.stdout), ("stderr", process.stderr))
        ]
        for reader in readers:
            reader.start()
        while process.poll() is None:
            if time.perf_counter() - start > job.timeout:
                process.kill()
                break
            if job.stop_when and not signalled and any(job.cwd.glob(job.stop_when)):
                process.send_signal(signal.SIGTERM)
                signalled = True
            time.sleep(0.05)
        for reader in readers:
            reader.join()
    seconds = time.perf_counter() - start
    return Ran(job, command, process.returncode, output["stdout"], output["stderr"], seconds, signalled)


def run_jobs(
    jobs: list[Job], parallel: int = 1, threads: int | None = None, log: Callable[[str], None] | None = None
) -> dict[str, Ran]:
    """Run ``jobs``, ``parallel`` at a time, each as soon as the jobs it comes ``after`` have ended (in the
    order given among those ready); their results by name.

    On a 2-core CPU, two processes of one thread each ran a tiny fit in 16 s each, two of two threads each
    in 35 s each (one alone: 23 s): run CPU jobs in parallel with ``threads=1``.
    """
    results: dict[str, Ran] = {}
    pending = list(jobs)
    unknown = {name for job in jobs for name in job.after} - {job.name for job in jobs}
    if unknown:
        raise ValueError(f"jobs wait for jobs that are not listed: {sorted(unknown)}")
    ready = threading.Condition()

    def next_job() -> Job | None:
        with ready:
            while pending:
                job = next((j for j in pending if all(name in results for name in j.after)), None)
                if job is not None:
                    pending.remove(job)
                    return job
                ready.wait()
            return None

    def worker() -> None:
        while (job := next_job()) is not None:
            ran = run_job(job, threads)
            with ready:
                results[job.name] = ran
                ready.notify_all()
            if log:
                log(f"[user path] {job.name}: exit {ran.returncode} in {ran.seconds:.0f} s")

    workers = [threading.Thread(target=worker) for _ in range(max(1, parallel))]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    return results
