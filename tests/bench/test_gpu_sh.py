"""bench/gpu.sh keeps to its budget whatever its steps do: here every step hangs (a stand-in python that sleeps),
and the script still ends within the budget, says which steps it stopped and which it skipped, exits 1, and leaves
no process behind (the background checkpoint writer included). On a machine whose python cannot import the engine,
it installs the carried wheels and the checkout first, or says what to carry."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).parents[2] / "bench"
GPU_SH = BENCH / "gpu.sh"
BUDGET = 30

HANGING_PY = """#!/bin/sh
case "$*" in
    *"import torch; print"*) echo "torch stand-in"; exit 0 ;;
    *"import omni2.engine"*) exit 0 ;;
esac
echo $$ >> "{pids}"
exec sleep 600
"""


def run_gpu_sh(tmp_path: Path, stand_in: str, budget: int, timeout: float, **env: str
               ) -> subprocess.CompletedProcess:
    """gpu.sh into tmp_path/results with `stand_in` (a shell script) as its python, under `budget` seconds."""
    py = tmp_path / "python"
    py.write_text(stand_in)
    py.chmod(0o755)
    return subprocess.run(["bash", str(GPU_SH), str(tmp_path / "results")], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PY=str(py), GPU_SH_BUDGET=str(budget),
                                                    OMNI2_BENCH_CKPT=str(tmp_path / "ckpt"), **env))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie still answers kill(0)
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_hanging_steps_cannot_overrun_the_budget(tmp_path):
    pids = tmp_path / "pids"
    out = tmp_path / "results"
    t0 = time.monotonic()
    proc = run_gpu_sh(tmp_path, HANGING_PY.format(pids=pids), BUDGET, BUDGET + 60)
    wall = time.monotonic() - t0
    assert wall < BUDGET, (wall, proc.stdout[-2000:])
    assert proc.returncode == 1, proc.stdout[-2000:]
    # The first step gets what is left of the budget less the kill grace, is stopped, and nothing after it has time
    # to run.
    first = re.search(r"=== cuda-tests \(limit (\d+)s\)", proc.stdout)
    assert first and 10 <= int(first[1]) <= BUDGET - 10, proc.stdout  # what was left after the machine probes
    assert "FAILED after" in (out / "cuda-tests.log").read_text()
    for name in ("profile", "latency-0.5b", "kernels", "tts-vocoder-chunks", "vocoder-sessions"):
        assert "SKIPPED" in (out / f"{name}.log").read_text(), name
    assert "latency-7b SKIPPED" in (out / "latency-7b.log").read_text()
    assert "torch stand-in" in (out / "machine.txt").read_text()
    started = [int(p) for p in pids.read_text().split()]
    assert len(started) == 2, started  # the 7b writer and the first step
    deadline = time.monotonic() + 5
    while any(alive(p) for p in started):
        assert time.monotonic() < deadline, [p for p in started if alive(p)]
        time.sleep(0.1)


MISSING_PY = """#!/bin/sh
case "$*" in
    *"import torch; print"*) echo "torch stand-in"; exit 0 ;;
    *"import omni2.engine"*) exit 1 ;;
    *"-m pip install"*) echo "$*" >> "{log}"; exit {pip_rc} ;;
esac
echo "step $*" >> "{log}"
exit 0
"""


def run_without_package(tmp_path, wheels: list[str], pip_rc: int) -> tuple[subprocess.CompletedProcess, str]:
    log = tmp_path / "calls"
    log.touch()
    whl = tmp_path / "whl"
    whl.mkdir()
    for name in wheels:
        (whl / name).touch()
    proc = run_gpu_sh(tmp_path, MISSING_PY.format(log=log, pip_rc=pip_rc), 40, 60, OMNI2_GPU_WHEELS=str(whl),
                      OMNI2_GPU_SITE=str(tmp_path / "site"))
    return proc, log.read_text()


def test_no_package_and_no_wheels_says_what_to_carry_before_any_step(tmp_path):
    proc, calls = run_without_package(tmp_path, [], pip_rc=0)
    assert proc.returncode == 1
    assert "bench/gpu_wheels.sh" in proc.stderr and "carry .whl" in proc.stderr, proc.stderr
    assert calls == ""  # no install tried, no step run
    assert "===" not in proc.stdout


def test_carried_wheels_and_the_checkout_are_installed_into_the_site(tmp_path):
    proc, calls = run_without_package(tmp_path, ["pyzmq-27-cp312-abi3-x.whl", "soxr-1-cp312-abi3-x.whl"], pip_rc=0)
    installs = [line for line in calls.splitlines() if "-m pip install" in line]
    site = str(tmp_path / "site")
    assert len(installs) == 2, calls
    assert "pyzmq-27-cp312-abi3-x.whl" in installs[0] and "soxr-1-cp312-abi3-x.whl" in installs[0]
    assert installs[1].endswith(f"--target {site} ."), installs[1]  # the checkout, built with the image's setuptools
    assert all("--no-index" in line and "--no-deps" in line for line in installs)
    # The stand-in still cannot import it, so the script stops there with the reason instead of running steps.
    assert proc.returncode == 1 and "still cannot import" in proc.stderr, proc.stderr
    assert "step" not in calls


def test_a_failed_install_stops_the_run(tmp_path):
    proc, calls = run_without_package(tmp_path, ["pyzmq-27-cp312-abi3-x.whl"], pip_rc=1)
    assert proc.returncode == 1 and "installing into" in proc.stderr and "FAILED" in proc.stderr, proc.stderr
    assert calls.count("-m pip install") == 1 and "step" not in calls


RECORDING_PY = """#!/bin/sh
case "$*" in
    *"import torch; print"*) echo "torch stand-in"; exit 0 ;;
    *"import omni2.engine"*) exit 0 ;;
esac
printf '%s\\0' "$@" >> "{log}"
printf '\\036\\0' >> "{log}"
"""


def test_every_bench_command_gpu_sh_runs_parses(tmp_path, monkeypatch):
    """A GPU is lent rarely and briefly: a renamed or mistyped flag in gpu.sh must fail here, not there. Every step
    "passes" at once (a stand-in python that records its arguments), so every command runs, the graphs flags of a
    passed step 1 included; each bench script's own parse_args then reads what gpu.sh gave it."""
    log = tmp_path / "calls"
    proc = run_gpu_sh(tmp_path, RECORDING_PY.format(log=log), 400, 120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    calls = [c.split("\0")[:-1] for c in log.read_text().split("\x1e\0") if c]
    scripts = [(Path(c[0]).name, c[1:]) for c in calls if c and c[0].endswith(".py")]
    assert sorted({name for name, _ in scripts}) == ["kernels.py", "latency.py", "profile_step.py",
                                                     "tts_vocoder.py"], calls
    assert sum(name == "latency.py" for name, _ in scripts) == 2  # 0.5b and 7b
    # Step 1 "passed": both sweeps and the vocoder's throughput per session count replay CUDA graphs.
    graphed = [argv for name, argv in scripts
               if name == "latency.py" or (name == "tts_vocoder.py" and "--sessions" in argv)]
    assert len(graphed) == 3 and all("--cuda-graphs" in argv for argv in graphed)
    monkeypatch.syspath_prepend(str(BENCH))  # the scripts import their neighbours (harness, latency_schema, ...)
    for name, argv in scripts:
        spec = importlib.util.spec_from_file_location(name[:-3], BENCH / name)
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name[:-3], module)  # dataclasses look their module up there
        spec.loader.exec_module(module)
        module.parse_args(argv)  # argparse exits (SystemExit) on an unknown flag or a bad value
