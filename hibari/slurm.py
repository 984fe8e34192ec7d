"""SLURM client calls shared by the training launcher and the corpus array executor: the one sbatch submission.

Every SLURM complaint becomes one `HibariError` line (`one_line` picks SLURM's `error:` lines).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from hibari.errors import HibariError


def find_sbatch(alternative: str = "`hibari launch slurm ... --dry-run` prints the batch script without "
                                    "submitting") -> str:
    """Path of sbatch, or a one-line error that says what to do instead (`alternative`)."""
    path = shutil.which("sbatch")
    if path is None:
        raise HibariError("sbatch not found on PATH: run on a SLURM login node (or add the SLURM client tools to "
                          f"PATH); {alternative}")
    return path


def one_line(text: str) -> str:
    """SLURM's message as one line: its `error:` lines, else its last non-empty line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    picked = errors or lines[-1:]
    return " / ".join(picked) if picked else "(no output)"


def submit_script(script_path: Path, extra_args: list[str] | None = None, alternative: str | None = None) -> int:
    """`sbatch --parsable SCRIPT` -> job id. SLURM's complaint becomes one HibariError line."""
    sbatch = find_sbatch() if alternative is None else find_sbatch(alternative)
    proc = subprocess.run([sbatch, "--parsable", *(extra_args or []), str(script_path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise HibariError(f"sbatch rejected {script_path.name}: {one_line(proc.stderr + proc.stdout)}")
    out = proc.stdout.strip().splitlines()
    try:
        return int(out[-1].split(";")[0])
    except (IndexError, ValueError):
        raise HibariError(f"sbatch: unexpected output {proc.stdout.strip()!r} (expected a job id)") from None


TERMINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE")


def job_state(job_id: int) -> str | None:
    """The controller's JobState for the job (None once it has been purged, i.e. long finished)."""
    proc = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    fields = dict(kv.split("=", 1) for kv in proc.stdout.split() if "=" in kv)
    return fields.get("JobState", "")
