"""
The Quant-LCMs' round trip, measured before any model is trained (the paper's Figure 9 in
miniature): residual vector quantization (quant.py) fitted on a dataset's training concepts,
normalized as the models predict them; then the validation concepts quantized to each depth: their
relative l2 error, and how often retrieval (the nearest training sentence) returns the sentence it
returns for the concept itself. The training concepts' own error beside it shows where more levels
stop helping unseen ones.

$ python scripts/quant_roundtrip.py --dataset=lee
$ python scripts/quant_roundtrip.py --dataset=pyref --out=docs/quant_roundtrip.png
"""
import json, os, sys, time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import common, datafiles, quant  # noqa: E402
from concepts import SentenceBank  # noqa: E402

dataset = "lee"          # reads data_root/dataset, built by embed.py
data_root = "data"
levels = 16              # codebooks
units = 0                # units a codebook; 0 = from the training concepts (quant.units_for)
iters = 20               # k-means iterations a level
seed = 0
out = ""                 # a PNG of the round trip by depth; '' = none
common.configure(globals(), sys.argv[1:])

data_dir = os.path.join(data_root, dataset)
meta = common.load_meta(data_dir)
train, train_offsets, _ = datafiles.load_split(data_dir, "train", meta)
val, val_offsets, _ = datafiles.load_split(data_dir, "val", meta)
units = units or quant.units_for(len(train))
common.require(len(train) >= units, f"{data_dir} has {len(train)} training concepts, fewer than "
               f"--units={units}")
center = torch.tensor(meta["normalizer"]["center"])
scale = torch.tensor(meta["normalizer"]["scale"])
x = (torch.as_tensor(np.asarray(train, np.float32)) - center) / scale
t0 = time.time()
codebooks = quant.fit_rvq(x, levels, units, iters, seed)
fit_s = time.time() - t0
# the validation sentences (not their end-of-text rows), and as many training ones
keep = np.setdiff1d(np.arange(len(val)), val_offsets[1:] - 1)
v = (torch.as_tensor(np.asarray(val[keep], np.float32)) - center) / scale
seen = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:len(v)]]
bank = SentenceBank(data_dir, meta)
same_as = bank.nearest(v * scale + center, eot=False)[0][:, 0]
rows = []
for name, y in (("val", v), ("train", seen)):
    codes = quant.rvq_encode(y, codebooks)
    for depth in range(1, levels + 1):
        q = quant.rvq_decode(codes, codebooks, depth)
        error = ((q - y).norm(dim=-1) / y.norm(dim=-1)).mean().item()
        same = None
        if name == "val":
            same = (bank.nearest(q * scale + center, eot=False)[0][:, 0] == same_as).mean()
        rows.append({"split": name, "depth": depth, "rel_l2": error, "same_sentence": same})
print(f"{data_dir}: {len(train)} training concepts, {levels} codebooks of {units} units, fitted in "
      f"{fit_s:.1f}s; {len(v)} validation sentences")
print("depth   rel l2 (val)   rel l2 (train)   same sentence retrieved (val)")
for depth in range(1, levels + 1):
    a, b = rows[depth - 1], rows[levels + depth - 1]
    print(f"{depth:5}{a['rel_l2']:15.3f}{b['rel_l2']:17.3f}{100 * a['same_sentence']:16.1f}%")
with open(os.path.join(data_dir, "quant_roundtrip.json"), "w") as f:
    json.dump({"units": units, "levels": levels, "fit_s": fit_s, "rows": rows}, f, default=float)
if out:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, style in (("val", "o-"), ("train", "s--")):
        ax.plot(range(1, levels + 1), [r["rel_l2"] for r in rows if r["split"] == name], style,
                label=f"relative l2 error, {name} concepts")
    ax.plot(range(1, levels + 1), [r["same_sentence"] for r in rows if r["split"] == "val"], "^-",
            label="same sentence retrieved, val")
    ax.set(xlabel="codebooks (depth)", ylim=(0, 1),
           title=f"{dataset}: RVQ, {units} units a codebook")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
