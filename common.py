"""
What the scripts share: their knobs (module globals, then config files and --key=value), one-line
errors, the device, dtype and processes they run on, the measured matmul peak, atomic saves. The
floor of the project: it imports nothing of it.
"""
import ast, difflib, itertools, os, re, sys, tempfile, time
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

def require(ok, msg):
    if not ok:
        die(msg)

def first_line(e, width=160):
    return str(e).splitlines()[0][:width] if str(e) else ""

def knobs(g):
    """A script's knobs, in the order they are defined: its module globals of a simple type."""
    return [k for k, v in g.items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))]

def print_help(g):
    """--help: the script's docstring, then each knob with its default and the comment beside it,
    read from the script's source (a comment may go on, indented, on the lines below it)."""
    print(g["__doc__"].strip() + "\n\noptions (--key=value), with their defaults:")
    lines = open(g["__file__"], encoding="utf-8").read().splitlines()
    todo = knobs(g)
    for i, line in enumerate(lines):
        knob = re.match(r"(\w+) = [^#]*(?:# (.*))?$", line)
        if knob and knob[1] in todo:
            # each knob once, where it is first assigned
            todo.remove(knob[1])
            more = itertools.takewhile(lambda line: re.match(r" +# ", line), lines[i + 1:])
            text = " ".join([knob[2] or ""] + [m.strip()[2:] for m in more]).strip()
            option = f"--{knob[1]}={g[knob[1]] if g[knob[1]] != '' else repr('')}"
            gap = "\n" + " " * 37 if len(option) > 34 and text else " "
            print(f"  {option:34}{gap}{text}".rstrip())

def configure(g, argv, others=None):
    """Sets a script's knobs in g from config files (python assignments) and --key=value pairs, in
    order (a str knob takes the text as given). -> the keys set. An unknown --key is one line, or, if
    a list others is given, kept there (another script's)."""
    keys = knobs(g)
    given = set()
    if "--help" in argv or "-h" in argv:
        print_help(g)
        sys.exit(0)
    for arg in argv:
        if arg.startswith("--"):
            key, eq, val = arg[2:].partition("=")
            require(eq, f"{arg} has no value: write --{key}=VALUE")
            if key not in keys and others is not None:
                others.append(arg)
                continue
            if key in keys and not isinstance(g[key], str):
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
            near = difflib.get_close_matches(key, keys, n=1)
            require(key in keys, f"unknown option '{key}' (from {arg}): "
                    + (f"did you mean --{near[0]}?" if near else f"{sys.argv[0]} --help lists them"))
            val = float(val) if type(g[key]) is float and type(val) is int else val
            require(type(val) is type(g[key]), f"--{key} wants a {type(g[key]).__name__}, got {val!r} "
                    f"(from {arg})")
            g[key] = val
            given.add(key)
    return given

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
    """-> (the autocast context of a training dtype, the dtype). '' (auto) follows the hardware: bf16
    on GPUs that have it in hardware (compute capability 8.0 and up, or AMD; torch.cuda.
    is_bf16_supported() also says yes where it is only emulated, slowly), fp16 on older ones, fp32 on
    a Mac and a CPU (--dtype=bfloat16 is faster on CPUs with bf16 units)."""
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
    """Whether torch.compile can build kernels here, by the checks its inductor backend makes:
    triton on a GPU (no Windows wheels; compute capability 7.0 at least), a C++ compiler on a CPU. If
    not, one line says why and the caller stays eager (not a traceback at the first forward)."""
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
    """For a process of torchrun: joins the group and takes its own GPU. -> (rank, world, device);
    (0, 1, device) without torchrun. The backend: nccl on GPUs, gloo otherwise, unless named."""
    if int(os.environ.get("RANK", -1)) == -1:
        return 0, 1, device
    cuda = device.startswith("cuda")
    if cuda:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    # imported after the group exists, dynamo keeps references to it, so that leaving the group
    # does not end gloo's threads: they would then release their last tensors while Python shuts
    # down, and a thread that needs the GIL then aborts the process ("terminate called without an
    # active exception"). Imported before, nothing outlives end_distributed.
    import torch._dynamo  # noqa: F401
    timeout = timedelta(hours=timeout_hours) if timeout_hours else None
    # a bound device: NCCL knows each rank's GPU from the start (and does not warn at exit)
    torch.distributed.init_process_group(backend=backend or ("nccl" if cuda else "gloo"), timeout=timeout,
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
    """Waits for the accelerator's queued work, before a clock is read."""
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

def atomic_save(obj, path):
    """torch.save to a temporary file, then rename: a crash never leaves a broken checkpoint."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
