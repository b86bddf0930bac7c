"""
CA against l2 as guidance grows, for each model on its dataset's validation windows (the windows
eval.py scores): l2, round-trip l2, near (the prediction's cosine to its decoded sentence), CA and
PAR at each guidance scale, and a diffusion model's conditional mean (one DDIM step from pure noise,
no guidance). The real next concepts' own nearness closes each model's rows. Prints a table and
writes out_dir/guidance.json (docs/results.md, "What diffusion buys").

$ python scripts/guidance_curve.py --out_dirs=out,out-diffusion
$ python scripts/guidance_curve.py --out_dirs=out --scales=1,2
"""
import json, os, sys, time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

import checkpoints, common, datafiles, metrics
from concepts import SentenceBank, roundtrip
from diffusion import DiffusionLCM

out_dirs = "out"         # the runs, comma-separated
scales = "1,1.5,2,3,5"   # guidance scales, comma-separated
device = ""              # '' = autodetect: cuda, mps, cpu
common.configure(globals(), sys.argv[1:])

device = common.get_device(device)
for out_dir in out_dirs.split(","):
    ckpt = checkpoints.load(out_dir)
    run = {"eval_iters": 20, "batch_size": 32} | checkpoints.settings(ckpt)
    ctx, _ = common.autocast("", device, run["n_embd"])
    data_dir = os.path.join(run["data_root"], run["dataset"])
    meta = datafiles.load_meta(data_dir)
    model = checkpoints.model_from(ckpt).to(device).eval()
    rows, offsets, answers = datafiles.load_split(data_dir, "val", meta)
    batches = list(datafiles.eval_batches(rows, offsets, model.config.block_size, run["batch_size"],
                                          run["eval_iters"] * run["batch_size"], device, answers))
    nearest = roundtrip(None, SentenceBank(data_dir, meta), meta["lang"])
    settings = {f"guidance {g}": {"guidance": float(g)} for g in scales.split(",")}
    if isinstance(model, DiffusionLCM):
        settings = {"conditional mean": {"ddim_steps": 1, "guidance": 1.0}} | settings
    out = {}
    for name, s in settings.items():
        t = time.time()
        with torch.no_grad():
            r = metrics.evaluate({"m": metrics.predictor(model, ctx, **s)}, batches, model.normalizer,
                                 nearest)["m"]
        out[name] = r | {"seconds": time.time() - t}
        print(f"{out_dir:20} {name:17} l2 {r['l2']:.4f} rt_l2 {r['rt_l2']:.4f} near {r['near']:.3f} "
              f"CA {100 * r['ca']:.1f}% PAR {r['par']:.3f} ({time.time() - t:.0f} s)", flush=True)
    # the real next concepts' own cosine to their nearest training sentence
    real = torch.cat([y[m] for _, y, m, *_ in batches]).float().cpu()
    back = torch.as_tensor(nearest(real)[1])
    out["real next"] = {"near": torch.cosine_similarity(back, real).mean().item()}
    print(f"{out_dir:20} {'real next':17} near {out['real next']['near']:.3f}", flush=True)
    with open(os.path.join(out_dir, "guidance.json"), "w") as f:
        json.dump(out, f, indent=1)
