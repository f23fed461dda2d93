"""Training on a cluster (tools/submit.py): a stop at a step boundary on the scheduler's signal,
a requeued job that resumes bit-identically (2 gloo processes through submitit's local
executor), and the SLURM submission for 2 nodes x 8 GPUs checked without a cluster."""
import os
import re
import signal
import time

import pytest
import submitit
import torch

from conftest import QUICKSTART, assert_same_training_state, load_tool, register_coco_replacing, run, write_synthetic_coco

from soit.engine import training as train_net
from soit.engine.cluster_job import TrainingJob, process_group
from soit.engine.preemption import StopRequest, TrainingStopped

TINY = [
    "dataloader.train.dataset.names=test_cluster_blobs",
    "dataloader.train.total_batch_size=2",
    "model.transformer.num_queries=10",
    "model.transformer.num_decoder_layers=1",
    "model.transformer.ffn_dim=64",
    "model.mask_encoder.ffn_dim=64",
    "train.seed=0",
    "train.log_period=1",
]


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cluster_blobs"))
    write_synthetic_coco(root)
    register_coco_replacing("test_cluster_blobs", os.path.join(root, "train.json"), os.path.join(root, "images"))
    return root


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    """The quick-start config without evaluation, as a user's own config file."""
    path = tmp_path_factory.mktemp("cluster_cfg") / "no_eval.py"
    path.write_text(
        "from detectron2.config import LazyConfig\n\n"
        f"globals().update(LazyConfig.load({QUICKSTART!r}))\n"
        "dataloader.pop('evaluator')\n"
    )
    return str(path)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_signal_stops_after_the_step_with_a_checkpoint_and_resume_is_exact(blobs, tmp_path, monkeypatch):
    from detectron2.config import LazyConfig

    def cfg(out):
        c = LazyConfig.apply_overrides(LazyConfig.load(QUICKSTART), TINY + [f"train.output_dir={out}", "train.max_iter=6"])
        del c.dataloader["evaluator"]
        return c

    full = run(cfg(tmp_path / "full"))
    assert full.iter == 6

    request = StopRequest()
    previous = request.install(signal.SIGUSR2)
    original = train_net.SOITTrainer.run_step

    def signalled_during_step_2(self):
        if self.iter == 2:
            os.kill(os.getpid(), signal.SIGUSR2)  # arrives mid-step, as the scheduler's does
        return original(self)

    monkeypatch.setattr(train_net.SOITTrainer, "run_step", signalled_during_step_2)
    from detectron2.engine import default_argument_parser, default_setup

    args = default_argument_parser().parse_args([])
    stopped_cfg = cfg(tmp_path / "stopped")
    default_setup(stopped_cfg, args)
    try:
        with pytest.raises(TrainingStopped) as stop:
            train_net.do_train(args, stopped_cfg, stop_request=request)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert stop.value.iteration == 2 and request.reason == "signal SIGUSR2"
    saved = tmp_path / "stopped" / "model_0000002.pth"
    assert (tmp_path / "stopped" / "last_checkpoint").read_text() == saved.name
    assert load(saved)["iteration"] == 2 and "rng" in load(saved)
    assert not (tmp_path / "stopped" / "model_final.pth").exists()

    monkeypatch.setattr(train_net.SOITTrainer, "run_step", original)
    resumed = run(cfg(tmp_path / "stopped"), resume=True)
    assert resumed.iter == 6
    assert_same_training_state(load(tmp_path / "full" / "model_final.pth"), load(tmp_path / "stopped" / "model_final.pth"))


def _task_pids(controller_pid):
    """The processes submitit's local controller started (its children)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == controller_pid:
                pids.append(int(entry))
    return pids


def _logs(job):
    """Every task's log of the job, in task order."""
    folder = job.paths.submitted_pickle.parent
    return "\n".join(f"== {p.name}\n{p.read_text()}" for p in sorted(folder.glob("*_log.*")))


def _submit_local(tool, config_file, blobs, out, max_iter):
    argv = [
        "--cluster", "local", "--gpus-per-node", "2", "--time", "15", "--signal-delay", "60",
        "--job-dir", str(out / "jobs"), "--config-file", config_file,
        "--register-coco", "test_cluster_blobs", os.path.join(blobs, "train.json"), os.path.join(blobs, "images"),
        *TINY, f"train.output_dir={out}", f"train.max_iter={max_iter}", "train.checkpointer.period=100",
    ]  # fmt: skip
    args = tool.parser().parse_args(argv)
    from soit.engine.cluster_submit import submit

    return submit(args, tool.spec_from(args), cluster="local", folder=args.job_dir)


@pytest.mark.slow
def test_local_job_requeued_at_the_signal_ends_bit_identical(blobs, config_file, tmp_path, monkeypatch):
    tool = load_tool("submit")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two processes on the test machine's cores
    max_iter = 12

    whole = _submit_local(tool, config_file, blobs, tmp_path / "whole", max_iter)
    results = whole.results()
    assert [r["iteration"] for r in results] == [max_iter, max_iter], _logs(whole)
    assert results[0]["requeues"] == 0

    job = _submit_local(tool, config_file, blobs, tmp_path / "interrupted", max_iter)
    metrics, deadline = tmp_path / "interrupted" / "metrics.json", time.time() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):  # two steps done
        assert job.state == "RUNNING" and time.time() < deadline, _logs(job)
        time.sleep(0.05)
    tasks = _task_pids(int(job.job_id))
    assert len(tasks) == 2, tasks
    for pid in tasks:  # what SLURM does before a time limit: the signal to every task
        os.kill(pid, signal.SIGUSR2)
    results = job.results()
    logs = _logs(job)
    assert [r["iteration"] for r in results] == [max_iter, max_iter], logs
    assert results[0]["requeues"] == 1, logs
    stop = re.search(r"saved model_(\d{7})\.pth, stopping", logs)
    assert stop, logs
    at = int(stop[1])
    assert 1 <= at < max_iter - 1  # mid-run
    assert f"Starting training from iteration {at + 1}" in logs
    assert (tmp_path / "interrupted" / f"model_{at:07d}.pth").exists()
    assert_same_training_state(load(tmp_path / "whole" / "model_final.pth"), load(tmp_path / "interrupted" / "model_final.pth"))


def test_slurm_submission_for_two_nodes_of_eight_gpus(tmp_path, monkeypatch, config_file):
    """The real SlurmExecutor submits through sbatch; a stand-in sbatch keeps the script."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {tmp_path}/script.sh\necho "Submitted batch job 4242"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    tool = load_tool("submit")
    argv = [
        "--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu", "--account", "vision", "--time", "1440",
        "--cpus-per-task", "6", "--mem-gb", "480", "--signal-delay", "180", "--max-requeues", "5",
        "--config-file", config_file, f"train.output_dir={tmp_path / 'run'}", "dataloader.train.total_batch_size=32",
    ]  # fmt: skip
    job = tool.main(argv)
    assert job.job_id == "4242"
    script = (tmp_path / "script.sh").read_text()
    flags = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)$", script, re.M))
    assert flags["nodes"] == "2"
    assert flags["ntasks-per-node"] == "8"  # one process per GPU
    assert flags["gpus-per-node"] == "8"
    assert flags["cpus-per-task"] == "6"
    assert flags["mem"] == "480GB"
    assert flags["time"] == "1440"
    assert flags["partition"] == "gpu" and flags["account"] == "vision"
    assert flags["signal"] == "USR2@180"  # the preemption signal, 3 minutes before the limit
    assert flags["job-name"] == "soit"
    run_dir = tmp_path / "run" / "submitit"
    assert flags["output"].startswith(str(run_dir))
    assert re.search(r"^srun .* -m submitit\.core\._submit " + re.escape(str(run_dir)), script, re.M)
    # what every task will run
    delayed = submitit.helpers.DelayedSubmission.load(job.paths.submitted_pickle)
    assert isinstance(delayed.function, TrainingJob)
    assert delayed.function.args.config_file == config_file and delayed.function.max_requeues == 5
    assert delayed.function.args.opts[-1] == "dataloader.train.total_batch_size=32"
    assert not delayed.function.args.resume


def test_process_group_from_slurm_variables(monkeypatch):
    """Task 11 of 16 (node 1, local rank 3) joins at the first node of the job."""
    for k, v in dict(SUBMITIT_EXECUTOR="slurm", SLURM_JOB_ID="4242", SLURM_NTASKS="16", SLURM_JOB_NUM_NODES="2",
                     SLURM_NODEID="1", SLURM_PROCID="11", SLURM_LOCALID="3",
                     SLURM_JOB_NODELIST="gpu-node[07-08]").items():  # fmt: skip
        monkeypatch.setenv(k, v)
    env = submitit.JobEnvironment()
    group = process_group(env)
    assert group["world_size"] == 16 and group["rank"] == 11 and group["local_rank"] == 3 and group["per_node"] == 8
    assert re.fullmatch(r"tcp://gpu-node07:\d+", group["url"])
    assert group == process_group(env)  # every task and every requeue: the same address
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "1")
    assert process_group(submitit.JobEnvironment()) is None


def test_submission_refuses_what_would_fail_in_the_job(tmp_path, config_file):
    tool = load_tool("submit")
    base = ["--cluster", "local", "--config-file", config_file, f"train.output_dir={tmp_path}"]
    with pytest.raises(SystemExit, match=r"total_batch_size=2 does not split over 1 node\(s\) x 3 GPU\(s\) = 3 processes"):
        tool.main(["--gpus-per-node", "3", *base])
    with pytest.raises(SystemExit, match="nodes must be 1"):
        tool.main(["--nodes", "2", "--gpus-per-node", "1", *base])
    with pytest.raises(SystemExit, match="signal_delay_s=600 leaves no training time"):
        tool.main(["--time", "10", "--signal-delay", "600", *base])
    (tmp_path / "last_checkpoint").write_text("model_0000009.pth")
    with pytest.raises(SystemExit, match="--resume"):
        tool.main(["--gpus-per-node", "2", *base])
    assert os.listdir(tmp_path) == ["last_checkpoint"]  # nothing submitted, nothing written


def test_dry_run_prints_the_sbatch_script(tmp_path, config_file, capsys):
    tool = load_tool("submit")
    tool.main(["--nodes", "2", "--gpus-per-node", "8", "--dry-run", "--config-file", config_file,
               f"train.output_dir={tmp_path}", "dataloader.train.total_batch_size=16"])  # fmt: skip
    script = capsys.readouterr().out
    assert "#SBATCH --nodes=2" in script and "#SBATCH --signal=USR2@120" in script
    assert os.listdir(tmp_path) == []


def test_requeue_limit_saves_and_says_how_to_continue():
    from types import SimpleNamespace

    job = TrainingJob(SimpleNamespace(config_file="c.py", eval_only=False), max_requeues=2, requeues=2)
    with pytest.raises(RuntimeError, match=r"requeued 2 times, its limit .*model_0000041\.pth.*--resume"):
        job._stop_and_requeue(None, TrainingStopped(41, "model_0000041.pth"))
    nxt = job.requeued()
    assert nxt.requeues == 3 and nxt.max_requeues == 2 and nxt.args is job.args
