"""
Trains a Base-LCM: a causal transformer that predicts the next sentence embedding (concept) with MSE.
Runs on one CPU, one GPU, or several with DDP (nccl on GPUs, gloo on CPUs).

$ python train.py                                  # small model on the offline default (data/lee)
$ python train.py config/train_laptop_gpu.py --dataset=wiki
$ torchrun --standalone --nproc_per_node=4 train.py config/train_laptop_gpu.py
$ python train.py --eval_only=True --init_from=resume   # the paper's metrics and two baselines
"""
import json, math, os, sys, time
from contextlib import nullcontext

import numpy as np
import torch
from torch.distributed import destroy_process_group, init_process_group
from torch.nn.parallel import DistributedDataParallel as DDP

from baselcm import (BaseLCM, LCMConfig, SentenceBank, atomic_save, coherence_mi, concept_metrics, configure, die,
                     eval_windows, finish_metrics, get_batch, get_device, load_checkpoint, load_encoder, load_meta,
                     load_split, measure_peak_flops, same_space, sample_windows, writable_dir)

# I/O
out_dir = "out"
eval_interval = 25       # iterations between evaluations (and checkpoints)
log_interval = 10
eval_iters = 20          # evaluation batches of fixed validation windows
eval_only = False        # evaluate (model, copy and mean baselines, round-trip l2) and exit
mi_model = ""            # eval_only: a Hugging Face causal LM (gpt2 in the paper) for the MI coherence metric
sonar_hf_encoder = "cointegrated/SONAR_200_text_encoder"  # eval_only: SONAR's transformers port, without sonar-space
sonar_hf_decoder = "raxtemur/SONAR_200_text_decoder"
always_save_checkpoint = False  # False: keep the best val loss (small data overfits); True: the latest
init_from = "scratch"    # 'scratch' or 'resume' (out_dir/ckpt.pt, with its settings unless given here)
# data
dataset = "lee"          # reads data_root/dataset, built by embed.py
data_root = "data"
batch_size = 32          # windows per micro-batch
gradient_accumulation_steps = 1  # the global batch is this many micro-batches, shared by all processes
block_size = 16          # context in concepts (Lee documents: 10 sentences on average)
# model
n_layer = 4
n_head = 4
n_embd = 256
dropout = 0.3            # paper: 0.1 on a large corpus; the Lee corpus has 2.7k sentences
bias = False
rope_theta = 10000.0
# AdamW, warm-up then cosine decay (paper: lr 4e-4, betas 0.9/0.95, eps 1e-5, weight decay 0.1)
learning_rate = 4e-4
max_iters = 0            # 0 = follow the data: `epochs` passes over the training concepts, counted at start-up
epochs = 20.0
patience = 4             # stop after this many evaluations without a better val loss; 0 = never
noise = 0.0              # std of Gaussian noise added to the input concepts in training (normalized space)
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
eps = 1e-5
grad_clip = 1.0          # 0 = off
decay_lr = True
warmup_iters = 20
lr_decay_iters = 0       # 0 = max_iters
min_lr = 4e-5
# system
device = ""              # '' = autodetect: cuda, mps, cpu
dtype = ""               # '' = bf16 on GPUs that have it, fp16 on older ones; on a CPU, bf16 if measured 1.5x faster
compile = False          # torch.compile the model
backend = ""             # DDP: '' = nccl on cuda, gloo otherwise
seed = 1337
config = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))}
given = configure(globals(), sys.argv[1:])
ckpt_path = os.path.join(out_dir, "ckpt.pt")
resume = init_from == "resume" or eval_only
if resume:  # the checkpoint's run: its settings, but for the ones given here (the machine's are never taken)
    model, checkpoint = load_checkpoint(ckpt_path)
    old = checkpoint["config"]
    globals().update({k: v for k, v in old.items() if k in config and k not in given and k not in
                      ("out_dir", "init_from", "eval_only", "device", "backend")})
    changed = {k: old[k] for k in given if k in old and old[k] != globals()[k] and k not in ("init_from", "eval_only")}
    for k in changed.keys() & model.config.__dict__.keys():  # block_size, n_layer, dropout, ...
        die(f"--{k}={globals()[k]}, but {ckpt_path} was made with {k}={old[k]}: the model's settings cannot change; "
            "train a new model in another --out_dir")
    if changed:
        print("changed from the checkpoint: " + ", ".join(f"{k} {v} -> {globals()[k]}" for k, v in changed.items()))
config = {k: globals()[k] for k in config}
for k in ("batch_size", "block_size", "n_layer", "n_head", "n_embd", "gradient_accumulation_steps", "eval_iters"):
    if globals()[k] < 1:
        die(f"--{k}={globals()[k]} must be at least 1")
if n_embd % n_head or (n_embd // n_head) % 2:
    die(f"--n_embd={n_embd} must be a multiple of --n_head={n_head} with an even head size (RoPE)")
if not 0 <= dropout < 1:
    die(f"--dropout={dropout} must be in [0, 1)")
if init_from not in ("scratch", "resume"):
    die(f"--init_from={init_from}: use scratch or resume")
if mi_model and not eval_only:  # MI is measured on decoded text, which only the eval_only table makes
    die(f"--mi_model={mi_model} needs --eval_only=True: MI is measured on a trained checkpoint's decoded text")

# -----------------------------------------------------------------------------
# devices and processes
ddp = int(os.environ.get("RANK", -1)) != -1
device = get_device(device)
if ddp:
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if world > gradient_accumulation_steps * batch_size:
        die(f"{world} processes share a global batch of {gradient_accumulation_steps * batch_size} windows: "
            "raise --batch_size or --gradient_accumulation_steps, or use fewer processes")
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    init_process_group(backend=backend or ("nccl" if device.startswith("cuda") else "gloo"))
else:
    rank, world = 0, 1
master = rank == 0
device_type = torch.device(device).type
if not dtype and device_type == "cpu":  # CPUs differ (bf16 matmuls from 0.2x to 10x fp32's speed): measure here
    rate = {d: measure_peak_flops(device, getattr(torch, d), sizes=(n_embd, 4 * n_embd), seconds=0.1)
            for d in ("float32", "bfloat16")}
    faster = torch.tensor(float(rate["bfloat16"] > 1.5 * rate["float32"]))
    if ddp:  # one choice for all processes
        torch.distributed.broadcast(faster, 0)
    dtype = "bfloat16" if faster else "float32"
    if master:
        print(f"dtype: {dtype} (F.linear at this model's sizes: float32 {rate['float32'] / 1e9:.0f}, bfloat16 "
              f"{rate['bfloat16'] / 1e9:.0f} GFLOP/s; bf16 is used when 1.5x faster)")
if not dtype:
    dtype = ("bfloat16" if torch.cuda.is_bf16_supported() else "float16") if device_type == "cuda" else "float32"
if dtype not in ("float32", "bfloat16", "float16"):
    die(f"--dtype={dtype}: use float32, bfloat16 or float16")
ptdtype = getattr(torch, dtype)
ctx = nullcontext() if dtype == "float32" else torch.autocast(device_type=device_type, dtype=ptdtype)
torch.manual_seed(seed + rank)
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
if master:
    writable_dir(out_dir, "out_dir")

# -----------------------------------------------------------------------------
# data: memmaps, never the whole set in RAM
data_dir = os.path.join(data_root, dataset)
meta = load_meta(data_dir)
train_rows, train_offsets = load_split(data_dir, "train", meta)
val_rows, val_offsets = load_split(data_dir, "val", meta)
val_starts, val_ends = eval_windows(val_offsets, block_size, eval_iters * batch_size)
val_docs = np.searchsorted(val_offsets, val_starts, side="right") - 1
if not max_iters:  # the same number of passes over the data, whatever its size
    max_iters = math.ceil(epochs * meta["train_rows"] / (gradient_accumulation_steps * batch_size * block_size))
lr_decay_iters = lr_decay_iters or max_iters
data_rng = np.random.default_rng(seed)  # the same on every rank: together they draw one global batch
mean_concept = torch.tensor(meta["mean"], device=device)

# -----------------------------------------------------------------------------
# model
iter_num, best_val_loss, evals_since_best = 0, float("inf"), 0
if resume:
    trained_on = checkpoint["data"]
    if not same_space(meta["encoder"], trained_on["encoder"]) or meta["d_emb"] != trained_on["d_emb"]:
        die(f"{data_dir} holds {meta['encoder']} concepts (d_emb {meta['d_emb']}), but {ckpt_path} was trained on "
            f"{trained_on['encoder']} (d_emb {trained_on['d_emb']}): pass a --dataset built with that encoder")
    if meta.get("key") != trained_on.get("key") and "dataset" not in given:
        die(f"{data_dir} was rebuilt after {ckpt_path} was trained on it: pass --dataset={dataset} to use it anyway")
    iter_num, best_val_loss = checkpoint["iter_num"], checkpoint["best_val_loss"]
    evals_since_best = checkpoint.get("evals_since_best", 0)  # older checkpoints: counted from here
else:
    model = BaseLCM(LCMConfig(d_emb=meta["d_emb"], block_size=block_size, n_layer=n_layer, n_head=n_head,
                              n_embd=n_embd, dropout=dropout, bias=bias, rope_theta=rope_theta))
    model.normalizer.center.copy_(torch.tensor(meta["normalizer"]["center"]))
    model.normalizer.scale.copy_(torch.tensor(meta["normalizer"]["scale"]))
model.to(device)
model_args = model.config.__dict__
scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), eps, device_type)
if resume and not eval_only:
    optimizer.load_state_dict(checkpoint["optimizer"])
    scaler.load_state_dict(checkpoint["scaler"])
    data_rng.bit_generator.state = checkpoint["data_rng"]
    torch.set_rng_state(checkpoint["torch_rng"][rank % len(checkpoint["torch_rng"])])
    checkpoint = None
if compile:
    model = torch.compile(model)
raw_model = model
if ddp:
    model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)

baselines = {}  # copy and mean depend on the validation windows only: measured once, at the first evaluation

@torch.no_grad()
def evaluate(roundtrip=None):
    """Teacher-forced next-concept metrics on fixed validation windows, for the model and two baselines:
    copy the last concept, and the training mean. roundtrip: prediction -> decoded -> re-encoded."""
    raw_model.eval()
    sums = {}
    for i in range(0, len(val_starts), batch_size):
        x, y, mask = get_batch(val_rows, val_starts[i:i + batch_size], val_ends[i:i + batch_size], block_size, device)
        doc = torch.as_tensor(val_docs[i:i + batch_size], device=device)
        row = torch.as_tensor(val_starts[i:i + batch_size, None] + np.arange(1, block_size + 1), device=device)
        with ctx:
            pred, _ = raw_model(x)
        preds = {"model": raw_model.normalizer.denormalize(pred.float())}
        if roundtrip or not baselines:
            preds |= {"copy": x, "mean": mean_concept.expand_as(y)}
        if mi_model:  # each target's context: the previous 10 sentences of its document (paper: k = 10)
            starts = val_offsets[val_docs[i:i + batch_size]][:, None].repeat(block_size, 1)[mask.cpu().numpy()]
            contexts = [val_text[max(lo, r - 10):r] for lo, r in zip(starts, row[mask].tolist())]
        for name, p in preds.items():
            m = concept_metrics(p, x, y, mask, raw_model.normalizer, doc, row)
            if roundtrip:
                texts, back = roundtrip(p[mask].float().cpu().numpy())
                m["rt_l2"] = (torch.as_tensor(back, device=device) - y[mask]).norm(dim=-1).sum().item()
            if mi_model:  # the decoded next sentence, after its context
                m["mi_gain"], m["mi_tokens"] = coherence_mi(mi_lm, mi_tokenizer, texts, contexts)
            sums[name] = {k: sums.get(name, {}).get(k, 0) + v for k, v in m.items()}
    raw_model.train()
    results = {name: finish_metrics(s) | ({"rt_l2": s["rt_l2"] / s["n"]} if roundtrip else {})
               | ({"mi": s["mi_gain"] / max(s["mi_tokens"], 1)} if mi_model else {}) for name, s in sums.items()}
    if not roundtrip:
        baselines.update({name: r for name, r in results.items() if name != "model"})
    return results | ({} if roundtrip else baselines)

if eval_only:
    if master:
        if same_space(meta["encoder"], "sonar"):  # decode with SONAR (either implementation), re-encode
            enc = load_encoder(meta["encoder"], device, (sonar_hf_encoder, sonar_hf_decoder))
            decoded_by = "SONAR's decoder"
            def roundtrip(p):
                texts = enc.decode(p, lang=meta["lang"])
                return texts, enc.encode(texts, lang=meta["lang"])
        else:  # no decoder: the nearest training sentence stands for the decoded text
            bank, decoded_by = SentenceBank(data_dir, meta), "retrieval of the nearest training sentence"
            def roundtrip(p):
                idx = bank.nearest(p)[0]
                return bank.texts(idx) if mi_model else None, np.asarray(bank.rows[idx], dtype=np.float32)
        if mi_model:
            try:
                from transformers import AutoModelForCausalLM, AutoTokenizer
                mi_tokenizer = AutoTokenizer.from_pretrained(mi_model)
                mi_lm = AutoModelForCausalLM.from_pretrained(mi_model).to(device).eval()
            except OSError as e:
                die(f"cannot load --mi_model={mi_model} ({str(e).splitlines()[0]}): name a causal LM such as gpt2 "
                    "(downloads once) or a local folder")
            val_text = open(os.path.join(data_dir, "val.txt"), encoding="utf-8").read().splitlines()
        results = evaluate(roundtrip)
        print(f"{len(val_starts)} validation windows, {meta['val_docs']} documents of {data_dir}, iter {iter_num}"
              + (f" (trained on {trained_on['dir']})" if os.path.abspath(data_dir) != trained_on["dir"] else "")
              + f"; decoded text: {decoded_by}" + (f"; MI with {mi_model}" if mi_model else ""))
        print(f"{'':8}    loss       l2    rt_l2      CA  CA-doc     PAR" + ("      MI" if mi_model else ""))
        for name, r in results.items():
            print(f"{name:8}{r['loss']:10.2f}{r['l2']:9.4f}{r['rt_l2']:9.4f}{100 * r['ca']:7.1f}%"
                  f"{100 * r['ca_doc']:7.1f}%"
                  f"{r['par']:8.3f}" + (f"{r['mi']:8.3f}" if mi_model else ""))
        with open(os.path.join(out_dir, "eval.json"), "w") as f:
            json.dump({"iter": iter_num, "dataset": data_dir, "windows": len(val_starts), "decoded_by": decoded_by,
                       "mi_model": mi_model, **results}, f, indent=1)
    if ddp:
        destroy_process_group()
    sys.exit(0)

def get_lr(it):  # linear warm-up, then cosine decay to min_lr
    if not decay_lr:
        return learning_rate
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)

# -----------------------------------------------------------------------------
# training loop
log = open(os.path.join(out_dir, "log.jsonl"), "a" if init_from == "resume" else "w") if master else None
peak = measure_peak_flops(device, ptdtype) if master else 0.0
flops_per_concept = raw_model.flops_per_concept()
if master:
    print(f"{sum(p.numel() for p in raw_model.parameters()) / 1e6:.2f}M parameters, {meta['train_rows']} train "
          f"concepts of d_emb {meta['d_emb']} ({meta['encoder']}), {max_iters} iterations "
          f"({max_iters * gradient_accumulation_steps * batch_size * block_size / meta['train_rows']:.1f} epochs), "
          f"{device} {dtype}, peak {peak / 1e9:.1f} GFLOP/s")
t0 = loop_start = time.time()
t0_iter = first_iter = iter_num
while True:
    lr = get_lr(iter_num)
    for group in optimizer.param_groups:
        group["lr"] = lr
    if iter_num % eval_interval == 0 or iter_num == max_iters:
        stop = torch.zeros((), device=device)
        if master:
            r = evaluate()
            print(f"step {iter_num}: val loss {r['model']['loss']:.2f} (copy {r['copy']['loss']:.2f}, mean "
                  f"{r['mean']['loss']:.2f}), l2 {r['model']['l2']:.4f}, CA {100 * r['model']['ca']:.1f}%")
            log.write(json.dumps({"iter": iter_num, "val": r}) + "\n")
            log.flush()
            improved = iter_num > 0 and r["model"]["loss"] < best_val_loss
            if iter_num > 0:
                evals_since_best = 0 if improved else evals_since_best + 1
                best_val_loss = r["model"]["loss"] if improved else best_val_loss
            if improved or iter_num > 0 and always_save_checkpoint:
                torch_rng = [torch.get_rng_state()]
                atomic_save({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                             "scaler": scaler.state_dict(), "model_args": model_args, "iter_num": iter_num,
                             "best_val_loss": best_val_loss, "evals_since_best": evals_since_best, "config": config,
                             "data_rng": data_rng.bit_generator.state, "torch_rng": torch_rng,
                             "data": {k: meta.get(k) for k in ("encoder", "lang", "d_emb", "eot", "spacy_model",
                                                                "max_chars", "key")} | {"dir": os.path.abspath(data_dir)}},
                            ckpt_path)
            stop.fill_(patience > 0 and evals_since_best >= patience)
        if ddp:  # the processes stop together
            torch.distributed.broadcast(stop, 0)
        if stop:
            if master:
                print(f"no better val loss in {patience} evaluations: stopping; the best ({best_val_loss:.2f}) is "
                      f"in {ckpt_path}")
            break
        t0, t0_iter = time.time(), iter_num  # evaluation is not training time
    if iter_num >= max_iters:
        break
    # one global batch, drawn identically on every rank; each rank takes a share of it in micro-batches. The loss
    # is averaged over the global batch's targets, so the gradient does not depend on how it is shared.
    starts, ends = sample_windows(data_rng, train_offsets, gradient_accumulation_steps * batch_size, block_size)
    n_targets = int((np.minimum(ends - starts, block_size + 1) - 1).sum())
    share = np.array_split(np.arange(len(starts)), world)[rank]
    micro_batches = np.array_split(share, math.ceil(len(share) / batch_size))
    loss_sum = torch.zeros((), device=device)
    for i, micro in enumerate(micro_batches):
        x, y, mask = get_batch(train_rows, starts[micro], ends[micro], block_size, device)
        if noise:  # a regulariser (not in the paper's Base-LCM): noise of std `noise` after normalization
            x = x + noise * raw_model.normalizer.scale * torch.randn_like(x)
        if ddp:  # sync gradients on the last micro-step only
            model.require_backward_grad_sync = i == len(micro_batches) - 1
        with ctx:
            _, loss = model(x, y, mask)
        loss = loss * mask.sum() * world / n_targets  # DDP averages over the world
        loss_sum += loss.detach()
        scaler.scale(loss).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    iter_num += 1
    if master and iter_num % log_interval == 0:
        loss_val = loss_sum.item() / world  # .item() syncs: only when logging
        dt = (time.time() - t0) / (iter_num - t0_iter)
        mfu = flops_per_concept * gradient_accumulation_steps * batch_size * block_size / dt / peak
        print(f"iter {iter_num}: loss {loss_val:.2f}, lr {lr:.2e}, {dt * 1000:.1f}ms, {n_targets / dt:.0f} "
              f"concepts/s, mfu {100 * mfu:.1f}%")
        log.write(json.dumps({"iter": iter_num, "loss": loss_val, "lr": lr, "ms": dt * 1000,
                              "concepts_per_s": n_targets / dt, "mfu": mfu}) + "\n")
        t0, t0_iter = time.time(), iter_num

if master:
    loop_ms = 1000 * (time.time() - loop_start) / max(1, iter_num - first_iter)
    print(f"{iter_num - first_iter} iterations, {loop_ms:.1f} ms each with batches, logging, evaluation and checkpoints")
    log.write(json.dumps({"iter": iter_num, "loop_ms": loop_ms}) + "\n")
    log.close()
if ddp:
    destroy_process_group()
