"""
train.py as a user runs it: learning, exact resume after a kill, training length and early stopping,
resume and evaluation following the checkpoint, finetuning, DDP on two gloo processes, compile's
fallback, W&B. All end to end (slow).
"""
import json, os, signal, subprocess, sys, time

import numpy as np
import pytest
import torch

import checkpoints
from conftest import ENV, HERE, TORCHRUN, TRAIN, log_of, rotation_docs, run, write_dataset

DDP = TORCHRUN + [os.path.join(HERE, "train.py")]

pytestmark = pytest.mark.slow

def test_training_learns_a_next_concept_rule_far_better_than_copying(rotation_data, tmp_path):
    out = tmp_path / "out"
    run("train.py", f"--data_root={rotation_data}", f"--out_dir={out}", "--max_iters=150",
        "--eval_interval=150", "--n_embd=64", "--batch_size=16", "--learning_rate=2e-3",
        "--dropout=0.0", *TRAIN[5:], cwd=tmp_path)
    first, last = [r["val"] for r in log_of(out) if "val" in r]
    assert last["model"]["loss"] < 0.3 * last["copy"]["loss"]
    assert last["model"]["loss"] < 0.3 * last["mean"]["loss"]
    assert last["model"]["loss"] < 0.3 * first["model"]["loss"]

def test_a_killed_run_resumed_with_only_init_from_and_out_dir_continues_exactly(rotation_data, tmp_path):
    common = [*TRAIN, f"--data_root={rotation_data}", "--eval_interval=10", "--max_iters=400",
              "--dropout=0.1", "--always_save_checkpoint=True", "--learning_rate=1e-3", "--patience=0"]
    run("train.py", *common, "--out_dir=a", cwd=tmp_path)
    p = subprocess.Popen([sys.executable, os.path.join(HERE, "train.py"), *common, "--out_dir=b"],
                         cwd=tmp_path, env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log, deadline = tmp_path / "b" / "log.jsonl", time.time() + 120
    evaluated = lambda: log.exists() and any("val" in r and r["iter"] >= 30
                                             for r in log_of(log.parent))
    while time.time() < deadline and not evaluated():
        time.sleep(0.01)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert max(r["iter"] for r in log_of(log.parent)) < 400  # really interrupted
    # data_root, lr, max_iters: the checkpoint's
    run("train.py", "--init_from=resume", "--out_dir=b", cwd=tmp_path)
    losses = lambda out: {r["iter"]: r["loss"] for r in log_of(tmp_path / out) if "loss" in r}
    a, b = losses("a"), losses("b")
    assert sorted(b) == list(range(1, 401))
    assert all(abs(a[i] - b[i]) <= 1e-5 * abs(a[i]) for i in range(1, 401)), (a, b)

def test_training_length_follows_the_data_and_stops_when_val_loss_stops_improving(rotation_data, tmp_path):
    rows = json.load(open(rotation_data / "rot" / "meta.json"))["train_rows"]
    p = run("train.py", *TRAIN, f"--data_root={rotation_data}", "--out_dir=e", "--epochs=0.5",
            cwd=tmp_path)
    # half a pass over the training concepts, in batches of 8 windows of 12
    n = -(-rows // (2 * 8 * 12))
    assert f"{n} iterations (0.5 epochs)" in p.stdout
    assert max(r["iter"] for r in log_of(tmp_path / "e")) == n
    # nothing learns: the evaluations at 10 and 15 are no better than at 5
    p = run("train.py", *TRAIN, f"--data_root={rotation_data}", "--out_dir=s", "--learning_rate=0",
            "--eval_interval=5", "--patience=2", cwd=tmp_path)
    assert "no better val loss in 2 evaluations: stopping" in p.stdout
    assert max(r["iter"] for r in log_of(tmp_path / "s")) == 15

@pytest.fixture()
def trained(tmp_path):
    """A tiny model trained on data/rot, and beside it: rot2 (same encoder), wide (another
    d_emb)."""
    rng = np.random.default_rng(2)
    for name, d in (("rot", 16), ("rot2", 16), ("wide", 24)):
        train, eot = rotation_docs(rng, 30, d=d)
        val, _ = rotation_docs(rng, 6, d=d)
        write_dataset(tmp_path / "data", name, train, val, eot)
    run("train.py", *TRAIN, "--out_dir=o", "--max_iters=10", "--eval_interval=5",
        "--learning_rate=1e-3", cwd=tmp_path)
    return tmp_path

def test_resume_and_eval_only_follow_the_checkpoint_and_print_what_changed(trained):
    # data/lee does not exist here
    p = run("train.py", "--init_from=resume", "--out_dir=o", "--max_iters=20", cwd=trained)
    assert "changed from the checkpoint: max_iters 10 -> 20" in p.stdout
    assert max(r["iter"] for r in log_of(trained / "o")) == 20
    assert max(r.get("lr", 0) for r in log_of(trained / "o")) > 4e-4
    run("train.py", "--eval_only=True", "--out_dir=o", cwd=trained)
    assert json.load(open(trained / "o" / "eval.json"))["dataset"] == os.path.join("data", "rot")
    # same encoder: allowed if asked
    p = run("train.py", "--eval_only=True", "--out_dir=o", "--dataset=rot2", cwd=trained)
    assert f"trained on {trained / 'data' / 'rot'}" in p.stdout
    assert json.load(open(trained / "o" / "eval.json"))["dataset"] == os.path.join("data", "rot2")

def test_eval_only_evaluates_from_the_command_line_or_a_config_file_and_never_trains(trained):
    ckpt = (trained / "o" / "ckpt.pt").read_bytes()
    (trained / "evaluate.py").write_text("eval_only = True\nout_dir = 'o'\n")
    for args in (["evaluate.py"], ["--init_from=resume", "--eval_only=True", "--out_dir=o"]):
        (trained / "o" / "eval.json").unlink(missing_ok=True)
        p = run("train.py", *args, cwd=trained)
        assert "validation windows" in p.stdout and json.load(open(trained / "o" / "eval.json"))["iter"] == 10
        assert (trained / "o" / "ckpt.pt").read_bytes() == ckpt

@pytest.mark.parametrize("args, message", [
    (["--init_from=resume", "--n_layer=3"], "the model's settings cannot change"),
    (["--init_from=resume", "--dropout=0.2"], "the model's settings cannot change"),
    (["--eval_only=True", "--dataset=wide"],
     "holds stand-in concepts (d_emb 24), but o/ckpt.pt was trained on"),
    (["--init_from=resume", "rebuilt"],
     "was rebuilt after o/ckpt.pt was trained on it: pass --dataset=rot"),
])
def test_resume_refuses_what_would_make_the_result_meaningless(args, message, trained):
    if "rebuilt" in args:
        meta = json.load(open(trained / "data" / "rot" / "meta.json"))
        json.dump(meta | {"key": "another"}, open(trained / "data" / "rot" / "meta.json", "w"))
    p = run("train.py", *[a for a in args if a != "rebuilt"], "--out_dir=o", cwd=trained,
            check=False)
    assert p.returncode == 1 and message in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr

def test_finetuning_starts_from_the_checkpoints_weights_with_a_fresh_run(trained):
    # the checkpoint on rot2, a dataset of the same encoder
    run("train.py", "--eval_only=True", "--out_dir=o", "--dataset=rot2", cwd=trained)
    before = json.load(open(trained / "o" / "eval.json"))["model"]["loss"]
    run("train.py", *TRAIN[:-1], "--dataset=rot2", "--init_from=o", "--out_dir=ft", "--max_iters=6",
        "--eval_interval=3", "--dropout=0.1", cwd=trained)
    log = log_of(trained / "ft")
    first = [r for r in log if "val" in r][0]
    assert first["iter"] == 0 and abs(first["val"]["model"]["loss"] - before) <= 1e-4 * before
    # its own schedule: the warm-up starts again
    assert [r["iter"] for r in log if "loss" in r][0] == 1 and log[1]["lr"] < 4e-4 / 10
    ckpt = torch.load(trained / "ft" / "ckpt.pt", weights_only=True)
    assert ckpt["config"]["init_from"] == "o" and ckpt["model_args"]["dropout"] == 0.1
    assert ckpt["data"]["dir"] == str(trained / "data" / "rot2")
    base = torch.load(trained / "o" / "ckpt.pt", weights_only=True)
    assert torch.equal(ckpt["model"]["normalizer.center"], base["model"]["normalizer.center"])

@pytest.mark.parametrize("args, message", [
    (["--dataset=wide"], "holds stand-in concepts (d_emb 24), but o was trained on stand-in (d_emb 16)"),
    (["--dataset=rot2", "--n_layer=3"], "--n_layer=3, but o was made with n_layer=2"),
    (["--dataset=rot2", "--out_dir=o"], "is --out_dir's own checkpoint: finetune into another --out_dir"),
    (["--dataset=rot2", "--init_from=nope"], "no checkpoint at nope"),
])
def test_finetuning_refuses_another_concept_space_or_model(args, message, trained):
    p = run("train.py", "--init_from=o", "--out_dir=ft", *args, cwd=trained, check=False)
    assert p.returncode == 1 and message in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not (trained / "ft" / "ckpt.pt").exists()

def test_ddp_on_two_gloo_processes_logs_what_one_process_logs(rotation_data, tmp_path):
    common = [*TRAIN, f"--data_root={rotation_data}", "--eval_interval=15", "--max_iters=15",
              "--dropout=0.0", "--device=cpu"]  # the default: one micro-batch, shared by the two processes
    run("train.py", *common, "--out_dir=single", cwd=tmp_path)
    p = run(DDP, *common, "--out_dir=ddp", cwd=tmp_path)
    assert "2 processes" in p.stdout
    val = lambda out: [r["val"]["model"]["loss"] for r in log_of(tmp_path / out) if "val" in r][-1]
    assert abs(val("ddp") - val("single")) <= 1e-3 * val("single")
    # the global batch's loss, not rank 0's share of it
    loss = lambda out: [r["loss"] for r in log_of(tmp_path / out) if "loss" in r]
    assert len(loss("ddp")) == 15
    assert all(abs(a - b) <= 1e-4 * b for a, b in zip(loss("ddp"), loss("single"))), \
        (loss("ddp"), loss("single"))
    # the global FLOPs over the peak of both processes
    assert all(0 < r["mfu"] <= 1 for r in log_of(tmp_path / "ddp") if "mfu" in r)

@pytest.mark.parametrize("model_type", ["two_tower", "one_tower"])
def test_ddp_trains_the_diffusion_models_and_finetunes_them(model_type, rotation_data, tmp_path):
    # DDP stops at the second step if a parameter gets no gradient (the Two-Tower's two towers)
    common = [*TRAIN, f"--data_root={rotation_data}", f"--model_type={model_type}", "--eval_interval=4",
              "--device=cpu", "--patience=0", "--always_save_checkpoint=True"]
    p = run(DDP, *common, "--max_iters=4", "--out_dir=a", cwd=tmp_path)
    assert "2 processes" in p.stdout
    assert [r["iter"] for r in log_of(tmp_path / "a") if "loss" in r] == [1, 2, 3, 4]
    run("train.py", *common, "--init_from=a", "--max_iters=2", "--out_dir=ft", cwd=tmp_path)
    ckpt = torch.load(tmp_path / "ft" / "ckpt.pt", weights_only=True)
    assert ckpt["config"]["model_type"] == model_type and ckpt["config"]["init_from"] == "a"

def test_a_resumed_ddp_run_replays_each_ranks_dropout_exactly(rotation_data, tmp_path):
    common = [*TRAIN, f"--data_root={rotation_data}", "--eval_interval=10", "--dropout=0.2",
              "--lr_decay_iters=20", "--always_save_checkpoint=True", "--patience=0", "--device=cpu"]
    run(DDP, *common, "--max_iters=20", "--out_dir=a", cwd=tmp_path)
    run(DDP, *common, "--max_iters=10", "--out_dir=b", cwd=tmp_path)
    p = run(DDP, "--init_from=resume", "--out_dir=b", "--max_iters=20", cwd=tmp_path)
    assert "random states" not in p.stdout
    losses = lambda out: {r["iter"]: r["loss"] for r in log_of(tmp_path / out) if "loss" in r}
    a, b = losses("a"), losses("b")
    assert sorted(b) == list(range(1, 21))
    assert all(abs(a[i] - b[i]) <= 1e-5 * abs(a[i]) for i in range(11, 21)), (a, b)

def test_compile_where_it_cannot_work_runs_eager_after_one_line(rotation_data, tmp_path):
    # no C++ compiler: what torch.compile needs on a CPU (a GPU needs triton)
    env = dict(ENV, CXX="/nonexistent/g++")
    p = run("train.py", *TRAIN, f"--data_root={rotation_data}", "--out_dir=o", "--max_iters=3",
            "--eval_interval=3", "--compile=True", cwd=tmp_path, env=env)
    said = [line for line in p.stdout.splitlines() if "compile" in line]
    assert len(said) == 1 and "cpu cannot compile (InvalidCxxCompiler" in said[0], p.stdout
    assert "running eager" in said[0] and "Traceback" not in p.stderr
    assert max(r["iter"] for r in log_of(tmp_path / "o")) == 3

def wandb_records(run_dir):
    """The records of an offline W&B run, from its run-ID.wandb file: a 7-byte header, then a
    LevelDB-style log of 32 KiB blocks (4-byte checksum, 2-byte length, 1-byte type, data)."""
    from wandb.proto import wandb_internal_pb2 as pb
    data = next(run_dir.glob("run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    records = []
    part = b""
    at = 7
    while at + 7 <= len(data):
        if 32768 - at % 32768 < 7:
            # a block's tail too short for a header is padding
            at += 32768 - at % 32768
            continue
        length = int.from_bytes(data[at + 4:at + 6], "little")
        kind = data[at + 6]
        part += data[at + 7:at + 7 + length]
        at += 7 + length
        # 1: a whole record; 4: the last piece of one
        if kind in (1, 4):
            records.append(pb.Record.FromString(part))
            part = b""
    return records

def test_wandb_logs_training_and_evaluation_offline_and_a_resume_continues_the_run(rotation_data,
                                                                                    tmp_path):
    env = dict(ENV, WANDB_MODE="offline", WANDB_DIR=str(tmp_path), WANDB_SILENT="true")
    args = [*TRAIN, f"--data_root={rotation_data}", "--out_dir=o", "--eval_interval=10"]
    run("train.py", *args, "--max_iters=20", "--wandb_log=True", "--log_interval=5",
        cwd=tmp_path, env=env)
    run("train.py", "--init_from=resume", "--out_dir=o", "--max_iters=30", cwd=tmp_path, env=env)
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    ids = {r.name.rsplit("-", 1)[1] for r in runs}
    ckpt = torch.load(tmp_path / "o" / "ckpt.pt", weights_only=True)
    assert ids == {ckpt["wandb_id"]}
    for run_dir, steps in zip(runs, ([5, 10, 15, 20], [25, 30])):
        history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                   for r in wandb_records(run_dir) if r.WhichOneof("record_type") == "history"]
        train = [h for h in history if "train/loss" in h]
        assert [h["_step"] for h in train] == steps
        assert all({"lr", "ms", "mfu"} <= set(h) for h in train)
        val = [h for h in history if "val/model/loss" in h]
        assert val and all({f"val/{k}/{m}" for k in ("model", "copy", "mean")
                            for m in ("loss", "l2", "ca")} <= set(h) for h in val)
    config = [r.run.config for r in wandb_records(runs[0]) if r.WhichOneof("record_type") == "run"]
    assert any(u.key == "n_embd" and json.loads(u.value_json) == 32 for c in config for u in c.update)

@pytest.mark.parametrize("case, message", [
    ("broken", "--wandb_log=True, but wandb does not import (ImportError: no such luck): pip install wandb"),
    ("no login", "W&B has no login: run `wandb login`, or set WANDB_MODE=offline")])
def test_wandb_without_a_working_install_or_a_login_is_one_line(case, message, rotation_data,
                                                                 tmp_path):
    env = {k: v for k, v in ENV.items() if not k.startswith("WANDB_")}
    env |= {"HOME": str(tmp_path), "WANDB_CONFIG_DIR": str(tmp_path), "WANDB_DIR": str(tmp_path)}
    if case == "broken":
        (tmp_path / "wandb").mkdir()
        (tmp_path / "wandb" / "__init__.py").write_text("raise ImportError('no such luck')")
        env["PYTHONPATH"] = str(tmp_path)
    p = run("train.py", *TRAIN, f"--data_root={rotation_data}", "--out_dir=o", "--max_iters=2",
            "--wandb_log=True", cwd=tmp_path, env=env, check=False)
    assert p.returncode == 1 and message in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not (tmp_path / "o" / "ckpt.pt").exists()
