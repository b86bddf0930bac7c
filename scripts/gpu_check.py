"""
Runs the paths a laptop GPU takes, on whatever accelerator this machine has (CPU too), in a few
minutes, and prints one line per check; the first failure stops it with a non-zero exit:
  1. the laptop config, shrunk, trains in the auto dtype (bf16 on GPUs that have it) with compile
  2. a run killed after a checkpoint and resumed replays the uninterrupted run's losses
  3. two processes with DDP log the losses of one (where there are two GPUs)
  4. sample.py with --compile=True
  5. both diffusion LCMs (One-Tower, Two-Tower) train and sample the same way (compiled)
  6. bench.py's training and generation figures
$ python scripts/gpu_check.py
$ python scripts/gpu_check.py --device=cpu --compile=False   # the same checks, quicker, on a CPU
"""
import json, os, signal, subprocess, sys, tempfile, time

import torch

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)
from common import configure, get_device  # noqa: E402

device = ""              # '' = autodetect
compile = True           # train and sample with torch.compile
max_iters = 60
configure(globals(), sys.argv[1:])
device = get_device(device)
env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
tmp = tempfile.mkdtemp(prefix="gpu_check_")
start = time.time()

def run(args, check=True, cmd=(sys.executable,)):
    p = subprocess.run([*cmd, *args], cwd=HERE, env=env, capture_output=True, text=True)
    if check and p.returncode != 0:
        fail(f"{' '.join(args[:2])} exited {p.returncode}: {(p.stderr or p.stdout).strip()[-1500:]}")
    return p

def ok(what):
    print(f"ok   {what} ({time.time() - start:.0f} s)", flush=True)

def fail(what):
    print(f"FAIL {what}", flush=True)
    sys.exit(1)

def losses(out):
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    return {r["iter"]: r["loss"] for r in log if "loss" in r}

def trained(p, out, last, what):
    """the losses of a finished training run; it fails where compile fell back to eager or the loss
    did not fall"""
    if "cannot compile" in p.stdout:
        fail(p.stdout[p.stdout.index("compile=True"):].splitlines()[0])
    loss = losses(out)
    if not loss[last] < 0.9 * loss[5]:
        fail(f"{what} did not learn: loss {loss[5]:.2f} at 5, {loss[last]:.2f} at {last}")
    return loss

def close(a, b, tol):
    """the largest relative difference of the losses both runs logged, and whether it is within tol"""
    worst = max(abs(a[i] - b[i]) / abs(a[i]) for i in a.keys() & b.keys())
    return worst, worst <= tol

print(f"{device}: {torch.cuda.get_device_name(device) if device.startswith('cuda') else device}, "
      f"torch {torch.__version__}; files in {tmp}")
run(["embed.py", f"--data_root={tmp}", f"--device={device}"])
ok("embed.py: the Lee corpus with MiniLM")

# 1. the laptop config, shrunk to a small model and a few iterations
shrunk = ["train.py", "config/train_laptop_gpu.py", f"--data_root={tmp}", "--dataset=lee",
          f"--device={device}", "--n_layer=2", "--n_head=4", "--n_embd=256", "--block_size=16",
          "--batch_size=16", "--gradient_accumulation_steps=2", "--warmup_iters=10",
          "--eval_interval=20", "--log_interval=5", "--eval_iters=4", f"--lr_decay_iters={max_iters}",
          f"--compile={compile}", "--patience=0"]
p = run([*shrunk, f"--out_dir={tmp}/a", f"--max_iters={max_iters}"])
dtype = next(w for w in ("bfloat16", "float16", "float32") if f"{device} {w}" in p.stdout)
a = trained(p, f"{tmp}/a", max_iters, "training")
ok(f"train.py, laptop config shrunk: {dtype}, compile={compile}, loss {a[5]:.1f} -> {a[max_iters]:.1f}")

# 2. killed once a checkpoint is on disk, then resumed with --init_from=resume alone
proc = subprocess.Popen([sys.executable, *shrunk, f"--out_dir={tmp}/b", f"--max_iters={max_iters}"],
                        cwd=HERE, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
ckpt = f"{tmp}/b/ckpt.pt"
while proc.poll() is None and not os.path.exists(ckpt):
    time.sleep(0.05)
proc.send_signal(signal.SIGKILL)
proc.wait()
done = max(losses(f"{tmp}/b"), default=0)
run(["train.py", "--init_from=resume", f"--out_dir={tmp}/b"])
worst, same = close(a, losses(f"{tmp}/b"), 1e-3)
if done >= max_iters or not same:
    fail(f"resume: killed at iter {done}, losses differ from the uninterrupted run by {worst:.1e}")
ok(f"kill at iter {done} and resume: losses within {worst:.1e} of the uninterrupted run")

# 3. DDP on two GPUs against one process
gpus = torch.cuda.device_count() if device.startswith("cuda") else 0
if gpus >= 2:
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    common = [*shrunk, "--max_iters=20", "--dropout=0.0"]
    run([*common, f"--out_dir={tmp}/one"])
    run([*common, f"--out_dir={tmp}/two"], cmd=torchrun)
    worst, same = close(losses(f"{tmp}/one"), losses(f"{tmp}/two"), 1e-2)
    if not same:
        fail(f"DDP: two processes log losses {worst:.1e} away from one process's")
    ok(f"DDP on 2 GPUs: losses within {worst:.1e} of one process's")
else:
    print(f"skip DDP: {gpus} GPU(s) here")

# 4. sample.py, compiled
p = run(["sample.py", f"--out_dir={tmp}/a", f"--device={device}", f"--compile={compile}",
         "--max_new_concepts=8"])
if "cannot compile" in p.stdout or "concepts, stopped by" not in p.stdout:
    fail(f"sample.py: {p.stdout.strip()[-500:]}")
ok(f"sample.py --compile={compile}: {p.stdout.strip().splitlines()[-2]}")

# 5. the diffusion LCMs, compiled, then sampled
for tower in ("one_tower", "two_tower"):
    p = run([*shrunk, f"--model_type={tower}", f"--out_dir={tmp}/{tower}", "--max_iters=20"])
    d = trained(p, f"{tmp}/{tower}", 20, f"the {tower}")
    p = run(["sample.py", f"--out_dir={tmp}/{tower}", f"--device={device}", f"--compile={compile}",
             "--max_new_concepts=4"])
    if "cannot compile" in p.stdout or "concepts, stopped by" not in p.stdout:
        fail(f"sample.py on the {tower}: {p.stdout.strip()[-500:]}")
    ok(f"{tower}, compile={compile}: loss {d[5]:.1f} -> {d[20]:.1f}, then 4 sampled concepts")

# 6. bench.py's figures, shortened
p = run(["bench.py", f"--device={device}", "--embed=False", "--steps=5", f"--compile={compile}",
         f"--out={tmp}/bench.json"])
for line in p.stdout.splitlines():
    print(f"     {line}")
ok("bench.py")
print(f"all checks passed in {time.time() - start:.0f} s")
