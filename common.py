"""
The machinery: what keeps runs safe and the scripts pleasant, none of the lesson. A reader learning how
an LCM works can skip this file. It holds the knobs (module globals, config files, --key=value,
--help), one-line errors, the device, dtype and processes, the measured matmul peak (MFU), atomic
saves, checkpoints read back (older baselcm's brought up to date), the checks that refuse to mix a
checkpoint, a dataset and a run, a dataset's settings and work folder, and the run's log (and W&B).
"""
import ast, difflib, glob, hashlib, inspect, itertools, json, os, re, shutil, sys, tempfile, time
from contextlib import nullcontext
from datetime import timedelta

import torch
from torch.nn import functional as F

from baselcm import MAX_SENTENCES

# -----------------------------------------------------------------------------
# errors and knobs

def die(msg):
    """An expected mistake: one line on stderr, a non-zero exit, no traceback."""
    print(f"error: {msg}", file=sys.stderr)
    # objects torn down after this line (a dataset reader) add nothing
    sys.unraisablehook = lambda *a: None
    sys.exit(1)

def require(ok, msg):
    if not ok:
        die(msg)

def first_line(e, width=160):
    return str(e).splitlines()[0][:width] if str(e) else ""

def knobs(g):
    """A script's knobs, in the order they are defined: its module globals of a simple type."""
    return [k for k, v in g.items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))]

def print_help(g):
    """--help: the script's docstring, then each knob with its default and the comment beside it (a
    comment may go on, indented, on the lines below)."""
    print(g["__doc__"].strip() + "\n\noptions (--key=value), with their defaults:")
    lines = open(g["__file__"], encoding="utf-8").read().splitlines()
    todo = knobs(g)
    for i, line in enumerate(lines):
        knob = re.match(r"(\w+) = [^#]*(?:# (.*))?$", line)
        if knob and knob[1] in todo:
            todo.remove(knob[1])
            more = itertools.takewhile(lambda line: re.match(r" +# ", line), lines[i + 1:])
            text = " ".join([knob[2] or ""] + [m.strip()[2:] for m in more]).strip()
            option = f"--{knob[1]}={g[knob[1]] if g[knob[1]] != '' else repr('')}"
            gap = "\n" + " " * 37 if len(option) > 34 and text else " "
            print(f"  {option:34}{gap}{text}".rstrip())

def configure(g, argv):
    """Sets a script's knobs in g from config files (python assignments) and --key=value pairs, in
    order (a str knob takes the text as given). -> the keys set. A script whose eval_only ends up True
    (train.py) hands over to eval.py, with the options that eval.py knows; else an unknown --key is one
    line."""
    keys = knobs(g)
    given = set()
    unknown = []
    if "--help" in argv or "-h" in argv:
        print_help(g)
        sys.exit(0)
    for arg in argv:
        if arg.startswith("--"):
            key, eq, val = arg[2:].partition("=")
            require(eq, f"{arg} has no value: write --{key}=VALUE")
            if key not in keys:
                unknown.append(arg)
                continue
            if not isinstance(g[key], str):
                try:
                    val = ast.literal_eval(val)
                except (SyntaxError, ValueError):
                    pass  # reported below as the wrong type
            pairs = [(key, val)]
        else:
            require(os.path.isfile(arg), f"config file {arg} not found (expected a file like "
                    "config/train_diffusion.py or --key=value)")
            cfg = {}
            exec(open(arg).read(), {}, cfg)
            pairs = [(k, v) for k, v in cfg.items() if not k.startswith("_")]
        for key, val in pairs:
            require(key in keys, unknown_option(key, arg, keys))
            val = float(val) if type(g[key]) is float and type(val) is int else val
            require(type(val) is type(g[key]), f"--{key} wants a {type(g[key]).__name__}, got {val!r} "
                    f"(from {arg})")
            g[key] = val
            given.add(key)
    if g.get("eval_only"):
        shared = [f"--{k}={g[k]}" for k in given if k in ("out_dir", "dataset", "data_root", "eval_iters",
                                                          "device", "dtype")]
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "eval.py")
        os.execv(sys.executable, [sys.executable, script, *shared, *unknown])
    for arg in unknown:
        die(unknown_option(arg[2:].partition("=")[0], arg, keys))
    return given

def unknown_option(key, arg, keys):
    near = difflib.get_close_matches(key, keys, n=1)
    return f"unknown option '{key}' (from {arg}): " + (f"did you mean --{near[0]}?" if near else
                                                        f"{sys.argv[0]} --help lists them")

def check_lang(lang, flag="--lang"):
    require(re.fullmatch(r"[a-z]{3}_[A-Z][a-z]{3}", lang), f"unknown language code '{lang}' for {flag}: use a "
            "FLORES-200 code such as eng_Latn or fra_Latn")

# -----------------------------------------------------------------------------
# devices, dtypes and processes

def get_device(device):
    """'' -> cuda, mps or cpu, whichever is here; a named device is checked: a typo is one line."""
    here = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if not device:
        return here
    try:
        kind = torch.device(device).type
    except RuntimeError:
        kind = None
    require(kind in ("cuda", "mps", "cpu"), f"--device={device} is not a device: use cuda, cuda:N, mps "
            "or cpu (or leave it empty)")
    require(kind in ("cpu", here), f"--device={device}, but this machine has no {kind}: use --device=cpu "
            "or leave it empty")
    count = torch.cuda.device_count() if kind == "cuda" else 1
    require((torch.device(device).index or 0) < count, f"--device={device}, but this machine has "
            f"{count} {kind} device{'s' * (count > 1)}: use an index below {count}, or leave it empty")
    return device

def autocast(dtype, device):
    """-> (the autocast context of a training dtype, the dtype). '' follows the hardware: bf16 on GPUs
    with bf16 units (compute capability 8.0 and up, or AMD; torch.cuda.is_bf16_supported() also says
    yes where it is only emulated), fp16 on older ones, fp32 on a Mac and a CPU."""
    kind = torch.device(device).type
    if not dtype and kind == "cuda":
        bf16 = bool(torch.version.hip) or torch.cuda.get_device_capability(device) >= (8, 0)
        dtype = "bfloat16" if bf16 else "float16"
    dtype = dtype or "float32"
    require(dtype in ("float32", "bfloat16", "float16"), f"--dtype={dtype}: use float32, bfloat16 or "
            "float16")
    if dtype == "float32":
        return nullcontext(), dtype
    return torch.autocast(device_type=kind, dtype=getattr(torch, dtype)), dtype

def can_compile(device):
    """Whether torch.compile can build kernels here (triton on a GPU of compute capability 7.0 and up,
    a C++ compiler on a CPU); if not, one line says why and the caller stays eager."""
    try:
        if torch.device(device).type == "cuda":
            from torch.utils._triton import has_triton
            major, minor = torch.cuda.get_device_capability(device)
            if major < 7:
                raise RuntimeError(f"compute capability {major}.{minor} is below triton's 7.0")
            if not has_triton():
                raise RuntimeError("triton is not installed (it has no Windows wheels)")
        elif torch.device(device).type == "cpu":
            from torch._inductor.cpp_builder import get_cpp_compiler
            get_cpp_compiler()
    except Exception as e:
        print(f"compile=True, but {device} cannot compile ({type(e).__name__}: {first_line(e)}): "
              "running eager")
        return False
    return True

def init_distributed(device, backend="", timeout_hours=0):
    """For a process of torchrun: joins the group (nccl on GPUs, gloo otherwise, unless named) and
    takes its own GPU. -> (rank, world, device); (0, 1, device) without torchrun."""
    if int(os.environ.get("RANK", -1)) == -1:
        return 0, 1, device
    cuda = device.startswith("cuda")
    if cuda:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    # imported after the group exists, dynamo keeps references to it, and gloo's threads outlive
    # end_distributed (then abort the process at exit); imported before, nothing does
    import torch._dynamo  # noqa: F401
    timeout = timedelta(hours=timeout_hours) if timeout_hours else None
    torch.distributed.init_process_group(backend=backend or ("nccl" if cuda else "gloo"), timeout=timeout,
                                         device_id=torch.device(device) if cuda else None)
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), device

def end_distributed():
    """Leaves the process group, if any, once every process is done (drop a DDP model first)."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()

def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    elif torch.device(device).type == "mps":
        torch.mps.synchronize()

def measure_peak_flops(device, dtype, seconds=0.3):
    """FLOP/s of F.linear (the model's kernel) in dtype, measured here and now: the MFU denominator,
    instead of a datasheet number for some other chip. The best of a few square sizes."""
    best = 0.0
    for n in (4096, 8192) if torch.device(device).type == "cuda" else (512, 1024, 2048):
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

# -----------------------------------------------------------------------------
# files and checkpoints

def writable_dir(path, flag):
    """Creates path and checks that files can be written there, before any work is done."""
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        die(f"cannot write to --{flag}={path} ({e.strerror}): pick a folder you can write to")

def atomic_save(obj, path):
    """torch.save to a temporary file, then rename: a crash never leaves a broken checkpoint."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

def load_checkpoint(path, mmap=True):
    """A checkpoint, or a folder holding ckpt.pt -> the checkpoint (a dict; "path": its file), weights
    only (a shared checkpoint cannot run code), in today's format."""
    given = path
    path = os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path
    require(os.path.isfile(path), f"no checkpoint at {given}: train one with `python train.py` or pass "
            "--out_dir=DIR")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        ckpt["path"] = path
        return upgrade(ckpt)
    except Exception as e:
        unreadable(path, e)

def unreadable(path, e):
    die(f"{path} is not a readable baselcm checkpoint ({type(e).__name__}): retrain it, "
        "or pass the --out_dir of another run")

def upgrade(ckpt):
    """An older baselcm's checkpoint in today's format: the weights without torch.compile's prefix;
    the One-Tower once named 'diffusion'; before the stop head, one that never ends a text; before
    guidance, no training mean (the median stands in); before the Two-Tower's denoiser read
    positions, none; no count of evaluations without a better one, nor a W&B run."""
    # a foreign checkpoint has none of these
    ckpt["config"], ckpt["data"], ckpt["model_args"]
    ckpt.setdefault("evals_since_best", 0)
    ckpt.setdefault("wandb_id", None)
    model_type = ckpt["config"].get("model_type", "baselcm")
    ckpt["config"]["model_type"] = "one_tower" if model_type == "diffusion" else model_type
    weights = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
    if "stop.weight" not in weights:
        print(f"{ckpt['path']} has no stop head (made before it): it stops at end of text by the cosine "
              "alone (stop_eot); resumed, its optimizer starts afresh")
        ckpt["optimizer"] = None
        weights["stop.weight"] = torch.zeros(1, ckpt["model_args"]["n_embd"])
        weights["stop.bias"] = torch.zeros(1)
        weights["stop_prior"] = torch.full((MAX_SENTENCES,), -torch.inf)
    if ckpt["config"]["model_type"] != "baselcm" and "denoiser_rope" not in ckpt["model_args"]:
        # #30's Two-Tower attended by content alone, and its best was by the denoising loss
        print(f"{ckpt['path']} was made before a diffusion model's best was its conditional mean's: "
              "resumed, it looks for the best afresh")
        ckpt["model_args"]["denoiser_rope"] = False
        ckpt["best_val_loss"] = float("inf")
        ckpt["evals_since_best"] = 0
    if "normalizer.mean" not in weights:
        print(f"{ckpt['path']} was made before guidance: guided, its prediction without context is the "
              "median")
        weights["normalizer.mean"] = weights["normalizer.center"]
    ckpt["model"] = weights
    return ckpt

def take_settings(g, given, ckpt, source, finetune):
    """A run from the checkpoint at source takes its settings into g, but those given here: resuming,
    all its run's but this machine's; finetuning, its model's. A model's own cannot change (but for
    finetuning's dropout): one line; resuming, what changed is printed."""
    old = ckpt["config"] | ckpt["model_args"]
    model = ["model_type"] + [k for k in ckpt["model_args"] if k != "d_emb"]
    take = [k for k in (model if finetune else old) if k in g
            and k not in ("out_dir", "init_from", "eval_only", "device", "backend")]
    changed = {k: g[k] for k in take if k in given and g[k] != old[k]}
    for k in set(changed) & set(model) - {"dropout" if finetune else ""}:
        die(f"--{k}={changed[k]}, but {source} was made with {k}={old[k]}: the model's settings cannot "
            "change; train a new model in another --out_dir")
    if changed and not finetune:
        print("changed from the checkpoint: " + ", ".join(f"{k} {old[k]} -> {v}" for k, v in changed.items()))
    for k in take:
        g[k] = g[k] if k in given else old[k]

def check_train_settings(c, models):
    """train.py's settings (c) that no run could use: one line each, before any work is done."""
    for k in ("batch_size", "block_size", "n_layer", "n_head", "n_embd", "gradient_accumulation_steps",
              "eval_iters"):
        require(c[k] >= 1, f"--{k}={c[k]} must be at least 1")
    require(c["n_embd"] % c["n_head"] == 0 and c["n_embd"] // c["n_head"] % 2 == 0, f"--n_embd={c['n_embd']} "
            f"must be a multiple of --n_head={c['n_head']} with an even head size (RoPE)")
    require(0 <= c["dropout"] < 1, f"--dropout={c['dropout']} must be in [0, 1)")
    require(c["model_type"] in models, f"--model_type={c['model_type']}: use {', '.join(models)}")
    init = os.path.join(c["init_from"], "ckpt.pt") if os.path.isdir(c["init_from"]) else c["init_from"]
    require(os.path.realpath(init) != os.path.realpath(os.path.join(c["out_dir"], "ckpt.pt")),
            f"--init_from={c['init_from']} is --out_dir's own checkpoint: finetune into another --out_dir")
    world = int(os.environ.get("WORLD_SIZE", 1))
    windows = c["gradient_accumulation_steps"] * c["batch_size"]
    require(world <= windows, f"{world} processes share a global batch of {windows} windows: raise "
            "--batch_size or --gradient_accumulation_steps, or use fewer processes")

def load_optimizer(optimizer, scaler, ckpt):
    """The optimizer's and the GradScaler's states, fused as this run is (an older Mac run's was not);
    none saved (a checkpoint made before the stop head, a scaler that was off): they start fresh."""
    if ckpt["optimizer"]:
        optimizer.load_state_dict(ckpt["optimizer"])
    for group in optimizer.param_groups:
        group["fused"] = True
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])

def sampling_settings(model, where, **settings):
    """-> the sampling settings given (not 0); one of another model's (a Base-LCM's noise, a diffusion
    LCM's steps) is one line."""
    given = {k: v for k, v in settings.items() if v}
    unknown = [k for k in given if k not in inspect.signature(model.predict).parameters]
    require(not unknown, f"--{', --'.join(unknown)}: not a sampling setting of the {type(model).__name__} "
            f"in {where}")
    return given

# -----------------------------------------------------------------------------
# datasets: what made them, and checks against mixing them

def load_meta(data_dir):
    path = os.path.join(data_dir, "meta.json")
    require(os.path.isfile(path), f"no dataset at {data_dir} (meta.json missing): build it with `python "
            f"embed.py` (or `python embed.py --dataset=FILE --name={os.path.basename(data_dir)}`)")
    with open(path) as f:
        return json.load(f)

def same_space(a, b):
    """Two encoder names that give the same concepts: SONAR's two implementations are one space."""
    return a == b or {a, b} <= {"sonar", "sonar_hf"}

def check_trained_on(data_dir, meta, trained_on, model, flag, named=True):
    """One line if data_dir holds concepts of another space than the model's (trained_on: its
    checkpoint's "data"), or was rebuilt since it was trained, unless named."""
    if not same_space(meta["encoder"], trained_on["encoder"]) or meta["d_emb"] != trained_on["d_emb"]:
        die(f"{data_dir} holds {meta['encoder']} concepts (d_emb {meta['d_emb']}), but {model} was "
            f"trained on {trained_on['encoder']} (d_emb {trained_on['d_emb']}): pass a --{flag} built "
            "with that encoder")
    require(meta.get("key") == trained_on.get("key") or named, f"{data_dir} was rebuilt after {model} was "
            f"trained on it: pass --{flag}={os.path.basename(data_dir)} to use it anyway")

def data_facts(data_dir, meta):
    """What a checkpoint keeps of its dataset, for sample.py and the checks above."""
    facts = ("encoder", "lang", "d_emb", "eot", "spacy_model", "max_chars", "key", "prompt_end", "pairs")
    return {k: meta.get(k) for k in facts} | {"dir": os.path.abspath(data_dir)}

def settings_of(knobs, source, files):
    """What decides a dataset (embed.py): its knobs, the source, each file's name, size and time."""
    top = source if os.path.isdir(source) else os.path.dirname(source)
    settings = dict(knobs, dataset=os.path.abspath(source) if files else source)
    settings["files"] = [[os.path.relpath(f, top), os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files]
    return settings

def start_work(out, settings, defaults, overwrite, rank):
    """-> (the settings' key, the work folder for them; None if out holds the dataset they made). A
    dataset of another source or settings is refused in one line; partial work of other settings is
    removed. A knob added since a dataset was made, at its default, made no difference."""
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    work = os.path.join(out, f"work-{key}")
    if os.path.exists(os.path.join(out, "meta.json")) and not overwrite:
        old = load_meta(out).get("settings")
        if old is None:
            what = "by an older baselcm, which did not record its settings"
        elif old["dataset"] != settings["dataset"]:
            what = f"from {old['dataset']}"
        else:
            differ = [k for k in settings if old.get(k, defaults.get(k)) != settings[k]]
            if not differ:
                return key, None
            what = f"with other settings ({', '.join(differ)})"
        die(f"{out} was built {what}: pass --name=NEW for a new dataset, or --overwrite=True to replace it")
    if rank == 0:
        for old_work in glob.glob(os.path.join(out, "work*")):
            if old_work != work or overwrite:
                if not overwrite:
                    print(f"{old_work} holds partial work from other settings: starting clean")
                shutil.rmtree(old_work)
        if overwrite and os.path.exists(os.path.join(out, "meta.json")):
            # unfinished from here on; the new files replace the old
            os.remove(os.path.join(out, "meta.json"))
    os.makedirs(work, exist_ok=True)
    return key, work

# -----------------------------------------------------------------------------
# the run's log

class RunLog:
    """A run's records: JSON lines in out_dir/log.jsonl, and with wandb_log, W&B's charts: training as
    train/loss, lr, ms, mfu; evaluations as val/{model,copy,mean}/{loss,l2,ca}. A resumed run goes on
    with its W&B run (wandb_id)."""

    def __init__(self, out_dir, resume, wandb_log, project, name, config, wandb_id=None):
        self.file = open(os.path.join(out_dir, "log.jsonl"), "a" if resume else "w")
        self.wandb = None
        if wandb_log:
            # imported here only: a missing or broken wandb, or no login, is one line
            try:
                import wandb
            except Exception as e:
                die(f"--wandb_log=True, but wandb does not import ({type(e).__name__}: {first_line(e)}): "
                    "pip install wandb")
            offline = os.environ.get("WANDB_MODE") in ("offline", "disabled")
            require(offline or wandb.login(prompt=False), "--wandb_log=True, but W&B has no login: run "
                    "`wandb login`, or set WANDB_MODE=offline")
            self.wandb = wandb.init(project=project, name=name, config=config, id=wandb_id,
                                    resume="allow" if wandb_id else None)
        self.wandb_id = self.wandb.id if self.wandb else None

    def __call__(self, record):
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb and "val" in record:
            self.wandb.log({f"val/{k}/{m}": v for k, r in record["val"].items() for m, v in r.items()
                            if m in ("loss", "l2", "ca")}, record["iter"])
        elif self.wandb and "loss" in record:
            train = {"train/loss": record["loss"]} | {k: record[k] for k in ("lr", "ms", "mfu")}
            self.wandb.log(train, record["iter"])
