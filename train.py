"""
Trains a Base-LCM, a causal transformer that predicts the next concept (sentence embedding) by
MSE, or a diffusion LCM (diffusion.py): from scratch, or finetuning a trained one on new data.
Runs on one CPU, one GPU, or several processes with DDP (nccl on GPUs, gloo on CPUs).

$ python train.py                                  # small model on the offline default (data/lee)
$ python train.py config/train_diffusion.py        # the Two-Tower diffusion LCM, in out-diffusion
$ python train.py --dataset=pairs --init_from=out --out_dir=out-ft  # finetune on prompt -> answer
$ torchrun --standalone --nproc_per_node=4 train.py config/train_laptop_gpu.py
"""
import copy, json, math, os, sys, time

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import common, datafiles, metrics, quant
from checkpoints import MODELS, build_model, model_from

# I/O
out_dir = "out"
eval_interval = 25       # iterations between evaluations (and checkpoints)
log_interval = 10
eval_iters = 20          # evaluation batches of fixed validation windows
eval_only = False        # evaluate out_dir's checkpoint instead: runs eval.py (with its options too)
always_save_checkpoint = False  # False: keep the best val loss (small data overfits); True: latest
init_from = "scratch"    # 'scratch', 'resume' (out_dir/ckpt.pt), or a run's out_dir/ckpt to finetune
# data
dataset = "lee"          # reads data_root/dataset, built by embed.py
data_root = "data"
batch_size = 32          # windows per micro-batch
gradient_accumulation_steps = 1  # micro-batches in the global batch, shared by all processes
block_size = 16          # context in concepts (Lee documents: 10 sentences on average)
# model
model_type = "baselcm"   # 'baselcm'; the diffusion LCMs (diffusion.py), one_tower, two_tower; the
                         # Quant-LCMs (quant.py), quant_c, quant_d
n_layer = 4
n_head = 4
n_embd = 256
dropout = 0.3            # paper: 0.1 on a large corpus; the Lee corpus has 2.7k sentences
bias = False
rope_theta = 10000.0
n_steps = 100            # diffusion: timesteps of the noise schedule (paper: 100)
cfg_dropout = 0.15       # diffusion: share of noisy concepts trained without context (guidance)
n_denoiser = 2           # the Two-Tower's denoiser blocks (and a Quant-LCM's)
denoiser_rope = True     # its cross-attention finds the context by relative position (RoPE); False:
                         # by content alone, the paper's (docs/results.md)
last_step_share = 0.0    # diffusion: share of targets trained from pure noise (the conditional mean)
n_levels = 8             # Quant-LCMs (quant.py): codebooks
n_units = 0              # Quant-LCMs: units a codebook; 0 = from the data (quant.units_for)
# AdamW, warm-up then cosine decay (paper: lr 4e-4, betas 0.9/0.95, eps 1e-5, weight decay 0.1)
learning_rate = 4e-4
max_iters = 0            # 0 = follow the data: `epochs` passes over the training concepts
epochs = 20.0
patience = 4             # stop after this many evaluations without a better val loss; 0 = never
ema = 0.0                # evaluate and save a moving average of the weights, of this decay; 0 = the weights
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
eps = 1e-5
grad_clip = 1.0          # 0 = off
decay_lr = True
warmup_iters = 20
lr_decay_iters = 0       # 0 = max_iters
min_lr = 4e-5
wandb_log = False        # log to Weights & Biases (`wandb login`, or WANDB_MODE=offline)
wandb_project = "baselcm"
wandb_run_name = ""      # '' = out_dir
# system
device = ""              # '' = autodetect: cuda, mps, cpu
dtype = ""               # '' = bf16 on GPUs that have it, else fp16; fp32 on a Mac and a CPU
compile = False          # torch.compile the model
backend = ""             # DDP: '' = nccl on cuda, gloo otherwise
seed = 1337              # the weights' init; each iteration's draws come from (seed, iteration)
config_keys = common.knobs(globals())
given = common.configure(globals(), sys.argv[1:])

# -----------------------------------------------------------------------------
# a new model; or a checkpoint to go on with (resume) or to finetune (another run's)
ckpt_path = os.path.join(out_dir, "ckpt.pt")
resume = init_from == "resume"
finetune = init_from not in ("scratch", "resume")
if resume or finetune:
    source = ckpt_path if resume else init_from
    checkpoint = common.load_checkpoint(source, mmap=False)
    # resuming takes the run's settings, finetuning its model's, but for those given here
    common.take_settings(globals(), given, checkpoint, source, finetune)
config = {k: globals()[k] for k in config_keys}
common.check_train_settings(config, MODELS)

# -----------------------------------------------------------------------------
# devices and processes: with torchrun, world processes share each global batch (DDP)
device = common.get_device(device)
rank, world, device = common.init_distributed(device, backend)
ddp = torch.distributed.is_initialized()
master = rank == 0
ctx, dtype = common.autocast(dtype, device)
torch.backends.cuda.matmul.allow_tf32 = True
if master:
    common.writable_dir(out_dir, "out_dir")

# -----------------------------------------------------------------------------
# data: memmaps, never the whole set in RAM
data_dir = os.path.join(data_root, dataset)
meta = common.load_meta(data_dir)
if resume or finetune:
    # the checkpoint's concept space; resuming, its data too, unless another is named
    common.check_trained_on(data_dir, meta, checkpoint["data"], source, "dataset",
                            finetune or "dataset" in given)
# answers: where each prompt -> answer pair's answer starts (the loss covers answers only), else None
train_rows, train_offsets, train_answers = datafiles.load_split(data_dir, "train", meta)
val_rows, val_offsets, val_answers = datafiles.load_split(data_dir, "val", meta)
concepts_per_iter = gradient_accumulation_steps * batch_size * block_size
if not max_iters:
    # the same number of passes over the data, whatever its size
    max_iters = math.ceil(epochs * meta["train_rows"] / concepts_per_iter)
lr_decay_iters = lr_decay_iters or max_iters
# what a checkpoint keeps of its data: for sample.py, and the checks that refuse to mix datasets
data_facts = {k: meta.get(k) for k in ("encoder", "lang", "d_emb", "eot", "spacy_model", "max_chars",
                                       "key", "prompt_end", "pairs")} | {"dir": os.path.abspath(data_dir)}
val_batches = list(datafiles.eval_batches(val_rows, val_offsets, block_size, batch_size,
                                          eval_iters * batch_size, device, val_answers))

# -----------------------------------------------------------------------------
# model
torch.manual_seed(seed)
if resume or finetune:
    # its weights and normalizer (finetuning: a dropout of its own)
    model = model_from(checkpoint, dropout=dropout)
else:
    units = n_units or quant.units_for(meta["train_rows"])
    model = build_model(model_type, config | {"d_emb": meta["d_emb"], "n_units": units})
if not resume:
    # this data's numbers: the normalizer (a new model's), the training mean (the prediction without
    # context, for guidance), the stop head's bias (the share of ends) and prior (the texts' lengths)
    if not finetune:
        model.normalizer.center.copy_(torch.tensor(meta["normalizer"]["center"]))
        model.normalizer.scale.copy_(torch.tensor(meta["normalizer"]["scale"]))
    model.normalizer.mean.copy_(torch.tensor(meta["mean"]))
    stop_bias, stop_prior = datafiles.stop_prior(train_offsets, train_answers, len(model.stop_prior))
    model.stop.bias.data.fill_(stop_bias)
    model.stop_prior.copy_(torch.from_numpy(stop_prior))
    if hasattr(model, "codebooks") and not finetune:
        # a Quant-LCM's codebooks, fitted in the normalized space it predicts
        model.fit_codebooks(train_rows)
model.to(device)
# a resumed run goes on from its checkpoint's counts
iter_num = checkpoint["iter_num"] if resume else 0
best_val_loss = checkpoint["best_val_loss"] if resume else float("inf")
evals_since_best = checkpoint["evals_since_best"] if resume else 0
scaler = torch.amp.GradScaler(torch.device(device).type, enabled=dtype == "float16")
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), eps)
if resume:
    common.load_optimizer(optimizer, scaler, checkpoint)
raw_model = model
# what is evaluated and saved: the weights, or their moving average (ema: steadier between evaluations),
# the weights trained then kept beside it, to resume
averaged = copy.deepcopy(raw_model).requires_grad_(False) if ema else raw_model
if ema and resume:
    raw_model.load_state_dict(checkpoint.get("trained") or checkpoint["model"])
if compile and common.can_compile(device):
    model = torch.compile(model)
if ddp:
    model = DDP(model, device_ids=[torch.device(device)] if device.startswith("cuda") else None)

def get_lr(it):
    # linear warm-up, then cosine decay to min_lr
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)

# the paper's baselines, copying the last concept and predicting the training mean, never change
train_mean = torch.tensor(meta["mean"], device=device)
baselines = metrics.evaluate(metrics.baselines(train_mean), val_batches, raw_model.normalizer)

@torch.no_grad()
def evaluate():
    """The model's next-concept metrics on the validation windows (a diffusion model's: also its own
    denoising loss), beside the baselines'"""
    averaged.eval()
    # the model's point prediction: a Base-LCM's, a diffusion model's conditional mean (model.point)
    r = metrics.evaluate({"model": metrics.predictor(averaged, ctx, **raw_model.point)}, val_batches,
                         raw_model.normalizer)
    if hasattr(raw_model, "denoising_loss"):
        with ctx:
            r["model"]["denoising"] = averaged.denoising_loss(val_batches)
    raw_model.train()
    return r | baselines

# -----------------------------------------------------------------------------
# the run's log: a JSON line a record in out_dir/log.jsonl, and W&B's charts if wandb_log
if master:
    log_file = open(os.path.join(out_dir, "log.jsonl"), "a" if resume else "w")
    wandb_run = None
    if wandb_log:
        # imported here only: a missing or broken wandb, or no login, is one line
        with common.one_line("--wandb_log=True, but wandb does not import", "pip install wandb"):
            import wandb
        offline = os.environ.get("WANDB_MODE") in ("offline", "disabled")
        common.require(offline or wandb.login(prompt=False), "--wandb_log=True, but W&B has no login: "
                       "run `wandb login`, or set WANDB_MODE=offline")
        # a resumed run goes on with its W&B run
        run_id = checkpoint["wandb_id"] if resume else None
        wandb_run = wandb.init(project=wandb_project, name=wandb_run_name or out_dir, config=config,
                               id=run_id, resume="allow" if resume else None)

def log(record):
    log_file.write(json.dumps(record) + "\n")
    log_file.flush()
    if wandb_run and "val" in record:
        wandb_run.log({f"val/{k}/{m}": v for k, r in record["val"].items() for m, v in r.items()
                       if m in ("loss", "l2", "ca")}, record["iter"])
    elif wandb_run and "loss" in record:
        train = {"train/loss": record["loss"]} | {k: record[k] for k in ("lr", "ms", "mfu")}
        wandb_run.log(train, record["iter"])

# -----------------------------------------------------------------------------
# training loop
if master:
    peak = metrics.measure_peak_flops(device, getattr(torch, dtype))
    print(f"{sum(p.numel() for p in raw_model.parameters()) / 1e6:.2f}M parameters, "
          f"{meta['train_rows']} train concepts ({meta['encoder']}, d_emb {meta['d_emb']}), "
          f"{max_iters} iterations ({max_iters * concepts_per_iter / meta['train_rows']:.1f} epochs), "
          f"{device} {dtype}{f', {world} processes' if ddp else ''}, peak {peak / 1e9:.1f} GFLOP/s")
t0 = loop_start = time.time()
t0_iter = first_iter = iter_num
while True:
    lr = get_lr(iter_num) if decay_lr else learning_rate
    for group in optimizer.param_groups:
        group["lr"] = lr
    if iter_num % eval_interval == 0 or iter_num == max_iters:
        stop = torch.zeros((), device=device)
        if master:
            r = evaluate()
            denoising = r["model"].get("denoising")
            print(f"step {iter_num}: val loss {r['model']['loss']:.2f} (copy {r['copy']['loss']:.2f}, mean "
                  f"{r['mean']['loss']:.2f}), l2 {r['model']['l2']:.4f}, CA {100 * r['model']['ca']:.1f}%"
                  + ("" if denoising is None else f", denoising loss {denoising:.2f}"))
            log({"iter": iter_num, "val": r})
            if iter_num > 0:
                evals_since_best += 1
                # the best is the point prediction's (a diffusion model's conditional mean); a Quant-LCM's,
                # a sum of centroids, says little early on: its own loss on the windows decides
                val_loss = r["model"]["denoising" if hasattr(raw_model, "codebooks") else "loss"]
                if val_loss < best_val_loss:
                    best_val_loss = val_loss
                    evals_since_best = 0
                if evals_since_best == 0 or always_save_checkpoint:
                    checkpoint = {"model": averaged.state_dict(), "optimizer": optimizer.state_dict(),
                                  "model_args": raw_model.config.__dict__, "iter_num": iter_num,
                                  "best_val_loss": best_val_loss, "config": config,
                                  # what sampling and the checks need of the data; the rest of the run
                                  "data": data_facts, "scaler": scaler.state_dict(),
                                  "evals_since_best": evals_since_best,
                                  "wandb_id": wandb_run and wandb_run.id,
                                  "trained": raw_model.state_dict() if ema else None}
                    common.atomic_save(checkpoint, ckpt_path)
            stop.fill_(patience > 0 and evals_since_best >= patience)
        if ddp:
            # the processes stop together
            torch.distributed.broadcast(stop, 0)
        if stop:
            if master:
                print(f"no better val loss in {patience} evaluations: stopping; the best "
                      f"({best_val_loss:.2f}) is in {ckpt_path}")
            break
        # evaluation is not training time
        t0 = time.time()
        t0_iter = iter_num
    if iter_num >= max_iters:
        break
    # each iteration draws from seeds of its own: the windows alike on every process, dropout and noise
    # per process; so a resumed run draws what an unbroken one would have
    rng = np.random.default_rng([seed, iter_num])
    torch.manual_seed(int(rng.integers(2 ** 31)) + rank)
    # one global batch of windows; this process takes its share of them, in micro-batches
    windows = gradient_accumulation_steps * batch_size
    starts, ends, first = datafiles.sample_windows(rng, train_offsets, windows, block_size, train_answers)
    n_targets = datafiles.count_targets(starts, ends, first, block_size)
    share = np.array_split(np.arange(len(starts)), world)[rank]
    micro_batches = np.array_split(share, math.ceil(len(share) / batch_size))
    loss_sum = torch.zeros((), device=device)
    for i, micro in enumerate(micro_batches):
        x, y, mask, eot = datafiles.get_batch(train_rows, starts[micro], ends[micro], first[micro],
                                              block_size, device)
        if ddp:
            # sync gradients on the last micro-step only
            model.require_backward_grad_sync = i == len(micro_batches) - 1
        with ctx:
            _, loss = model(x, y, mask, eot)
        # the micro-batch's mean over its targets -> its part of the mean over the global batch's; times
        # world, as DDP averages the processes' gradients: the gradient does not depend on the sharing
        loss = loss * mask.sum() / n_targets * world
        loss_sum += loss.detach()
        scaler.scale(loss).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if ema:
        for a, w in zip(averaged.parameters(), raw_model.parameters()):
            a.lerp_(w.detach(), 1 - ema)
    iter_num += 1
    if ddp and iter_num % log_interval == 0:
        # the global batch's loss: each process holds its share
        torch.distributed.all_reduce(loss_sum)
    if master and iter_num % log_interval == 0:
        # .item() syncs with the device: only when logging
        loss_val = loss_sum.item() / world
        dt = (time.time() - t0) / (iter_num - t0_iter)
        # the global batch's FLOPs over the peak of all processes (each measured like this one's)
        mfu = raw_model.flops_per_concept() * concepts_per_iter / dt / (peak * world)
        print(f"iter {iter_num}: loss {loss_val:.2f}, lr {lr:.2e}, {dt * 1000:.1f}ms, "
              f"{n_targets / dt:.0f} concepts/s, mfu {100 * mfu:.1f}%")
        log({"iter": iter_num, "loss": loss_val, "lr": lr, "ms": dt * 1000, "concepts_per_s": n_targets / dt,
             "mfu": mfu})
        t0 = time.time()
        t0_iter = iter_num

if master:
    loop_ms = 1000 * (time.time() - loop_start) / max(1, iter_num - first_iter)
    print(f"{iter_num - first_iter} iterations, {loop_ms:.1f} ms each with everything")
    log({"iter": iter_num, "loop_ms": loop_ms})
# the DDP wrapper holds the process group: dropped first, so that the group ends with the run
del model
common.end_distributed()
