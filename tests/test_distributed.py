"""Data parallelism with torchrun on CPU (gloo, 2 processes): DDP and FSDP2 against one process, MoE bias agreement,
checkpoints that move between world sizes, and a failing rank that ends the job."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tinyseek.train import load_config
from tinyseek.train.metrics import read_metrics
from tinyseek.train.trainer import Trainer

# Launched by torchrun: train like `tinyseek train`, then record this rank's MoE biases. A rank named by
# TINYSEEK_TEST_FAIL_RANK raises at step 2, as a crashing rank would.
WORKER = '''
import os, sys
from pathlib import Path
import torch
from tinyseek.cli import main
from tinyseek.train.trainer import Trainer

train_step, train = Trainer.train_step, Trainer.train

def failing_train_step(self):
    if self.progress.step == 2 and str(self.world.rank) == os.environ.get("TINYSEEK_TEST_FAIL_RANK"):
        raise RuntimeError("injected failure")
    return train_step(self)

def train_and_record_biases(self, *args, **kwargs):
    status = train(self, *args, **kwargs)
    biases = {n: b.clone() for n, b in self.model.named_buffers() if n.endswith("e_score_correction_bias")}
    torch.save(biases, Path(self.config.out_dir) / f"biases_rank{self.world.rank}.pt")
    alive = torch.distributed.is_initialized()
    (Path(self.config.out_dir) / f"process_group_rank{self.world.rank}.txt").write_text(str(alive))
    return status

Trainer.train_step, Trainer.train = failing_train_step, train_and_record_biases
sys.exit(main(["train", *sys.argv[1:]]))
'''
STEPS = 6
# No dropout: the processes draw different random numbers than one process would.
MODEL = {"attention_dropout": 0.0}


@pytest.fixture(scope="module")
def config_file(tiny_config_file):
    """``config_file(tmp_path, corpus, name, micro_batch, **sections)``: the tiny config in tmp_path/name."""

    def write(tmp_path: Path, corpus, name: str, micro_batch: int, **sections) -> Path:
        directory = tmp_path / name
        directory.mkdir(exist_ok=True)
        settings = {
            "out_dir": str(directory / "run"), "max_steps": STEPS, "model": MODEL,
            "data": {"micro_batch_size": micro_batch}, "logging": {"eval_every": STEPS}, **sections,
        }
        return tiny_config_file(directory, corpus, **settings)

    return write


def torchrun(tmp_path: Path, config: Path, *args: str, fail_rank: int | None = None, timeout: float = 240):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    if fail_rank is not None:
        env["TINYSEEK_TEST_FAIL_RANK"] = str(fail_rank)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(worker), "--config", str(config), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def train_losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"]


def assert_same_run(run_dir: Path, reference_dir: Path, final_weights):
    assert len(train_losses(run_dir)) == STEPS
    torch.testing.assert_close(train_losses(run_dir), train_losses(reference_dir), rtol=0, atol=1e-5)
    reference = final_weights(reference_dir)
    for name, value in final_weights(run_dir).items():
        torch.testing.assert_close(value, reference[name], rtol=0, atol=1e-5, msg=name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_corpus, config_file):
    """One process with micro-batch 4, and 2 processes x micro-batch 2 under DDP and FSDP2, on the same data."""
    tmp_path = tmp_path_factory.mktemp("distributed")
    single = Trainer(load_config(str(config_file(tmp_path, tiny_corpus, "single", micro_batch=4))))
    assert single.train() == 0
    results = {"single": single.run_dir}
    for strategy in ("ddp", "fsdp"):
        result = torchrun(tmp_path, config_file(tmp_path, tiny_corpus, strategy, micro_batch=2), "--parallel", strategy)
        assert result.returncode == 0, result.stderr[-3000:]
        results[strategy] = tmp_path / strategy / "run"
    results["ddp_log"] = (results["ddp"] / "train.log").read_text()
    results["tmp_path"] = tmp_path
    return results


def test_ddp_on_two_processes_matches_one_process_with_twice_the_micro_batch(runs, final_weights):
    assert "micro-batch 2 x accumulation 2 x 2 processes" in runs["ddp_log"]
    assert_same_run(runs["ddp"], runs["single"], final_weights)


def test_fsdp_on_two_processes_matches_ddp(runs, final_weights):
    assert_same_run(runs["fsdp"], runs["ddp"], final_weights)


def test_moe_biases_agree_on_every_rank_and_with_one_process(runs, final_weights):
    single = {n: b for n, b in final_weights(runs["single"]).items() if n.endswith("e_score_correction_bias")}
    assert single and any(b.abs().sum() > 0 for b in single.values())  # the updates did happen
    for strategy in ("ddp", "fsdp"):
        rank0, rank1 = (torch.load(runs[strategy] / f"biases_rank{r}.pt") for r in (0, 1))
        for name, bias in single.items():
            assert torch.equal(rank0[name], rank1[name]), (strategy, name)
            torch.testing.assert_close(rank0[name], bias, rtol=0, atol=1e-6)


def test_a_two_process_checkpoint_resumes_in_one_process_with_identical_weights(
    runs, tiny_corpus, caplog, config_file, final_weights
):
    tmp_path = runs["tmp_path"]
    run_dir = tmp_path / "resume-1" / "run"
    shutil.copytree(runs["ddp"], run_dir)
    config = config_file(tmp_path, tiny_corpus, "resume-1", micro_batch=2, max_steps=STEPS + 2)
    resumed = Trainer(load_config(str(config)))
    assert resumed.progress.step == STEPS
    saved = final_weights(run_dir)
    for name, value in resumed.model.state_dict().items():
        if name in saved:
            assert torch.equal(value, saved[name]), name
    assert "global batch changed" in caplog.text
    assert resumed.train() == 0 and resumed.progress.step == STEPS + 2


def test_a_one_process_checkpoint_resumes_under_fsdp_on_two_processes(runs, tiny_corpus, config_file):
    tmp_path = runs["tmp_path"]
    run_dir = tmp_path / "resume-2" / "run"
    shutil.copytree(runs["single"], run_dir)
    config = config_file(tmp_path, tiny_corpus, "resume-2", micro_batch=2, max_steps=STEPS + 2)
    result = torchrun(tmp_path, config, "--parallel", "fsdp")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{STEPS:08d}'}" in (run_dir / "train.log").read_text()
    assert len(train_losses(run_dir)) == STEPS + 2


def test_a_failing_rank_ends_the_whole_job_with_a_message_naming_it(tmp_path, tiny_corpus, config_file):
    config = config_file(tmp_path, tiny_corpus, "failing", micro_batch=2, max_steps=50)
    result = torchrun(tmp_path, config, fail_rank=1, timeout=180)
    assert result.returncode != 0
    assert "rank 1 failed: RuntimeError('injected failure')" in result.stderr


def test_two_processes_on_an_unprepared_corpus_tokenize_it_once_and_end_their_process_group(
    tmp_path, tiny_corpus, config_file
):
    raw_corpus = Path(tiny_corpus["data"]).parents[1] / "corpus.jsonl"
    cache = tmp_path / "nobody-prepared-this"
    data = {"source": str(raw_corpus), "cache_dir": str(cache), "micro_batch_size": 2}
    config = config_file(tmp_path, tiny_corpus, "unprepared", micro_batch=2, max_steps=2, data=data)
    result = torchrun(tmp_path, config)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("tinyseek prepare: tokenized") == 1
    assert result.stderr.count("tinyseek prepare: reusing") == 1  # the rank that waited for the lock
    assert len([folder for folder in cache.iterdir() if folder.is_dir()]) == 1
    run_dir = tmp_path / "unprepared" / "run"
    assert [(run_dir / f"process_group_rank{rank}.txt").read_text() for rank in (0, 1)] == ["False", "False"]
