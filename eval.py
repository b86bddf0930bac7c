"""
Evaluates a trained model as the paper does (section 2.4.1) on its dataset's validation windows,
beside two baselines (copy the last concept, predict the training mean): l2, round-trip l2, CA, PAR
and, with a causal LM, MI; then generation against the real text (continuations), or on prompt ->
answer pairs, the answers scored by ROUGE. Prints the tables and writes out_dir/eval.json.
`python train.py --eval_only=True` runs it with train.py's options.

$ python eval.py                                   # the quick start's model, in out/
$ python eval.py --out_dir=out-diffusion --guidance=1.5
$ python eval.py --dataset=mine                    # another dataset of the model's encoder
"""
import os, sys

import torch

import checkpoints, common, datafiles, metrics

out_dir = "out"          # holds ckpt.pt
dataset = ""             # '' = the model's; another must hold concepts of its encoder
data_root = ""           # '' = the training run's
eval_iters = 0           # batches of validation windows; 0 = the training run's
mi_model = ""            # a Hugging Face causal LM (gpt2 in the paper) for the MI metric
sonar_hf_encoder = ""    # SONAR's transformers port, its encoder and decoder (hub names or
sonar_hf_decoder = ""    # folders); '' = the community port's (docs/sonar.md)
guidance = 0.0           # guidance scale, 1 = none; 0 = the model's own (a diffusion model's: 3)
ddim_steps = 0           # a diffusion model's sampling: DDIM steps; 0 = the paper's 40
generate = 0             # continue (or answer) the first N validation texts; 0 = all of them
device = ""              # '' = autodetect: cuda, mps, cpu
dtype = ""               # '' = as train.py picks it
given = common.configure(globals(), sys.argv[1:])

ckpt_path = os.path.join(out_dir, "ckpt.pt")
checkpoint = checkpoints.load(ckpt_path)
run = {"eval_iters": 20, "batch_size": 32} | checkpoints.settings(checkpoint)
# the training run's data and evaluation windows, but for those given here
for k in ("dataset", "data_root", "eval_iters"):
    if k not in given:
        globals()[k] = run[k]
checkpoints.check_changes(checkpoint, ckpt_path, {k: globals()[k] for k in given if k in run}, False)
device = common.get_device(device)
ctx, dtype = common.autocast(dtype, device, run["n_embd"])
data_dir = os.path.join(data_root, dataset)
meta = datafiles.load_meta(data_dir)
# the model's concept space; its own dataset, unless another is named
datafiles.check_trained_on(data_dir, meta, checkpoint["data"], ckpt_path, "dataset", "dataset" in given)
model = checkpoints.model_from(checkpoint).to(device).eval()
sampling = checkpoints.sampling_settings(model, out_dir, guidance=guidance, ddim_steps=ddim_steps)
rows, offsets, answers = datafiles.load_split(data_dir, "val", meta)
batches = datafiles.eval_batches(rows, offsets, model.config.block_size, run["batch_size"],
                                 eval_iters * run["batch_size"], device, answers)
baselines = metrics.baselines(torch.tensor(meta["mean"], device=device))
metrics.eval_report(model, ctx, sampling, baselines, batches, data_dir, meta, checkpoint, out_dir,
                    (sonar_hf_encoder, sonar_hf_decoder), mi_model, generate)
