"""
The machinery, none of the lesson: a reader learning how an LCM works can skip this file. Knobs and
one-line errors; devices, dtypes and processes; atomic saves, checkpoints read
back (an older baselcm's brought up to date) and the checks that refuse to mix a checkpoint, a dataset
and a run; a dataset's settings and work folder.
"""
import ast, difflib, glob, hashlib, inspect, itertools, json, os, re, shutil, sys, tempfile
from contextlib import contextmanager, nullcontext
from datetime import timedelta

import torch

from baselcm import MAX_SENTENCES


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

@contextmanager
def one_line(what, fix, kinds=Exception, match=""):
    """An exception of kinds (whose text holds match) inside is one line: what (the error): fix."""
    try:
        yield
    except kinds as e:
        if match not in str(e):
            raise
        die(f"{what} ({type(e).__name__}: {first_line(e)}): {fix}")

def knobs(g):
    """A script's knobs, in the order they are defined: its module globals of a simple type."""
    return [k for k, v in g.items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))]

def print_help(g):
    """--help: the script's docstring, then each knob, its default and comment (which may go on
    below)"""
    print(g["__doc__"].strip() + "\n\noptions (--key=value), with their defaults:")
    lines, todo = open(g["__file__"], encoding="utf-8").read().splitlines(), knobs(g)
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
    """Sets knobs in g from config files and --key=value pairs -> the keys set; eval_only hands over
    to eval.py"""
    keys, given, unknown = knobs(g), set(), []
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

def read_text(path, what):
    require(os.path.isfile(path), f"{what} {path} not found")
    with one_line(f"{what} {path} is not UTF-8", "re-save it as UTF-8", UnicodeDecodeError):
        return open(path, encoding="utf-8").read()


def get_device(device):
    """'' -> cuda, mps or cpu, whichever is here; a named device is checked: a typo is one line."""
    here = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if not device:
        return here
    require(re.fullmatch(r"(cuda|mps|cpu)(:\d+)?", device), f"--device={device} is not a device: use "
            "cuda, cuda:N, mps or cpu (or leave it empty)")
    kind = torch.device(device).type
    require(kind in ("cpu", here), f"--device={device}, but this machine has no {kind}: use "
            "--device=cpu or leave it empty")
    count = torch.cuda.device_count() if kind == "cuda" else 1
    require((torch.device(device).index or 0) < count, f"--device={device}, but this machine has "
            f"{count} {kind} device{'s' * (count > 1)}: use an index below {count}, or leave it empty")
    return device

def autocast(dtype, device):
    """-> (autocast, dtype); '' is bf16 on GPUs that have it in hardware, fp16 on older ones, else
    fp32"""
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
    """Whether torch.compile can build kernels here; if not, one line says why (the caller stays
    eager)"""
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
    """torchrun's process joins the group (nccl on GPUs, else gloo) -> (rank, world, its device)"""
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

def writable_dir(path, flag):
    """Creates path and checks that files can be written there, before any work is done."""
    with one_line(f"cannot write to --{flag}={path}", "pick a folder you can write to", OSError):
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()

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
    """A checkpoint (or its folder) -> the dict, in today's format; weights only: it cannot run code
    """
    file = os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path
    require(os.path.isfile(file), f"no checkpoint at {path}: train one with `python train.py` or pass "
            "--out_dir=DIR")
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
        ckpt["path"] = file
        return upgrade(ckpt)
    except Exception as e:
        unreadable(file, e)

def unreadable(path, e):
    die(f"{path} is not a readable baselcm checkpoint ({type(e).__name__}): retrain it, or pass the "
        "--out_dir of another run")

def upgrade(ckpt):
    """An older baselcm's checkpoint in today's format: without torch.compile's prefix; the
    One-Tower once named 'diffusion'; made before the stop head, guidance (the median stands in for
    the training mean), the Two-Tower's positions, the count of evaluations without a better one,
    W&B."""
    ckpt["config"], ckpt["data"], ckpt["model_args"]  # a foreign checkpoint has none
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
    """Resuming takes the run's settings, finetuning its model's, but those given (a model's cannot
    change)"""
    old = ckpt["config"] | ckpt["model_args"]
    model = ["model_type"] + [k for k in ckpt["model_args"] if k != "d_emb"]
    take = [k for k in (model if finetune else old) if k in g
            and k not in ("out_dir", "init_from", "eval_only", "device", "backend")]
    changed = {k: g[k] for k in take if k in given and g[k] != old[k]}
    for k in set(changed) & set(model) - {"dropout" if finetune else ""}:
        die(f"--{k}={changed[k]}, but {source} was made with {k}={old[k]}: the model's settings cannot "
            "change; train a new model in another --out_dir")
    if changed and not finetune:
        print("changed from the checkpoint: " + ", ".join(f"{k} {old[k]} -> {v}"
                                                          for k, v in changed.items()))
    for k in take:
        g[k] = g[k] if k in given else old[k]

def check_train_settings(c, models):
    """train.py's settings that no run could use: one line each, before any work is done"""
    for k in ("batch_size", "block_size", "n_layer", "n_head", "n_embd", "gradient_accumulation_steps",
              "eval_iters"):
        require(c[k] >= 1, f"--{k}={c[k]} must be at least 1")
    require(c["n_embd"] % c["n_head"] == 0 and c["n_embd"] // c["n_head"] % 2 == 0, f"--n_embd={c['n_embd']} "
            f"must be a multiple of --n_head={c['n_head']} with an even head size (RoPE)")
    require(0 <= c["dropout"] < 1, f"--dropout={c['dropout']} must be in [0, 1)")
    require(0 <= c["ema"] < 1, f"--ema={c['ema']} must be in [0, 1)")
    require(0 <= c["last_step_share"] <= 1, f"--last_step_share={c['last_step_share']} must be in [0, 1]")
    require(c["model_type"] in models, f"--model_type={c['model_type']}: use {', '.join(models)}")
    init = os.path.join(c["init_from"], "ckpt.pt") if os.path.isdir(c["init_from"]) else c["init_from"]
    require(os.path.realpath(init) != os.path.realpath(os.path.join(c["out_dir"], "ckpt.pt")),
            f"--init_from={c['init_from']} is --out_dir's own checkpoint: finetune into another --out_dir")
    world = int(os.environ.get("WORLD_SIZE", 1))
    windows = c["gradient_accumulation_steps"] * c["batch_size"]
    require(world <= windows, f"{world} processes share a global batch of {windows} windows: raise "
            "--batch_size or --gradient_accumulation_steps, or use fewer processes")

def load_optimizer(optimizer, scaler, ckpt):
    """The optimizer's and GradScaler's states (fused as this run is), where saved; else they start
    fresh"""
    if ckpt["optimizer"]:
        optimizer.load_state_dict(ckpt["optimizer"])
    for group in optimizer.param_groups:
        group["fused"] = True
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])

def sampling_settings(model, where, **settings):
    """-> the sampling settings given (not 0); another model's (a Base-LCM's noise) is one line"""
    given = {k: v for k, v in settings.items() if v}
    unknown = [k for k in given if k not in inspect.signature(model.predict).parameters]
    require(not unknown, f"--{', --'.join(unknown)}: not a sampling setting of the "
            f"{type(model).__name__} in {where}")
    return given


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
    """One line if data_dir holds another space than trained_on (a checkpoint's), or was rebuilt
    since"""
    require(same_space(meta["encoder"], trained_on["encoder"]) and meta["d_emb"] == trained_on["d_emb"],
            f"{data_dir} holds {meta['encoder']} concepts (d_emb {meta['d_emb']}), but {model} was "
            f"trained on {trained_on['encoder']} (d_emb {trained_on['d_emb']}): pass a --{flag} built "
            "with that encoder")
    require(meta.get("key") == trained_on.get("key") or named, f"{data_dir} was rebuilt after {model} was "
            f"trained on it: pass --{flag}={os.path.basename(data_dir)} to use it anyway")

def settings_of(knobs, source, files):
    """What decides a dataset (embed.py): its knobs, the source, each file's name, size and time."""
    top = source if os.path.isdir(source) else os.path.dirname(source)
    settings = dict(knobs, dataset=os.path.abspath(source) if files else source)
    settings["files"] = [[os.path.relpath(f, top), os.path.getsize(f), os.stat(f).st_mtime_ns]
                         for f in files]
    return settings

def start_work(out, settings, defaults, overwrite, rank):
    """-> (the settings' key, their work folder, None if out holds their dataset); another is
    refused"""
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
        die(f"{out} was built {what}: pass --name=NEW for a new dataset, or --overwrite=True to "
            "replace it")
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
