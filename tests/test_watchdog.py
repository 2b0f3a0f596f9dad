"""Stall watchdog: one report (rank, world size, step, phase, sample ids, stacks) when a step overruns, none
when steps finish in time; and on 2 real gloo ranks, the rank left waiting in a collective names itself
and its samples and exits non-zero instead of hanging. Also the invariant that keeps all ranks on one
modality path: every training sample has a video."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time

import pytest

from sft_fixtures import REPO
from trafficvlm.parallel import _free_port as free_port
from trafficvlm.watchdog import STALL_EXIT_CODE, StallWatchdog


def _log(tmp_path):
    return (tmp_path / "stderr.txt").open("w+")  # a real file: faulthandler writes to its descriptor


def test_fires_once_with_rank_step_and_samples_when_a_step_does_not_finish(tmp_path):
    with _log(tmp_path) as log, StallWatchdog(0.5, rank=1, world_size=2, abort=False, stream=log, poll_s=0.05) as dog:
        dog.step_started(37, ["q12", "q40"])
        dog.phase("optimizer")
        time.sleep(1.0)  # the stalled step: several polls past the deadline
        dog.step_done()
        log.seek(0)
        text = log.read()
    assert len(dog.reports) == 1
    assert dog.reports[0].startswith("watchdog: rank 1/2 stalled ")
    assert "in step 37, phase optimizer (samples ['q12', 'q40']); stacks follow" in dog.reports[0]
    assert text.count("watchdog: rank 1/2 stalled") == 1
    assert "test_watchdog.py" in text  # the stacks of every thread, this (sleeping) one included


def test_quiet_when_steps_finish_in_time(tmp_path):
    with _log(tmp_path) as log, StallWatchdog(0.5, rank=0, world_size=2, abort=False, stream=log, poll_s=0.05) as dog:
        for step in range(1, 6):
            dog.step_started(step, [f"q{step}"])
            time.sleep(0.2)
            dog.step_done()
        time.sleep(0.7)  # between steps (data loading, checkpoints) nothing is watched
    assert dog.reports == []


def test_injected_clock_and_disabled_watchdog():
    now = [100.0]
    dog = StallWatchdog(900, rank=0, world_size=8, abort=False, clock=lambda: now[0], stream=sys.stdout)
    dog.step_started(3, ["a"])
    now[0] += 900
    assert dog.check() is None  # exactly at the deadline is still in time
    now[0] += 12
    assert dog.check() == ("watchdog: rank 0/8 stalled 912 s in step 3, phase forward/backward (samples ['a']); "
                           "stacks follow")
    assert dog.check() is None  # one report per stalled step
    off = StallWatchdog(0, rank=0, world_size=1).start()
    assert not off.enabled and off._thread is None
    with pytest.raises(ValueError, match="train.stall_timeout_s"):
        StallWatchdog(-1, rank=0, world_size=1)


# Rank 1 is slow before the step (as a stuck data worker would be: not watched), rank 0 enters the step and
# blocks in the all_reduce; rank 0's watchdog must fire, name rank 0 and its samples, and end the process.
RANK_SCRIPT = textwrap.dedent("""
    import time
    import torch
    import torch.distributed as dist
    from trafficvlm.parallel import init_distributed
    from trafficvlm.watchdog import StallWatchdog

    info = init_distributed("cpu", timeout_s=60)
    with StallWatchdog(1.0, rank=info.rank, world_size=info.world_size) as dog:
        if info.rank == 1:
            time.sleep(20)
        dog.step_started(5, [f"q{info.rank}a", f"q{info.rank}b"])
        dist.all_reduce(torch.ones(1))
        dog.step_done()
    print("finished", flush=True)
""")


def test_waiting_gloo_rank_reports_itself_and_exits(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO / "components"), "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, str(script)], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        out0, err0 = procs[0].communicate(timeout=60)
    finally:
        for p in procs:
            p.kill()  # rank 1 is still asleep (or stuck on its dead peer): ours to end
            p.wait()
    assert procs[0].returncode == STALL_EXIT_CODE, err0[-3000:]
    reports = re.findall(r"watchdog: rank (\d)/2 stalled \d+ s in step 5, phase forward/backward \(samples (.*?)\)",
                         err0)
    assert reports == [("0", "['q0a', 'q0b']")]
    assert "in all_reduce" in err0  # the stack shows where it waited
    assert "finished" not in out0


def test_every_training_record_has_a_video_so_every_rank_runs_the_vision_tower():
    """FSDP all-gathers the vision tower's shards only on ranks that run it: a text-only sample on one rank
    and a video on another would hang the step. The data cannot hold text-only samples: a LLaVA entry
    without a video is refused, and every sample is encoded from a clip (data.SFTDataset.encode)."""
    from trafficvlm.records import ANSWER_SUFFIX, from_llava

    human = "<video> \n Is it raining? \n A: Yes \n B: No \n " + ANSWER_SUFFIX
    turns = [{"from": "human", "value": human}, {"from": "gpt", "value": "A"}]
    entry = {"id": "q1", "video": "a.mp4", "conversations": turns}
    assert from_llava(entry).video == "a.mp4"
    with pytest.raises(ValueError, match="'q1': missing field 'video'"):
        from_llava({k: v for k, v in entry.items() if k != "video"})
    text_only = {**entry, "conversations": [{"from": "human", "value": human.replace("<video> \n ", "")}, turns[1]]}
    with pytest.raises(ValueError, match="does not start with '<video>"):
        from_llava(text_only)
