"""Training faults, injected for real: SIGKILL a Ray Train worker process in the middle of epoch 2.

The loop is raypipe's own ``train_loop_per_worker`` inside ``fault_probe.probe_loop``, which only
(1) writes each worker's PID, rank, epoch and step to a file in ``tmp_path`` and (2) on the first
attempt parks rank ``KILLED_RANK`` after ``KILL_AT_STEP`` optimizer steps of epoch 2, so the kill
lands mid-epoch on a loaded 2-core machine every time (the parked worker has already applied those
steps, none of them checkpointed). The test thread then ``os.kill(pid, SIGKILL)``s that process:
no Python exception, no clean shutdown. ``FailureConfig(max_failures=1)`` must restart the
worker group from the epoch-1 checkpoint and finish, into the same MLflow run.

The same run, same seed, without the kill is the baseline for the final accuracy.

A kill with ``max_failures=0`` must end the run FAILED with the error and keep its best
checkpoint. Slow tier: the kill landing right after a report (before the controller has seen it),
and the mid-epoch kill with its uninterrupted baseline (two trainings, ~90 s on 2 cores). The
default tier keeps a worker group restarted from its checkpoint into one MLflow run in
``test_multinode.py`` (removing a node kills the worker on it) and the no-retries-left case here.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from fault_probe import events as _events
from fault_probe import probe_loop

from raypipe.config import config_from_dict

pytestmark = pytest.mark.ray

KILLED_RANK = 0  # rank 0 writes the checkpoints and the metrics MLflow logs: the harder case
KILL_AT_STEP = 5  # of 18 steps per epoch (288 training rows, 2 workers, batch 8)
EPOCHS = 4


def _cfg(tiny_config, tmp: Path, name: str, lora: bool = False):
    tree = tiny_config.model_dump(mode="json")
    tree["workdir"] = str(tmp / name)
    tree["scaling"].update(num_workers=2, max_failures=1)
    tree["train"].update(epochs=EPOCHS, batch_size=8, keep_checkpoints=1)
    if lora:
        tree["model"]["peft"] = {"r": 8, "alpha": 16}
        tree["train"]["lr"] = 1e-2
    return config_from_dict(tree)


def _mlflow(cfg):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=cfg.resolved_tracking_uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    return client, client.search_runs([exp.experiment_id])


class Kill:
    """Runs training with the probe loop while a thread SIGKILLs the parked worker.

    ``wait_for_registration``: kill only once the Train controller has registered the epoch-1
    checkpoint (it learns of reports by polling the workers, so a report made moments before the
    kill dies with the worker; minutes-long epochs leave plenty of time, 18 tiny steps do not).
    """

    def __init__(self, cfg, tmp: Path, run_name: str, wait_for_registration: bool = True):
        self.cfg, self.run_name, self.wait = cfg, run_name, wait_for_registration
        self.state_file, self.park_file = tmp / f"{run_name}-state.jsonl", tmp / f"{run_name}-parked"
        self.snapshot = Path(cfg.resolved_storage_path) / run_name / "checkpoint_manager_snapshot.json"
        self.killed: dict = {}

    def controller_has_epoch_1(self) -> bool:
        try:
            doc = json.loads(self.snapshot.read_text())
        except (OSError, ValueError):
            return False
        return any(r["metrics"].get("epoch") == 1 for r in doc.get("checkpoint_results", []))

    def _killer(self) -> None:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            parked = [e for e in self.events() if e["event"] == "parked"]
            if parked and (not self.wait or self.controller_has_epoch_1()):
                e = parked[0]
                self.killed.update(e, registered=self.controller_has_epoch_1(), waited_s=time.time() - e["t"])
                os.kill(e["pid"], signal.SIGKILL)
                self.killed["killed_at"] = time.time()
                return
            time.sleep(0.05)

    def events(self) -> list[dict]:
        return _events(self.state_file)

    def run(self):
        from raypipe.training import run

        thread = threading.Thread(target=self._killer, daemon=True)
        thread.start()
        t0 = time.time()
        try:
            return run(self.cfg, run_name=self.run_name,
                       train_loop=probe_loop(str(self.state_file), str(self.park_file), KILLED_RANK, KILL_AT_STEP))
        finally:
            self.wall_s = time.time() - t0
            thread.join(5)

    def check_killed_mid_epoch_2(self) -> None:
        """The kill happened in epoch 2, mid-epoch, to a live worker that then really was gone."""
        k = self.killed
        assert k, "the worker never reached the kill point"
        assert (k["epoch"], k["step"], k["rank"]) == (2, KILL_AT_STEP + 1, KILLED_RANK)
        first = {e["rank"]: e for e in self.events() if e["event"] == "start" and e["pid"] == k["pid"]}
        assert first and first[KILLED_RANK]["epoch"] == 0  # the killed process ran from the first attempt
        with pytest.raises(ProcessLookupError):
            os.kill(k["pid"], 0)

    def restarts(self) -> list[dict]:
        """The loop starts after the kill: one per rank of the new worker group."""
        return [e for e in self.events() if e["event"] == "start" and e["t"] > self.killed["killed_at"]]


def _check_one_finished_run(cfg, result) -> dict:
    """One MLflow run, FINISHED, exactly one value per epoch for every metric, the failure recorded."""
    client, runs = _mlflow(cfg)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run_id = runs[0].info.run_id
    assert run_id == result.mlflow_run_id
    for key in ("train_loss", "val_loss", "val_accuracy", "val_macro_f1", "lr", "samples_per_s"):
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert steps == list(range(1, EPOCHS + 1)), (key, steps)
    assert [h["epoch"] for h in result.history] == list(range(1, EPOCHS + 1))
    tags = runs[0].data.tags
    assert tags["raypipe.worker_failures"] == "1" and tags["raypipe.last_worker_error"]
    return tags


@pytest.mark.slow  # two trainings (~90 s); the default tier restarts a worker group in test_multinode.py
def test_sigkill_of_a_worker_mid_epoch_resumes_from_the_checkpoint_into_one_finished_run(
    ray_local, tiny_config, tmp_path, capfd
):
    from raypipe.training import run

    cfg = _cfg(tiny_config, tmp_path, "killed")
    kill = Kill(cfg, tmp_path, "killed-run")
    result = kill.run()

    kill.check_killed_mid_epoch_2()
    restarts = kill.restarts()
    assert sorted(e["rank"] for e in restarts) == [0, 1], kill.events()  # a new worker group came up ...
    assert all(e["resumed"] and e["epoch"] == 1 for e in restarts)  # ... from the epoch-1 checkpoint
    assert kill.killed["pid"] not in {e["pid"] for e in restarts}
    recovery_s = min(e["t"] for e in restarts) - kill.killed["killed_at"]
    ended = [e for e in kill.events() if e["event"] == "end"]
    assert sorted(e["rank"] for e in ended) == [0, 1] and all(e["resumed"] for e in ended)
    assert "resumed from the checkpoint of epoch 1" in capfd.readouterr().out
    tags = _check_one_finished_run(cfg, result)

    # Baseline: the same config and seed, no kill.
    t1 = time.time()
    base = run(_cfg(tiny_config, tmp_path, "baseline"))
    base_wall = time.time() - t1
    acc = {h["epoch"]: h["val_accuracy"] for h in result.history}
    base_acc = {h["epoch"]: h["val_accuracy"] for h in base.history}
    loss, base_loss = result.history[-1]["val_loss"], base.history[-1]["val_loss"]
    print("\nRELIABILITY worker-kill", json.dumps({
        "killed": {k: kill.killed[k] for k in ("rank", "epoch", "step")},
        "waited_for_registration_s": round(kill.killed["waited_s"], 2), "recovery_s": round(recovery_s, 1),
        "wall_s": round(kill.wall_s, 1), "baseline_wall_s": round(base_wall, 1),
        "val_accuracy": acc, "baseline_val_accuracy": base_acc,
        "final_val_loss": loss, "baseline_final_val_loss": base_loss,
        "last_worker_error": tags["raypipe.last_worker_error"][:120],
    }))
    # Seeds are per (seed, epoch, rank) and the optimizer/scheduler state is in the checkpoint, so
    # the replayed epochs match the uninterrupted run (measured: identical to the last digit).
    assert abs(acc[EPOCHS] - base_acc[EPOCHS]) <= 0.01 + 1e-9, (acc, base_acc)
    assert acc[EPOCHS] >= 0.9, acc  # and the run really learned (chance is 1/3)
    assert abs(loss - base_loss) <= 0.01, (loss, base_loss)


@pytest.mark.slow
def test_sigkill_mid_epoch_with_lora_resumes_the_adapter_and_matches_the_uninterrupted_run(
    ray_local, tiny_config, tmp_path, capfd
):
    """The same kill with ``model.peft`` on: the restarted group loads the epoch-1 adapter (and
    head) onto the base, not a full model, and ends where the run without the kill ends."""
    from raypipe.training import run

    cfg = _cfg(tiny_config, tmp_path, "lora-killed", lora=True)
    kill = Kill(cfg, tmp_path, "lora-killed-run")
    result = kill.run()
    kill.check_killed_mid_epoch_2()
    restarts = kill.restarts()
    assert sorted(e["rank"] for e in restarts) == [0, 1] and all(e["resumed"] and e["epoch"] == 1 for e in restarts)
    assert "resumed from the checkpoint of epoch 1" in capfd.readouterr().out
    _check_one_finished_run(cfg, result)
    assert (Path(result.best_checkpoint) / "adapter_model.safetensors").is_file()
    base = run(_cfg(tiny_config, tmp_path, "lora-baseline", lora=True))
    loss, base_loss = result.history[-1]["val_loss"], base.history[-1]["val_loss"]
    print("\nRELIABILITY worker-kill-lora", json.dumps({
        "final_val_loss": loss, "baseline_final_val_loss": base_loss,
        "val_accuracy": result.history[-1]["val_accuracy"], "baseline_val_accuracy": base.history[-1]["val_accuracy"],
        "wall_s": round(kill.wall_s, 1)}))
    assert abs(loss - base_loss) <= 0.01, (loss, base_loss)
    assert abs(result.history[-1]["val_accuracy"] - base.history[-1]["val_accuracy"]) <= 0.01 + 1e-9


@pytest.mark.slow
def test_sigkill_right_after_a_report_restarts_from_what_the_controller_knew(ray_local, tiny_config, tmp_path):
    """The kill lands ~0.3 s after epoch 1 was reported, before the controller polled it: the
    restarted group gets the checkpoint before it (none here, so epoch 1 again). Slower to
    recover, but still one FINISHED run with exactly one value per epoch."""
    cfg = _cfg(tiny_config, tmp_path, "early")
    kill = Kill(cfg, tmp_path, "early-kill", wait_for_registration=False)
    result = kill.run()
    kill.check_killed_mid_epoch_2()
    restarts = kill.restarts()
    assert sorted(e["rank"] for e in restarts) == [0, 1]
    resumed_from = {e["epoch"] for e in restarts}
    assert len(resumed_from) == 1 and resumed_from <= {0, 1}
    _check_one_finished_run(cfg, result)
    print("\nRELIABILITY worker-kill-early", json.dumps({
        "controller_had_epoch_1_at_kill": kill.killed["registered"], "restarted_after_epoch": resumed_from.pop(),
        "recovery_s": round(min(e["t"] for e in restarts) - kill.killed["killed_at"], 1),
        "wall_s": round(kill.wall_s, 1), "final_val_accuracy": result.history[-1]["val_accuracy"],
    }))


def test_sigkill_with_no_retries_left_ends_the_mlflow_run_failed_and_keeps_the_best_checkpoint(
    ray_local, tiny_config, tmp_path
):
    from raypipe.errors import TrainingError
    from raypipe.model import read_meta
    from raypipe.predict import Predictor

    tree = _cfg(tiny_config, tmp_path, "no-retries").model_dump(mode="json")
    tree["scaling"]["max_failures"] = 0
    cfg = config_from_dict(tree)
    kill = Kill(cfg, tmp_path, "no-retries")
    with pytest.raises(TrainingError, match="best checkpoint so far: ") as err:
        kill.run()
    kill.check_killed_mid_epoch_2()
    assert kill.restarts() == []  # no second attempt

    client, runs = _mlflow(cfg)
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    tags = runs[0].data.tags
    assert tags["raypipe.error"] and tags["raypipe.best_checkpoint"]
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "val_loss")] == [1]
    best = tags["raypipe.best_checkpoint"]
    assert best in str(err.value) and read_meta(best)["epoch"] == 1
    Predictor.from_dir(best, device="cpu").predict(["goal match"])  # still loads and predicts
    print("\nRELIABILITY worker-kill-exhausted", json.dumps({
        "mlflow_status": runs[0].info.status, "error": tags["raypipe.error"][:160], "best_checkpoint_epoch": 1,
        "wall_s": round(kill.wall_s, 1),
    }))


@pytest.mark.slow
def test_sigkill_mid_epoch_of_sft_with_lora_and_gradient_checkpointing_resumes_like_the_uninterrupted_run(
    ray_local, tiny_lm_dir, tmp_path, capfd
):
    """task sft (a causal LM, LoRA by default, gradient checkpointing): the restarted group loads
    the epoch-1 adapter and optimizer state and ends at the validation loss of the run without
    the kill."""
    from raypipe.training import run
    from tests.conftest import SFT_PAIRS

    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in SFT_PAIRS * 24))

    def cfg(name: str):
        return config_from_dict({
            "task": "sft", "workdir": str(tmp_path / name),
            "data": {"path": str(data), "max_length": 48},
            "model": {"name": str(tiny_lm_dir)},
            "train": {"epochs": EPOCHS, "batch_size": 4, "lr": 1e-2, "warmup_ratio": 0.0, "keep_checkpoints": 1,
                      "gradient_checkpointing": True},
            "scaling": {"num_workers": 2, "use_gpu": False, "cpus_per_worker": 0.5, "max_failures": 1},
        })

    killed = cfg("sft-killed")
    kill = Kill(killed, tmp_path, "sft-killed-run")
    result = kill.run()
    kill.check_killed_mid_epoch_2()
    restarts = kill.restarts()
    assert sorted(e["rank"] for e in restarts) == [0, 1] and all(e["resumed"] and e["epoch"] == 1 for e in restarts)
    assert "resumed from the checkpoint of epoch 1" in capfd.readouterr().out
    assert [h["epoch"] for h in result.history] == list(range(1, EPOCHS + 1))
    assert (Path(result.best_checkpoint) / "adapter_model.safetensors").is_file()
    base = run(cfg("sft-baseline"))
    loss, base_loss = result.history[-1]["val_loss"], base.history[-1]["val_loss"]
    print("\nRELIABILITY worker-kill-sft", json.dumps({"final_val_loss": loss, "baseline_final_val_loss": base_loss}))
    assert abs(loss - base_loss) <= 0.01, (loss, base_loss)
    assert loss < result.history[0]["val_loss"]
