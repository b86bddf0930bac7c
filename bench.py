"""
Measures baselcm on the current device and writes bench.json: the device's matmul peak in the
training dtype (measured now), training concepts/s and MFU against it (compile off and on, and a
15-line reference step of the same shapes), the forward / backward / optimizer split, generation
with and without the KV cache (and compiled), the diffusion LCMs' (One-Tower, Two-Tower) and the
Quant-LCMs' training step and sampled concepts/s against the Base-LCM's,
embed.py against the bare encoder (speed and
peak memory, corpus, 4x), and, given trained runs, eval.py's time on each against the first's.

$ python bench.py                       # everything (CPU: about 5 minutes)
$ python bench.py --embed=False --compile=False
$ python bench.py --embed=False --evals=out,out-diffusion   # eval.py on each run, against the first
"""
import json, os, re, subprocess, sys, tempfile, time
from functools import partial

import torch
from torch.nn import functional as F

from baselcm import BaseLCM, LCMConfig, RMSNorm
from common import autocast, configure, get_device
from metrics import measure_peak_flops, synchronize
from diffusion import DiffusionConfig, OneTower, TwoTower
from quant import QuantC, QuantConfig, QuantD
from generation import generate

device = ""              # '' = autodetect
dtype = ""               # '' = bfloat16 on GPUs that have it; on a CPU both float32 and bfloat16
compile = True           # also measure with torch.compile
embed = True             # also measure embed.py (on Lee's corpus: gensim and the minilm encoder)
steps = 20               # timed training steps per configuration
evals = ""               # trained runs' out_dirs, comma-separated: eval.py's time on each, against the first
out = "bench.json"
configure(globals(), sys.argv[1:])

device = get_device(device)
device_type = torch.device(device).type
if dtype:
    dtypes = [dtype]
elif device_type == "cpu":
    dtypes = ["float32", "bfloat16"]
else:
    # train.py's dtype where the GPU has bf16, else fp32
    dtypes = [autocast("", device)[1].replace("float16", "float32")]
autocast = lambda d: torch.autocast(device_type, getattr(torch, d), enabled=d != "float32")
# as train.py: fp32 matmuls in TF32 where the GPU has it
torch.backends.cuda.matmul.allow_tf32 = True
device_name = f"{device} ({os.cpu_count()} cores)"
if device_type == "cuda":
    device_name = torch.cuda.get_device_name(device)
results = {"device": device_name, "torch": torch.__version__, "peak_tflops": {}}
for d in dtypes:
    results["peak_tflops"][d] = measure_peak_flops(device, getattr(torch, d), seconds=2.0) / 1e12
    print(f"{device_name}, {d}: matmul peak {results['peak_tflops'][d]:.3f} TFLOP/s (F.linear)")
# the faster: for the diffusion figures
dtype = max(dtypes, key=results["peak_tflops"].get)

def timed(fn):
    synchronize(device)
    t = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t

# -----------------------------------------------------------------------------
# training: the bare model step, split, and MFU; and a reference with the same shapes and FLOPs,
# written in 15 lines without RoPE, normalizer or dropout: the MFU this device gives such a step
configs = {
    "default (d256 L4 T16 B32)": dict(n_embd=256, n_layer=4, n_head=4, block_size=16, batch_size=32),
    "d512 L8 T64 B16": dict(n_embd=512, n_layer=8, n_head=8, block_size=64, batch_size=16)}
if device_type == "cuda":
    configs["d1024 L8 T128 B16 (laptop GPU config)"] = dict(n_embd=1024, n_layer=8, n_head=16,
                                                            block_size=128, batch_size=16)

class Reference(torch.nn.Module):
    def __init__(self, c, hidden):
        super().__init__()
        d = c["n_embd"]
        L = partial(torch.nn.Linear, bias=False)
        self.nh = c["n_head"]
        self.pre = torch.nn.Linear(1024, d)
        self.post = torch.nn.Linear(d, 1024)
        self.norm = RMSNorm(d)
        self.layers = torch.nn.ModuleList(
            torch.nn.ModuleList([RMSNorm(d), L(d, 3 * d), L(d, d), RMSNorm(d), L(d, 2 * hidden),
                                 L(hidden, d)]) for _ in range(c["n_layer"]))

    def forward(self, x, y, mask):
        x = self.pre(x)
        for n1, qkv, o, n2, fc, proj in self.layers:
            q, k, v = qkv(n1(x)).unflatten(-1, (3, self.nh, -1)).permute(2, 0, 3, 1, 4)
            att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + o(att.transpose(1, 2).flatten(2))
            gate, value = fc(n2(x)).chunk(2, dim=-1)
            x = x + proj(F.silu(gate) * value)
        return None, (self.post(self.norm(x)) - y).pow(2).sum(-1).mean()

results["train"] = []
kinds = ["eager", "compiled", "reference"] if compile else ["eager", "reference"]
for (name, c), d, kind in [(nc, d, k) for nc in configs.items() for d in dtypes for k in kinds]:
    torch.manual_seed(0)
    shape = {k: v for k, v in c.items() if k != "batch_size"}
    raw = BaseLCM(LCMConfig(d_emb=1024, dropout=0.0, **shape)).to(device)
    flops = raw.flops_per_concept()
    if kind == "reference":
        raw = Reference(c, raw.blocks[0].mlp.c_proj.in_features).to(device)
    model = torch.compile(raw) if kind == "compiled" else raw
    opt = torch.optim.AdamW(raw.parameters(), lr=4e-4, fused=device_type in ("cuda", "cpu", "mps"))
    x = torch.randn(c["batch_size"], c["block_size"], 1024, device=device)
    y = torch.randn(c["batch_size"], c["block_size"], 1024, device=device)
    mask = torch.ones(c["batch_size"], c["block_size"], dtype=torch.bool, device=device)
    split = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    # 3 warm-up steps (and compilation)
    for i in range(steps + 3):
        t = [time.perf_counter()]
        with autocast(d):
            _, loss = model(x, y, mask)
        synchronize(device), t.append(time.perf_counter())
        loss.backward()
        synchronize(device), t.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(raw.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        synchronize(device), t.append(time.perf_counter())
        if i >= 3:
            for k, a, b in zip(split, t, t[1:]):
                split[k] += b - a
    step = sum(split.values()) / steps
    concepts = c["batch_size"] * c["block_size"] / step
    mfu = flops * concepts / (results["peak_tflops"][d] * 1e12)
    shares = {f"{k}_share": v / steps / step for k, v in split.items()}
    results["train"].append({"config": name, "dtype": d, "kind": kind,
                             "params_M": sum(p.numel() for p in raw.parameters()) / 1e6,
                             "step_ms": 1000 * step, "concepts_per_s": concepts, "mfu": mfu} | shares)
    print(f"train {name:28} {d:8} {kind:9} {1000 * step:8.1f} ms/step {concepts:9.0f} concepts/s "
          f"MFU {100 * mfu:5.1f}%  fwd/bwd/opt " + "/".join(f"{100 * v:.0f}" for v in shares.values()))

# -----------------------------------------------------------------------------
# generation: 200 concepts with and without the KV cache (a prediction from the whole window each
# time), and compiled; in fp32, as sample.py runs
torch.manual_seed(0)
config = LCMConfig(d_emb=1024, block_size=256, n_layer=8, n_head=8, n_embd=512, dropout=0.0)
model = BaseLCM(config).to(device).eval()
prompt = torch.randn(8, 1024, device=device)
eot = torch.randn(1024, device=device)
no_stop = dict(stop_eot=2.0, stop_end=0.0, stop_repeat=0.0)

def recomputed(n):
    seq = prompt[None]
    for _ in range(n):
        seq = torch.cat([seq, model.predict(seq[:, -config.block_size:], last=True)[0]], 1)
gen = results["generate"] = {}
runs = [("no_cache", recomputed), ("cache", lambda n: generate(model, [prompt], eot, n, **no_stop))]
runs += [("cache_compiled", runs[1][1])] * compile
for name, run in runs:
    if name == "cache_compiled":
        model.compile()
    # warm-up (and compilation)
    run(5)
    gen[name] = 200 / timed(lambda: run(200))
    print(f"generate 200 concepts, d512 L8, float32, {name:14}: {gen[name]:5.0f} concepts/s, "
          f"{gen[name] / gen['no_cache']:.1f}x")

# -----------------------------------------------------------------------------
# the diffusion LCMs (diffusion.py) and the Quant-LCMs (quant.py) against the Base-LCM of the same
# width and depth (the default model): a training step (the One-Tower's sequence interleaves a clean
# and a noisy concept for each; the Two-Tower adds 2 denoiser blocks, as the Quant-LCMs do), and
# sampled concepts/s at each model's default settings (a diffusion model's DDIM steps with guidance,
# the two halves in one batch a step; a Quant-LCM's 8 levels of 256 units), one text at a time, in
# fp32 as sample.py runs
shape = dict(d_emb=1024, n_embd=256, n_layer=4, n_head=4, block_size=16, dropout=0.0)
models = {"baselcm": BaseLCM(LCMConfig(**shape)), "one_tower": OneTower(DiffusionConfig(**shape)),
          "two_tower": TwoTower(DiffusionConfig(**shape)),
          "quant_c": QuantC(QuantConfig(**shape, n_units=256)),
          "quant_d": QuantD(QuantConfig(**shape, n_units=256))}
x = torch.randn(32, 16, 1024, device=device)
y = torch.randn(32, 16, 1024, device=device)
d = results["diffusion"] = {}
for name, m in models.items():
    m.to(device)
    opt = torch.optim.AdamW(m.parameters(), lr=4e-4)

    def train_step():
        with autocast(dtype):
            _, loss = m(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for _ in range(3):
        train_step()
    d[f"{name}_step_ms"] = 1000 * timed(lambda: [train_step() for _ in range(steps)]) / steps
    m.eval()
    n = 200 if name == "baselcm" else 40
    generate(m, [prompt], eot, 2, **no_stop)
    d[f"{name}_generate_per_s"] = n / timed(lambda: generate(m, [prompt], eot, n, **no_stop))
    ratio = d["baselcm_generate_per_s"] / d[f"{name}_generate_per_s"]
    d[f"{name}_generate_ratio"] = ratio
    print(f"{name:9} d256 L4 T16 B32, {dtype}: training step {d[f'{name}_step_ms']:6.1f} ms "
          f"({d[f'{name}_step_ms'] / d['baselcm_step_ms']:.1f}x the Base-LCM's); sampled concepts (fp32, "
          f"defaults) {d[f'{name}_generate_per_s']:.1f}/s, {ratio:.1f}x the Base-LCM's time a concept")

# -----------------------------------------------------------------------------
# embed.py against the bare encoder on the same sentences, and its peak memory on a corpus and on 4x
if embed:
    from gensim.test.utils import datapath
    from concepts import load_encoder, sentence_splitter, split_sentences
    docs = open(datapath("lee_background.cor")).read().splitlines()
    sentences = [s for d in split_sentences(sentence_splitter(), docs) for s in d]
    enc = load_encoder("minilm", device)
    enc.encode(sentences[:256], batch_size=128)
    e = results["embed"] = {"sentences": len(sentences)}
    bare = []
    ours = []
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    with tempfile.TemporaryDirectory() as tmp:
        # the corpus three times, each right after a bare pass (the host is noisy), then 4x
        for k in (1, 1, 1, 4):
            with open(f"{tmp}/corpus{k}.txt", "w") as f:
                f.write("\n".join(docs * k) + "\n")
            if k == 1:
                bare.append(len(sentences) / timed(lambda: enc.encode(sentences, batch_size=128)))
            p = subprocess.Popen([sys.executable, "embed.py", f"--dataset={tmp}/corpus{k}.txt",
                                  f"--data_root={tmp}", f"--device={device}", "--batch_size=128",
                                  "--overwrite=True"], stdout=subprocess.PIPE, text=True, env=env)
            ours.append(float(re.search(r"([\d.]+) sentences/s", p.stdout.read()).group(1)))
            # this child's own peak memory (KB on Linux, bytes on macOS; Windows has no wait4)
            rss = os.wait4(p.pid, 0)[2].ru_maxrss if hasattr(os, "wait4") else float("nan")
            rss_mb = rss / 2**20 if sys.platform == "darwin" else rss / 2**10
            e[f"{k}x"] = {"sentences_per_s": ours[-1], "peak_rss_mb": rss_mb}
    e["bare_sentences_per_s"] = bare
    e["overhead"] = [1 - b / a for a, b in zip(bare, ours)]
    print(f"embed {len(sentences)} Lee sentences: bare encoder "
          f"{', '.join(f'{r:.0f}' for r in bare)}/s, embed.py {', '.join(f'{r:.0f}' for r in ours[:3])}/s "
          f"({', '.join(f'{100 * o:+.1f}' for o in e['overhead'])}% overhead); peak RSS "
          f"{e['1x']['peak_rss_mb']:.0f} MB for the corpus, {e['4x']['peak_rss_mb']:.0f} MB for 4x")

# -----------------------------------------------------------------------------
# eval.py on trained runs (the README's quick start and diffusion recipe: out,out-diffusion), each
# timed whole, as a user runs it, against the first
if evals:
    e = results["eval"] = {}
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    for run_dir in evals.split(","):
        seconds = timed(lambda: subprocess.run([sys.executable, "eval.py", f"--out_dir={run_dir}",
                                                f"--device={device}"], env=env, check=True,
                                               capture_output=True))
        first = e.get(evals.split(",")[0], {"seconds": seconds})["seconds"]
        e[run_dir] = {"seconds": seconds, "ratio": seconds / first}
        print(f"eval.py --out_dir={run_dir}: {seconds:.1f} s, {e[run_dir]['ratio']:.1f}x the first's")

with open(out, "w") as f:
    json.dump(results, f, indent=1)
print(f"wrote {out}")
