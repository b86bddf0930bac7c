"""
Evaluates a trained model as the paper does (section 2.4.1), on its dataset's validation windows,
beside two baselines (copy the last concept, predict the training mean): l2, round-trip l2, CA, PAR
and, with a causal LM, MI; then generation against the real text (continuations), or on prompt ->
answer pairs, the answers scored by ROUGE. Prints the tables and writes out_dir/eval.json. With
--curve, the teacher-forced table at each guidance scale instead, into out_dir/guidance.json.
`python train.py --eval_only=True` runs it with train.py's options.

$ python eval.py                                   # the quick start's model, in out/
$ python eval.py --out_dir=out-diffusion --guidance=1.5
$ python eval.py --out_dir=out-diffusion --curve=1,1.5,2,3,5   # CA against l2 as guidance grows
"""
import json, os, sys

import torch
from tqdm import tqdm

import common, datafiles, generation, metrics
from checkpoints import model_from
from concepts import SentenceBank, decoder, load_encoder, roundtrip

out_dir = "out"          # holds ckpt.pt
dataset = ""             # '' = the model's; another must hold concepts of its encoder
data_root = ""           # '' = the training run's
eval_iters = 0           # batches of validation windows; 0 = the training run's
mi_model = ""            # a Hugging Face causal LM (gpt2 in the paper) for the MI metric
sonar_hf_encoder = ""    # SONAR's transformers port, its encoder and decoder (hub names or
sonar_hf_decoder = ""    # folders); '' = the community port's (docs/sonar.md)
guidance = 0.0           # guidance scale, 1 = none; 0 = the model's own (a diffusion model's: 3)
ddim_steps = 0           # a diffusion model's sampling: DDIM steps; 0 = its default
init_noise = 0.0         # a diffusion model's sampling: the scale of its starting noise; 0 = its default
temperature = 0.0        # a Quant-LCM's sampling: temperature; 0 = its default
top_k = 0                # a Quant-LCM's sampling: units drawn among the top k; 0 = its default
generate = 0             # continue (or answer) the first N validation texts; 0 = all of them
curve = ""               # guidance scales, e.g. 1,1.5,2,3,5: only the teacher-forced table at each
                         # (and a diffusion model's or a Quant-LCM's point prediction), into
                         # out_dir/guidance.json
device = ""              # '' = autodetect: cuda, mps, cpu
dtype = ""               # '' = as train.py picks it
given = common.configure(globals(), sys.argv[1:])

# -----------------------------------------------------------------------------
# the model, and the training run's data and evaluation windows, but for those given here
ckpt_path = os.path.join(out_dir, "ckpt.pt")
checkpoint = common.load_checkpoint(ckpt_path)
run = checkpoint["config"]
dataset = dataset or run["dataset"]
data_root = data_root or run["data_root"]
eval_iters = eval_iters or run["eval_iters"]
device = common.get_device(device)
ctx, dtype = common.autocast(dtype, device)
data_dir = os.path.join(data_root, dataset)
meta = common.load_meta(data_dir)
# the model's concept space; its own dataset, unless another is named
common.check_trained_on(data_dir, meta, checkpoint["data"], ckpt_path, "dataset", "dataset" in given)
model = model_from(checkpoint).to(device).eval()
sampling = common.sampling_settings(model, out_dir, guidance=guidance, ddim_steps=ddim_steps,
                                    init_noise=init_noise, temperature=temperature, top_k=top_k)
rows, offsets, starts = datafiles.load_split(data_dir, "val", meta)
batches = list(datafiles.eval_batches(rows, offsets, model.config.block_size, run["batch_size"],
                                      eval_iters * run["batch_size"], device, starts))
windows = sum(len(b[0]) for b in batches)
# text: SONAR's decoder (either implementation), else retrieval of the nearest training sentence
enc = bank = None
if common.same_space(meta["encoder"], "sonar"):
    enc = load_encoder(meta["encoder"], device, (sonar_hf_encoder, sonar_hf_decoder))
    decoded_by = "SONAR's decoder"
else:
    bank = SentenceBank(data_dir, meta)
    decoded_by = "retrieval of the nearest training sentence"
nearest = roundtrip(enc, bank, meta["lang"])
sentences = open(os.path.join(data_dir, "val.txt"), encoding="utf-8").read().splitlines()
if mi_model:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    with common.one_line(f"cannot load --mi_model={mi_model}", "name a causal LM such as gpt2 "
                         "(downloads once) or a local folder", OSError):
        tokenizer = AutoTokenizer.from_pretrained(mi_model)
        lm = AutoModelForCausalLM.from_pretrained(mi_model).to(device).eval()

def decoded(p, y, mask, doc, row):
    """Sums of rt_l2 and near (the decoded prediction's), and MI given the 10 before it"""
    texts, back = nearest(p[mask].float())
    back = torch.as_tensor(back, device=y.device)
    sums = {"rt_l2": (back - y[mask]).norm(dim=-1).sum().item(),
            "near": torch.cosine_similarity(back, p[mask].float(), dim=-1).sum().item()}
    if mi_model:
        lo = offsets[doc.cpu().numpy()][:, None].repeat(y.size(1), 1)[mask.cpu().numpy()]
        contexts = [sentences[max(a, r - 10):r] for a, r in zip(lo, row[mask].tolist())]
        sums["mi_gain"], sums["mi_tokens"] = metrics.coherence_mi(lm, tokenizer, texts, contexts)
    return sums

# -----------------------------------------------------------------------------
# teacher-forced: the next concept after every position of the validation windows, by the model
# (with --curve: at each guidance scale, a diffusion model's conditional mean first) and the
# baselines
settings = {"model": sampling}
if curve:
    settings = {f"guidance {g}": sampling | {"guidance": float(g)} for g in curve.split(",")}
    if model.point != {"guidance": 1.0}:
        # the point prediction: a diffusion model's conditional mean (one step from pure noise, no
        # guidance: what it reads of the context, as an MSE prediction), a Quant-LCM's greedy one
        point = "conditional mean" if "ddim_steps" in model.point else "greedy"
        settings = {point: model.point} | settings
predictors = {name: metrics.predictor(model, ctx, **s) for name, s in settings.items()}
predictors |= metrics.baselines(torch.tensor(meta["mean"], device=device))
if hasattr(model, "codebooks"):
    # the ceiling of a sum of units (a Quant-LCM's): the real next concept, quantized to every level
    predictors["quantized real next"] = lambda x, y: model.quantized(y)
bar = tqdm(batches, desc="next concepts", unit="batch", leave=False)
results = metrics.evaluate(predictors, bar, model.normalizer, decoded)
trained_on = checkpoint["data"]["dir"]
where = "" if os.path.abspath(data_dir) == trained_on else f" (trained on {trained_on})"
print(f"{windows} validation windows, {meta['val_docs']} documents of {data_dir}, iter "
      f"{checkpoint['iter_num']}{where}; decoded text: {decoded_by}"
      + (f"; MI with {mi_model}" if mi_model else ""))
print(f"{'':20}    loss       l2    rt_l2    near      CA  CA-doc     PAR"
      + ("      MI" if mi_model else ""))
for name, r in results.items():
    print(f"{name:20}{r['loss']:10.2f}{r['l2']:9.4f}{r['rt_l2']:9.4f}{r['near']:8.3f}"
          f"{100 * r['ca']:7.1f}%{100 * r['ca_doc']:7.1f}%{r['par']:8.3f}"
          + (f"{r['mi']:8.3f}" if mi_model else ""))
if curve:
    # CA against l2 as guidance grows (scripts/plot.py draws it), and how near the real next
    # concepts lie to a training sentence
    real = torch.cat([y[m] for _, y, m, *_ in batches]).float()
    near = torch.cosine_similarity(torch.as_tensor(nearest(real)[1]), real.cpu())
    results["real next"] = {"near": near.mean().item()}
    print(f"{'real next':20}{'':28}{results['real next']['near']:8.3f}")
    with open(os.path.join(out_dir, "guidance.json"), "w") as f:
        json.dump(results, f, indent=1)
    sys.exit(0)

# -----------------------------------------------------------------------------
# generation, as sample.py generates: the first `generate` validation texts (0: all), all at once
eot = torch.tensor(meta["eot"], device=device)

def write(prompts, since, feedback, repeats, seed):
    """prompts (concepts, sentences) -> a Transcript of up to 8 sentences each, with .stops"""
    decode = decoder(enc, bank, meta["lang"], repeats)
    said = generation.Transcript(decode, [t for _, t in prompts], feedback)
    generators = [torch.Generator(device).manual_seed(1000 * seed + i) for i in range(len(prompts))]
    concepts = [c.to(device) for c, _ in prompts]
    desc = f"generate: {feedback}{', repeats' if repeats else ''}, seed {seed}"
    with tqdm(total=len(prompts), desc=desc, unit="text", leave=False) as bar:
        out = generation.generate(model, concepts, eot, 8, said, generators, since,
                                  progress=bar.update, **sampling)
    said.stops = [reason for _, _, reason in out]
    return said

train_rows, train_offsets, train_starts = datafiles.load_split(data_dir, "train", meta)
shown = offsets[:generate + 1] if generate else offsets
if starts is None:
    kind = "continuations"
    gen = metrics.continuations(write, rows, shown, sentences, train_rows, train_offsets)
    real = gen.pop("real")
    print(f"continuations of {gen['random']['samples']} validation documents (prompt: 3 sentences, "
          f"up to 8 generated; the real rest: {real['sentences']:.1f} sentences, median "
          f"{real['median']:.0f}): closeness to the real rest, sentences (mean, median), distinct "
          "share, ended at end of text; 4 samples: the spread of their first concepts")
    for name, r in gen.items() if gen["random"]["samples"] else ():
        said = (f"{r['sentences']:6.1f}{r['median']:5.0f}{100 * r['distinct']:6.0f}%"
                f"{100 * r['eot']:6.0f}%" if "distinct" in r else "")
        spread = f"{r['spread']:8.3f}" if "spread" in r else ""
        print(f"{name:14}{r['closeness']:8.3f}{said}{spread}")
    gen["real"] = real
else:
    kind = "answers"
    with open(os.path.join(data_dir, "train.txt"), encoding="utf-8") as f:
        train_texts = f.read().splitlines()
    gen = metrics.answers(write, rows, shown, starts, sentences, nearest, train_texts,
                          train_offsets, train_starts, model.config.block_size - 1,
                          meta.get("prompt_end", ""))
    print(f"answers to {gen['pairs']} validation prompts (until end of text, up to 8 sentences; "
          f"the references: {gen['real']['sentences']:.1f} sentences, median "
          f"{gen['real']['median']:.0f}): ROUGE-1, ROUGE-2, ROUGE-L (F-measure, %), sentences "
          "(mean, median), ended at end of text")
    for name, r in list(gen.items())[:-2]:
        rouge = "".join(f"{100 * r[k]:7.2f}" for k in ("rouge1", "rouge2", "rougeL"))
        ended = f"{r['median']:5.0f}{100 * r['eot']:6.0f}%" if "eot" in r else ""
        print(f"{name:16}{rouge}{r['sentences']:6.1f}{ended}")
with open(os.path.join(out_dir, "eval.json"), "w") as f:
    json.dump({"iter": checkpoint["iter_num"], "dataset": data_dir, "windows": windows,
               "decoded_by": decoded_by, "mi_model": mi_model, "sampling": sampling, **results,
               kind: gen}, f, indent=1)
