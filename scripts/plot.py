"""
Draws what the runs measured, headless (matplotlib's Agg), into a PNG:
  --kind=concepts  the mean and the samples: for a few validation prompts, the real next concept,
                   the training sentences nearest it, a Base-LCM's prediction (and guided), the samples
                   of diffusion models or Quant-LCMs, and the training mean, projected onto 2-D by a PCA
                   fitted on them
  --kind=guidance  CA against l2 as guidance grows, a curve a run (eval.py --curve's guidance.json),
                   and the point predictions (a diffusion model's conditional mean, a Quant-LCM's
                   greedy one)
  --kind=run       a run's training and validation loss, its baselines' and CA (out_dir/log.jsonl)

$ python scripts/plot.py --kind=run --out_dirs=out
$ python scripts/plot.py --kind=guidance --out_dirs=out,out-diffusion --out=docs/guidance.png
$ python scripts/plot.py --kind=concepts --out_dirs=out,out-diffusion,out-quant --out=docs/concepts.png
"""
import json, os, sys, textwrap
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import checkpoints, common, datafiles  # noqa: E402
from common import configure, require  # noqa: E402
from concepts import SentenceBank  # noqa: E402

kind = "run"             # 'concepts', 'guidance' or 'run'
out_dirs = "out"         # the runs, comma-separated (concepts: a Base-LCM's, then samplers')
out = ""                 # the PNG; '' = the first run's out_dir/KIND.png
prompts = 4              # concepts: validation prompts (the first documents of 5 sentences or more)
samples = 8              # concepts: each sampler's samples of each next concept
guidance = 3.0           # concepts: the Base-LCM guided this much, beside its own prediction
labels = ""              # guidance: a name for each run, comma-separated; '' = their out_dirs
configure(globals(), sys.argv[1:])
require(kind in ("concepts", "guidance", "run"), f"--kind={kind}: use concepts, guidance or run")
runs = out_dirs.split(",")
out = out or os.path.join(runs[0], f"{kind}.png")
short = lambda text: textwrap.shorten(text, 48, placeholder="...")

if kind == "run":
    path = os.path.join(runs[0], "log.jsonl")
    require(os.path.isfile(path), f"no {path}: train there, `python train.py --out_dir={runs[0]}`")
    log = [json.loads(line) for line in open(path)]
    evals = [r for r in log if "val" in r and "model" in r["val"]]
    require(evals and all("copy" in r["val"] for r in evals), f"{path} holds no evaluations with their "
            "baselines (a log of an older baselcm?): train the run again")
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["iter"] for r in log if "loss" in r]
    ax.plot(steps, [r["loss"] for r in log if "loss" in r], color="0.6", label="training loss")
    ax.plot([r["iter"] for r in evals], [r["val"]["model"]["loss"] for r in evals], "o-",
            label="val loss")
    for name, style in (("copy", ":"), ("mean", "--")):
        ax.axhline(evals[-1]["val"][name]["loss"], ls=style, color="k", label=f"val loss of {name}")
    ax.set(xlabel="iteration", ylabel="loss (squared error, normalized space)", title=runs[0])
    ca = ax.twinx()
    ca.plot([r["iter"] for r in evals], [100 * r["val"]["model"]["ca"] for r in evals], "s-", color="C2",
            label="CA")
    ca.set_ylabel("contrastive accuracy (%)", color="C2")
    fig.legend(loc="upper right", bbox_to_anchor=(0.88, 0.88), fontsize=8)

if kind == "guidance":
    fig, ax = plt.subplots(figsize=(7, 5))
    names = labels.split(",") if labels else runs
    require(len(names) == len(runs), f"--labels names {len(names)} runs, --out_dirs {len(runs)}")
    for i, (run, name) in enumerate(zip(runs, names)):
        path = os.path.join(run, "guidance.json")
        require(os.path.isfile(path), f"no {path}: run `python eval.py --out_dir={run} --curve=1,1.5,2,3,5`")
        curve = json.load(open(path))
        scales = [(float(k.split()[1]), r) for k, r in curve.items() if k.startswith("guidance ")]
        ax.plot([r["l2"] for _, r in scales], [100 * r["ca"] for _, r in scales], "o-", color=f"C{i}",
                label=name)
        for g, r in scales:
            ax.annotate(f"g {g:g}", (r["l2"], 100 * r["ca"]), textcoords="offset points", xytext=(4, -10),
                        fontsize=7, color=f"C{i}")
        # a model's point prediction: a diffusion model's conditional mean, a Quant-LCM's greedy one
        for point in ("conditional mean", "greedy"):
            if point in curve:
                r = curve[point]
                ax.plot(r["l2"], 100 * r["ca"], "*", ms=12, color=f"C{i}", label=f"{name}: {point}")
    # the baselines, from the first run that has them (the same windows for runs on one dataset)
    for name, marker in (("copy", "X"), ("mean", "P")):
        r = next((json.load(open(os.path.join(run, "guidance.json"))).get(name) for run in runs))
        if r:
            ax.plot(r["l2"], 100 * r["ca"], marker, ms=9, color="k", label=f"{name} (baseline)")
    ax.set(xlabel="l2 to the real next concept (lower is better)", ylabel="contrastive accuracy (%)",
           title="CA against l2 as guidance g grows")
    ax.legend(fontsize=8)

if kind == "concepts":
    models = [(model.eval(), ckpt) for model, ckpt in map(checkpoints.load_model, runs)]
    require(len(runs) >= 2 and not hasattr(models[0][0], "denoise") and
            all(hasattr(model, "denoise") for model, _ in models[1:]), "--kind=concepts draws a Base-LCM's "
            "run and the samples of others (diffusion, Quant): --out_dirs=BASE,DIFFUSION[,QUANT...]")
    (base, ckpt), samplers = models[0], models[1:]
    data_dir = ckpt["data"]["dir"]
    require(os.path.isdir(data_dir), f"{data_dir}, the dataset of {runs[0]}, is gone: build it again "
            "with embed.py")
    meta = common.load_meta(data_dir)
    for (_, other), run in zip(samplers, runs[1:]):
        common.check_trained_on(data_dir, meta, other["data"], run, "out_dirs")
    bank = SentenceBank(data_dir, meta)
    rows, offsets, _ = datafiles.load_split(data_dir, "val", meta)
    texts = open(os.path.join(data_dir, "val.txt"), encoding="utf-8").read().splitlines()
    starts = [lo for lo, end in zip(offsets[:-1], offsets[1:]) if end - lo >= 6][:prompts]
    columns = min(2, len(starts))
    grid = -(-len(starts) // columns)
    fig, axes = plt.subplots(grid, columns, figsize=(6.5 * columns, 5.5 * grid), squeeze=False)
    generator = torch.Generator().manual_seed(0)
    for ax, lo in zip(axes.flat, starts):
        # a prompt of 3 sentences, and what comes after it
        prompt = torch.as_tensor(np.asarray(rows[lo:lo + 3], np.float32))[None]
        real = torch.as_tensor(np.asarray(rows[lo + 3], np.float32))
        z = torch.randn(samples, 1, real.numel(), generator=generator)
        guided = base.predict(prompt, last=True, guidance=guidance)[0][0]
        predicted = {"Base-LCM": base.predict(prompt, last=True)[0][0],
                     f"Base-LCM, guided (g {guidance:g})": guided}
        for model, other in samplers:
            name = f"{other['config']['model_type']} samples"
            twins = sum(key.startswith(name) for key in predicted)  # a second run of a kind: "... 2"
            sampled = model.predict(prompt.expand(samples, -1, -1), last=True, z=z)[0][:, 0]
            predicted[f"{name} {twins + 1}" if twins else name] = sampled
        # each prediction's nearest training sentence (what retrieval decodes it to), and its cosine
        decoded = {name: bank.nearest(p, eot=False) for name, p in predicted.items()}
        near = np.sort(bank.nearest(real[None], 6, eot=False)[0][0])
        points = {"real next": real[None], "training sentences nearest it": bank.rows[near]} | predicted
        points["training mean"] = torch.tensor(meta["mean"])[None]
        # PCA on these points, at unit length: the cosine is what retrieval and the metrics read
        x = torch.nn.functional.normalize(torch.cat([torch.as_tensor(np.asarray(p, np.float32)) for p in
                                                     points.values()]), dim=-1)
        xy = ((x - x.mean(0)) @ torch.linalg.svd(x - x.mean(0), full_matrices=False)[2][:2].T).numpy()
        at = dict(zip(points, np.split(xy, np.cumsum([len(p) for p in points.values()])[:-1])))
        markers = [*"*.s^", *("oDv<>" * len(samplers))[:len(samplers)], "P"]
        colors = [*"rkbb", *(["C2", "C9", "C8", "C5"] * len(samplers))[:len(samplers)], "m"]
        for name, marker, color in zip(points, markers, colors):
            ax.plot(*at[name].T, marker, color=color, ls="none", ms=14 if marker == "*" else 7, alpha=0.8,
                    label=name)
        labels = {"real next": texts[lo + 3]} | {name: bank.texts(decoded[name][0][0])[0] for name in
                                                 predicted if "guided" not in name}
        for name, sentence in labels.items():
            right = at[name][0, 0] > xy[:, 0].mean()  # a label on the right half reads leftwards
            ax.annotate(short(sentence), at[name][0], fontsize=7, xytext=(-4 if right else 4, 4),
                        textcoords="offset points", ha="right" if right else "left", clip_on=True)
        cosines = [f"{name.split(' (')[0].replace(' samples', '')} {c[1].mean():.2f}" for name, c in
                   decoded.items()]
        ax.set_xlabel("cosine to the nearest training sentence: " + ", ".join(cosines[:2]) + ",\n" +
                      ", ".join(cosines[2:]), fontsize=7)
        ax.set_title("... " + short(texts[lo + 2]), fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes.flat[len(starts):]:
        ax.remove()
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles[:len(points)], labels[:len(points)], loc="lower center", ncol=4, fontsize=8)
    fig.suptitle("The next concept after a prompt (its last sentence above each): the Base-LCM's one "
                 "prediction and the samples\nof the others, with the real next sentence and the training "
                 "sentences nearest it (PCA of the points at unit length)", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
else:
    fig.tight_layout()
fig.savefig(out, dpi=110)
print(f"wrote {out}")
