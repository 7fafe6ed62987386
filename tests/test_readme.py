"""The README's commands, run as a newcomer runs them: every line of "The two commands" and
"Everyday commands", as subprocesses, in a fresh directory with an empty Prefect home.

A documented command that stops working fails here. `make demo` runs with this checkout's
set-up already done (VENV names the test's venv and its install marker counts as fresh), so
the test does not reinstall the project; `make test` cannot run inside itself, so the test
checks what it runs and that `.ci/run` calls it. `make demo` and the later `acepipe pipeline`
(a rerun that finds everything done) are also the test of the pipeline flow. Marked slow: `make test` runs it (CI does),
`make test-fast` skips it.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parent.parent
VENV = Path(sys.executable).parent.parent
pytestmark = pytest.mark.slow

# Lines that need what no offline machine has: the test checks their error says what to do.
NEEDS_WEIGHTS = {
    "acepipe analyze data/synth/audio/song-000.flac --json": "--set rhythm.beat_tracker=onset",
}


def readme_block(heading: str) -> list[str]:
    """The command lines of the first ```bash block under a `## heading` (comments dropped)."""
    text = (REPO / "README.md").read_text()
    section = text[text.index(f"## {heading}\n"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines = []
    for raw in block.splitlines():
        words = shlex.split(raw, comments=True)
        if words:
            lines.append(shlex.join(words))
    return lines


@pytest.fixture(scope="module")
def newcomer(tmp_path_factory):
    """A fresh working directory (configs/ as in a checkout) and an environment with an empty
    Prefect home and none of this session's Prefect settings."""
    cwd = tmp_path_factory.mktemp("newcomer")
    (cwd / "configs").symlink_to(REPO / "configs")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "ACEPIPE_"))}
    env.update(PREFECT_HOME=str(tmp_path_factory.mktemp("prefect-home")),
               PATH=f"{VENV / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    return cwd, env


def run(words: list[str], cwd: Path, env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(words, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_two_commands_and_every_everyday_command(newcomer):
    cwd, env = newcomer
    two = readme_block("The two commands")
    assert two == ["make demo", "make test"]

    # make demo, first thing on a machine whose Prefect home is empty (its database gets created).
    installed = str(VENV / ".installed")
    demo = run(["make", "-f", str(REPO / "Makefile"), f"VENV={VENV}", "-o", installed, "demo"], cwd, env)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert "Traceback" not in demo.stderr
    assert "train       step 100," in demo.stdout
    kept = int(re.search(r"^kept\s+(\d+)", demo.stdout, re.M).group(1))
    manifest = pq.read_table(cwd / "work/tiny/manifest/default.parquet")
    assert kept > 0 and manifest.num_rows == kept
    latent_ids = pq.read_table(cwd / "work/tiny/latents/default/index.parquet").column("track_id").to_pylist()
    assert sorted(latent_ids) == sorted(manifest.column("track_id").to_pylist())
    final = json.loads((cwd / "work/tiny/runs/ace-dit-tiny/final.json").read_text())
    assert final["step"] == 100 and Path(final["checkpoint"]).is_file()

    # make test: what it runs (CI's .ci/run calls it, on an empty Prefect home).
    dry = run(["make", "-n", "-f", str(REPO / "Makefile"), f"VENV={VENV}", "-o", installed, "test"], cwd, env)
    assert "-m pytest" in dry.stdout
    ci = (REPO / ".ci/run").read_text()
    assert "make test" in ci and "PREFECT_HOME=$(mktemp -d)" in ci

    everyday = readme_block("Everyday commands")
    assert len(everyday) >= 12 and all(line.startswith("acepipe ") for line in everyday)
    outputs = {}
    for line in everyday:
        out = run(shlex.split(line), cwd, env)
        assert "Traceback" not in out.stderr, f"{line}\n{out.stderr[-3000:]}"
        if line in NEEDS_WEIGHTS:
            assert out.returncode == 2, f"{line}\n{out.stdout[-2000:]}{out.stderr[-2000:]}"
            assert NEEDS_WEIGHTS[line] in out.stderr, out.stderr
        else:
            assert out.returncode == 0, f"{line}\n{out.stdout[-2000:]}{out.stderr[-3000:]}"
        outputs[line.split(" --")[0]] = out.stdout

    # What a few of them printed, against what the corpus holds.
    assert "wrote 20 files" in outputs["acepipe synth data/synth"]
    assert json.loads(outputs["acepipe inspect data/synth/audio/song-000.flac"])["found"]
    match = json.loads(outputs["acepipe lyrics match"].strip().splitlines()[-1])
    assert match["lyric_id"] == "lyr-000" and match["score"] > 0.5
    assert "BPM" in outputs["acepipe analyze data/synth/audio/song-000.flac"]
    assert "done at step 20" in outputs["acepipe train"]
    rerun = outputs["acepipe pipeline"]     # everything was done before: no stage work, trained already
    assert re.search(r"^probe\s+0\s+\d+", rerun, re.M) and "train       step 100," in rerun
    assert "nothing left to train" in rerun
