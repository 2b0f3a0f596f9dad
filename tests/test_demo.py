"""`trafficvlm demo`: the service lifecycle (process groups, nothing left behind), the config's --quick
overrides, the stage clock, the summary table; and, marked slow, `trafficvlm demo --quick` end to end.

    .venv/bin/python -m pytest -q tests/test_demo.py                 # unit tests, seconds
    .venv/bin/python -m pytest -q tests/test_demo.py -m slow         # the whole demo, a few CPU minutes
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trafficvlm import demo

REPO = Path(__file__).resolve().parents[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) is not running anything.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.is_file() and stat.read_text().split(")")[-1].split()[0] == "Z")


def _http_server_with_worker(tmp_path: Path) -> list[str]:
    """A server that forks a worker (as mlflow/gunicorn do) and writes the worker's pid to a file."""
    script = tmp_path / "server.py"
    script.write_text(
        "import http.server, subprocess, sys\n"
        f"w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        f"open({str(tmp_path / 'worker.pid')!r}, 'w').write(str(w.pid))\n"
        "http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), http.server.SimpleHTTPRequestHandler)"
        ".serve_forever()\n")
    return [sys.executable, str(script)]


def test_services_stop_the_whole_process_group(tmp_path):
    services = demo.Services(tmp_path / "logs")
    port = demo.free_port()
    service = services.start("web", [*_http_server_with_worker(tmp_path), str(port)],
                             url=f"http://127.0.0.1:{port}", probe="/", timeout=30)
    deadline = time.monotonic() + 10
    while not (tmp_path / "worker.pid").is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    worker = int((tmp_path / "worker.pid").read_text())
    assert _alive(service.process.pid) and _alive(worker)
    services.stop_all()
    time.sleep(0.2)
    assert not _alive(service.process.pid)
    assert not _alive(worker), "the server's child survived: stop must signal the process group"
    services.stop_all()  # idempotent


def test_a_service_that_dies_while_starting_names_its_log(tmp_path):
    services = demo.Services(tmp_path / "logs")
    with pytest.raises(RuntimeError, match="exited with code 3.*broken.log"):
        services.start("broken", [sys.executable, "-c", "import sys; sys.exit(3)"], url="http://127.0.0.1:9",
                       probe="/", timeout=10)


def test_sigterm_becomes_system_exit_so_cleanup_runs():
    with pytest.raises(SystemExit) as info, demo.exit_on_signals():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    assert info.value.code == 128 + signal.SIGTERM


def test_quick_overrides_apply_and_explicit_overrides_win():
    cfg = demo.load_demo_config(REPO / "configs" / "demo.toml", ["synth.scenarios=12"], quick=True)
    assert cfg.synth.scenarios == 12                     # the command line beats --quick
    assert cfg.gates.min_accuracy == 0.0                 # from --quick
    assert any(o.startswith("train.max_steps=") for o in cfg.train_overrides)
    full = demo.load_demo_config(REPO / "configs" / "demo.toml", [], quick=False)
    assert full.gates.min_accuracy >= 0.5 and full.train_overrides == []


def test_tee_times_kfp_tasks_from_their_log_lines(tmp_path):
    clock = demo.StageClock()
    sink = io.StringIO()
    tee = demo.Tee(sink, tmp_path / "pipeline.log", clock)
    tee.write("12:00:00.000 - INFO - Executing task \x1b[96m'sft'\x1b[0m\n")
    time.sleep(0.05)
    tee.write("12:00:01.000 - INFO - Task \x1b[96m'sft'\x1b[0m finished with status \x1b[92mSUCCESS\x1b[0m\n")
    tee.close()
    assert clock.seconds["pipeline: sft"] >= 0.05
    assert "\x1b" not in (tmp_path / "pipeline.log").read_text()
    assert "Executing task" in sink.getvalue()


def test_table_lists_every_model_and_question():
    q = "What is weather in the scenario?"
    rows = {"zero-shot": {"accuracy": 0.3, "per_question": {q: {"accuracy": 0.25}}},
            "SFT bf16": {"accuracy": 0.9, "per_question": {q: {"accuracy": 0.95}}}, "FP8": None}
    table = demo.format_table(rows)
    assert "weather" in table and "95.0%" in table and "30.0%" in table
    assert table.splitlines()[2].split()[-1] == "-"      # FP8 not run: a dash, not a crash


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "TRAFFICVLM_CACHE": str(tmp_path / "cache")}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run([sys.executable, "-m", "trafficvlm", "demo", "--quick", "--out", str(out)], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    for key in demo.SUMMARY_KEYS:
        assert key in summary, key
    assert summary["promoted"] is True
    assert summary["registry"]["champion"]["smoke_test"] == "passed"   # the pipeline's step, on the deployed model
    assert summary["deployed"] and summary["live_answer"]["ok"]
    commit = summary["gitops_commit"]
    bare = summary["gitops_repo"]
    assert commit and subprocess.run(["git", "--git-dir", bare, "cat-file", "-t", commit], capture_output=True,
                                     text=True).stdout.strip() == "commit"
    assert (out / "report.html").is_file()
    assert "synthetic" in done.stdout.lower() and "tiny" in done.stdout.lower()
    left = subprocess.run(["pgrep", "-f", str(out.resolve())], capture_output=True, text=True).stdout.split()
    assert not left, f"processes left running: {left}"
    assert set(summary["service_pids"]) >= {"s3", "mlflow", "endpoint"}   # endpoint: the deployed model
    assert not [name for name, pid in summary["service_pids"].items() if _alive(pid)]


def test_a_second_signal_while_stopping_does_not_abandon_services(tmp_path):
    services = demo.Services(tmp_path / "logs")
    procs = []
    for name in ("a", "b"):
        port = demo.free_port()
        procs.append(services.start(name, [sys.executable, "-m", "http.server", "-b", "127.0.0.1", str(port)],
                                    url=f"http://127.0.0.1:{port}", probe="/", timeout=30).process)
    original = demo._signal_group

    def impatient(proc, sig):  # the user presses Ctrl-C again while the first service stops
        original(proc, sig)
        os.kill(os.getpid(), signal.SIGINT)

    demo._signal_group = impatient
    try:
        services.stop_all()
    finally:
        demo._signal_group = original
    assert all(p.poll() is not None for p in procs)
