"""
The plumbing the scripts share: their configuration (module globals, a config file, then
--key=value), one-line errors and settings checks, devices and processes, the measured matmul peak,
atomic saves. The floor of the project: it imports nothing of it.
"""
import ast, difflib, json, os, re, sys, tempfile, time
from contextlib import nullcontext
from datetime import timedelta

import torch
from torch.nn import functional as F

def die(msg):
    """An expected mistake: one line on stderr, a non-zero exit, no traceback."""
    print(f"error: {msg}", file=sys.stderr)
    # objects torn down after this line (a dataset reader) add nothing
    sys.unraisablehook = lambda *a: None
    sys.exit(1)

def first_line(e, width=160):
    return str(e).splitlines()[0][:width] if str(e) else ""

def knobs(g):
    """A script's knobs, in the order they are defined: its module globals of a simple type."""
    simple = (int, float, bool, str)
    return [k for k, v in g.items() if not k.startswith("_") and isinstance(v, simple)]

def print_help(g):
    """--help: the script's docstring, then each knob with its default and the comment beside it,
    read from the script's source (a comment may go on, indented, over the lines below it)."""
    print(g["__doc__"].strip() + "\n\noptions (--key=value), with their defaults:")
    lines = open(g["__file__"], encoding="utf-8").read().splitlines()
    todo = knobs(g)
    for i, line in enumerate(lines):
        knob = re.match(r"(\w+) = [^#]*(?:# (.*))?$", line)
        if not knob or knob[1] not in todo:
            continue
        todo.remove(knob[1])
        text = [knob[2]] if knob[2] else []
        for more in lines[i + 1:]:
            if not re.match(r" +# ", more):
                break
            text.append(more.strip()[2:])
        option = f"--{knob[1]}={g[knob[1]] if g[knob[1]] != '' else repr('')}"
        gap = "\n" + " " * 37 if len(option) > 34 and text else " "
        print(f"  {option:34}{gap}{' '.join(text)}".rstrip())

def configure(g, argv):
    """Sets a script's knobs in g from config files and --key=value pairs, in order (a str knob
    takes the text as given). -> the keys that were set."""
    keys = knobs(g)
    given = set()
    if "--help" in argv or "-h" in argv:
        print_help(g)
        sys.exit(0)
    for arg in argv:
        if not arg.startswith("--"):
            # a config file: plain python assignments
            if not os.path.isfile(arg):
                die(f"config file {arg} not found (expected a file like config/train_lee.py or --key=value)")
            cfg = {}
            exec(open(arg).read(), {}, cfg)
            pairs = [(k, v, arg) for k, v in cfg.items() if not k.startswith("_")]
        else:
            key, eq, val = arg[2:].partition("=")
            if not eq:
                die(f"{arg} has no value: write --{key}=VALUE")
            if key in keys and not isinstance(g[key], str):
                try:
                    val = ast.literal_eval(val)
                except (SyntaxError, ValueError):
                    pass  # reported below as the wrong type
            pairs = [(key, val, arg)]
        for key, val, where in pairs:
            if key not in keys:
                near = difflib.get_close_matches(key, keys, n=1)
                hint = f"did you mean --{near[0]}?" if near else f"{sys.argv[0]} --help lists them"
                die(f"unknown option '{key}' (from {where}): {hint}")
            want = type(g[key])
            if want is float and type(val) is int:
                val = float(val)
            if type(val) is not want:
                die(f"--{key} wants a {want.__name__}, got {val!r} (from {where})")
            g[key] = val
            given.add(key)
    return given

def require(ok, msg):
    """A check of the settings: one line and an exit where it fails."""
    if not ok:
        die(msg)

def require_positive(g, keys):
    for k in keys:
        if g[k] < 1:
            die(f"--{k}={g[k]} must be at least 1")

def check_lang(lang, flag="--lang"):
    require(re.fullmatch(r"[a-z]{3}_[A-Z][a-z]{3}", lang), f"unknown language code '{lang}' for {flag}: use a "
            "FLORES-200 code such as eng_Latn or fra_Latn")

def check_train_settings(c):
    """train.py's settings (c) that no run could use: one line each, before any work is done."""
    require_positive(c, ("batch_size", "block_size", "n_layer", "n_head", "n_embd",
                         "gradient_accumulation_steps", "eval_iters"))
    require(c["n_embd"] % c["n_head"] == 0 and (c["n_embd"] // c["n_head"]) % 2 == 0,
            f"--n_embd={c['n_embd']} must be a multiple of --n_head={c['n_head']} with an even head size (RoPE)")
    require(0 <= c["dropout"] < 1, f"--dropout={c['dropout']} must be in [0, 1)")
    init = os.path.join(c["init_from"], "ckpt.pt") if os.path.isdir(c["init_from"]) else c["init_from"]
    require(os.path.realpath(init) != os.path.realpath(os.path.join(c["out_dir"], "ckpt.pt")),
            f"--init_from={c['init_from']} is --out_dir's own checkpoint: finetune into another --out_dir")
    require(c["model_type"] in ("baselcm", "one_tower", "two_tower", "diffusion"),
            f"--model_type={c['model_type']}: use baselcm, one_tower or two_tower")
    # torchrun's processes
    world = int(os.environ.get("WORLD_SIZE", 1))
    windows = c["gradient_accumulation_steps"] * c["batch_size"]
    require(world <= windows, f"{world} processes share a global batch of {windows} windows: raise "
            "--batch_size or --gradient_accumulation_steps, or use fewer processes")

def check_embed_settings(c):
    """embed.py's settings (c) that no run could use: one line each, before any work is done."""
    check_lang(c["lang"])
    require(c["dtype"] in ("float16", "float32"), f"--dtype={c['dtype']} is not a storage type: use float16 "
            "or float32")
    require(0 < c["val_fraction"] < 1, f"--val_fraction={c['val_fraction']} must be between 0 and 1")
    require_positive(c, ("batch_size", "chunk_docs", "max_chars", "norm_sample"))
    require(c["max_docs"] >= 0, f"--max_docs={c['max_docs']} must be 0 (all documents) or more")
    require(not c["pairs"] or len(c["pairs"].split(",")) == 2 and all(c["pairs"].split(",")),
            f"--pairs={c['pairs']}: name two columns, PROMPT,ANSWER")

def get_device(device):
    """'' -> cuda, mps or cpu, whichever is here; a named device is checked: a typo is one line."""
    here = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if not device:
        return here
    try:
        named = torch.device(device)
    except RuntimeError:
        named = None
    if named is None or named.type not in ("cuda", "mps", "cpu"):
        die(f"--device={device} is not a device: use cuda, cuda:N, mps or cpu (or leave it empty)")
    if named.type not in ("cpu", here):
        die(f"--device={device}, but this machine has no {named.type}: use --device=cpu or leave it empty")
    count = torch.cuda.device_count() if named.type == "cuda" else 1
    if (named.index or 0) >= count:
        die(f"--device={device}, but this machine has {count} {named.type} device{'s' * (count > 1)}: "
            f"use an index below {count}, or leave it empty")
    return device

def init_distributed(device, backend="", timeout_hours=0):
    """For a process of torchrun: joins the group and takes its own GPU. -> (rank, world, device);
    (0, 1, device) without torchrun. The backend: nccl on GPUs, gloo otherwise, unless named."""
    if int(os.environ.get("RANK", -1)) == -1:
        return 0, 1, device
    cuda = device.startswith("cuda")
    if cuda:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    backend = backend or ("nccl" if cuda else "gloo")
    # imported after the group exists, dynamo keeps references to it, so that leaving the group
    # does not end gloo's threads: they would then release their last tensors while Python shuts
    # down, and a thread that needs the GIL then aborts the process ("terminate called without an
    # active exception"). Imported before, nothing outlives end_distributed.
    import torch._dynamo  # noqa: F401
    timeout = timedelta(hours=timeout_hours) if timeout_hours else None
    # a bound device: NCCL knows each rank's GPU from the start (and does not warn at exit)
    torch.distributed.init_process_group(backend=backend, timeout=timeout,
                                         device_id=torch.device(device) if cuda else None)
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), device

def end_distributed():
    """Leaves the process group, if any, once every process is done with it; its threads end here.
    Whatever holds the group (a DDP model) must be dropped first."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()

def writable_dir(path, flag):
    """Creates path and checks that files can be written there, before any work is done."""
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        die(f"cannot write to --{flag}={path} ({e.strerror}): pick a folder you can write to")

def synchronize(device):
    kind = torch.device(device).type
    if kind == "cuda":
        torch.cuda.synchronize(device)
    elif kind == "mps":
        torch.mps.synchronize()

def measure_peak_flops(device, dtype, sizes=(), seconds=0.3):
    """FLOP/s of F.linear (the model's kernel) in dtype, measured here and now: the MFU denominator,
    instead of a datasheet number for some other chip. The best of a few square sizes."""
    if not sizes:
        sizes = (4096, 8192) if torch.device(device).type == "cuda" else (512, 1024, 2048)
    best = 0.0
    for n in sizes:
        # ones, not random numbers: training's RNG stays untouched
        a = torch.ones(n, n, device=device, dtype=dtype)
        F.linear(a, a)
        synchronize(device)
        reps = 0
        t = time.perf_counter()
        while reps < 3 or time.perf_counter() - t < seconds:
            F.linear(a, a)
            reps += 1
            synchronize(device)
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t))
    return best

def autocast(dtype, device, n_embd):
    """-> (the autocast context of a training dtype, the dtype). '' (auto): bf16 on GPUs that have
    it, fp16 on older ones. CPUs differ (bf16 matmuls from 0.2x to 10x fp32's speed), so on a CPU
    it is measured at the model's sizes, bf16 taken when 1.5x faster; rank 0's choice holds."""
    kind = torch.device(device).type
    if not dtype and kind == "cpu":
        rate = {d: measure_peak_flops(device, getattr(torch, d), (n_embd, 4 * n_embd), 0.1)
                for d in ("float32", "bfloat16")}
        faster = torch.tensor(float(rate["bfloat16"] > 1.5 * rate["float32"]))
        if torch.distributed.is_initialized():
            torch.distributed.broadcast(faster, 0)
        dtype = "bfloat16" if faster else "float32"
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"dtype: {dtype} (F.linear at this model's sizes: float32 {rate['float32'] / 1e9:.0f}, "
                  f"bfloat16 {rate['bfloat16'] / 1e9:.0f} GFLOP/s; bf16 is used when 1.5x faster)")
    elif not dtype:
        dtype = "float32" if kind != "cuda" else "bfloat16" if has_bf16(device) else "float16"
    if dtype not in ("float32", "bfloat16", "float16"):
        die(f"--dtype={dtype}: use float32, bfloat16 or float16")
    if dtype == "float32":
        return nullcontext(), dtype
    return torch.autocast(device_type=kind, dtype=getattr(torch, dtype)), dtype

def has_bf16(device):
    """bf16 in hardware: compute capability 8.0 (Ampere) and up, or AMD.
    torch.cuda.is_bf16_supported() also says yes where bf16 is only emulated (T4, V100, RTX 20xx,
    GTX 16xx/10xx): slow there."""
    return bool(torch.version.hip) or torch.cuda.get_device_capability(device) >= (8, 0)

def can_compile(device):
    """Whether torch.compile can build kernels here, by the checks its inductor backend makes:
    triton for a GPU (none on Windows, none below compute capability 7.0), a C++ compiler for a CPU.
    If not, one line says why and the caller stays eager (not a traceback at the first forward)."""
    kind = torch.device(device).type
    try:
        if kind == "cuda":
            from torch.utils._triton import has_triton
            major, minor = torch.cuda.get_device_capability(device)
            if major < 7:
                raise RuntimeError(f"compute capability {major}.{minor} is below triton's 7.0")
            if not has_triton():
                raise RuntimeError("triton is not installed (it has no Windows wheels)")
        elif kind == "cpu":
            from torch._inductor.cpp_builder import get_cpp_compiler
            get_cpp_compiler()
    except Exception as e:
        print(f"compile=True, but {device} cannot compile ({type(e).__name__}: {first_line(e)}): "
              "running eager")
        return False
    return True

def start_wandb(project, name, config, run_id=None):
    """-> a Weights & Biases run (resumed if run_id is given). wandb is imported here only; a
    missing or broken one, or no login, is one line."""
    try:
        import wandb
    except Exception as e:
        die(f"--wandb_log=True, but wandb does not import ({type(e).__name__}: {first_line(e)}): "
            "pip install wandb")
    offline = os.environ.get("WANDB_MODE") in ("offline", "disabled")
    if not offline and not wandb.login(prompt=False):
        die("--wandb_log=True, but W&B has no login: run `wandb login`, or set WANDB_MODE=offline")
    try:
        return wandb.init(project=project, name=name, config=config, id=run_id,
                          resume="allow" if run_id else None)
    except Exception as e:
        die(f"W&B did not start ({type(e).__name__}: {first_line(e)}): check `wandb login`, or set "
            "WANDB_MODE=offline")

class RunLog:
    """A run's log: a file with a JSON record a line (log.jsonl), and the same to a Weights &
    Biases run, if given: evaluations as val/{predictor}/{loss,l2,ca}, training as train/loss, lr,
    ms, mfu."""

    def __init__(self, path, append, wandb_run=None):
        self.file = open(path, "a" if append else "w")
        self.wandb = wandb_run

    def write(self, record):
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb and "val" in record:
            r = record["val"]
            kept = {f"val/{k}/{m}": v for k in r for m, v in r[k].items() if m in ("loss", "l2", "ca")}
            self.wandb.log(kept, record["iter"])
        elif self.wandb and "loss" in record:
            self.wandb.log({"train/loss": record["loss"]} | {k: record[k] for k in ("lr", "ms", "mfu")},
                           record["iter"])

def atomic_save(obj, path):
    """torch.save to a temporary file, then rename: a crash never leaves a broken checkpoint."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
