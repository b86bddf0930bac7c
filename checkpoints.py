"""
Checkpoints (train.py's out_dir/ckpt.pt: the model's weights and settings, the run's settings, the
optimizer's and every process's random states, the facts of its dataset), an older baselcm's brought
up to today's as they load, and the models they hold.
"""
import inspect, os

import torch

from baselcm import MAX_SENTENCES, BaseLCM, LCMConfig
from common import die, require
from diffusion import DiffusionConfig, OneTower, TwoTower

MODELS = {"baselcm": (BaseLCM, LCMConfig), "one_tower": (OneTower, DiffusionConfig),
          "two_tower": (TwoTower, DiffusionConfig)}

def build_model(model_type, settings):
    """-> a new model of model_type (MODELS), with the settings of its config that are in settings
    (a dict; the others at their defaults)."""
    model, config = MODELS[model_type]
    return model(config(**{k: v for k, v in settings.items() if k in config.__dataclass_fields__}))

def load(path, mmap=True):
    """path: a checkpoint, or a folder that holds ckpt.pt -> the checkpoint (a dict; "path": the
    file), weights only (a shared checkpoint cannot run code), memory-mapped (sample.py never reads
    the optimizer; resume reads it whole: Windows cannot replace a mapped file)."""
    given = path
    path = os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path
    if not os.path.isfile(path):
        die(f"no checkpoint at {given}: train one with `python train.py` or pass --out_dir=DIR")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        # a foreign checkpoint has no such keys
        ckpt["config"], ckpt["data"], ckpt["model_args"], ckpt["model"]
        ckpt["path"] = path
        return upgrade(ckpt)
    except Exception as e:
        unreadable(path, e)

def upgrade(ckpt):
    """An older baselcm's checkpoint in today's format, in this one place: the weights without
    torch.compile's prefix; before 711f3d5, one CPU random state (before d41f47d in a list); before the
    Two-Tower, the One-Tower named 'diffusion'; before the stop head, a head that never ends a text
    (its prior -inf); before guidance, no training mean (the median stands in); before the Two-Tower's
    denoiser read positions, none; before 28a130a, no count of evaluations without a better one;
    before a87455b, no W&B run."""
    ckpt.setdefault("evals_since_best", 0)
    ckpt.setdefault("wandb_id", None)
    if "torch_rng" in ckpt:
        rng = ckpt.pop("torch_rng")
        ckpt["rng"] = [{"device": "cpu", "cpu": rng[0] if isinstance(rng, list) else rng}]
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
        # the Two-Tower of #30 attended to its context by content alone, as the paper's; and its best
        # was by the denoising loss, which no conditional mean's loss is to be compared with
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

def unreadable(path, e):
    die(f"{path} is not a readable baselcm checkpoint ({type(e).__name__}): retrain it, "
        "or pass the --out_dir of another run")

def model_from(ckpt, **changes):
    """-> the checkpoint's model with its weights, on the CPU; changes: settings that may differ
    from its own (finetuning's dropout)."""
    try:
        model = build_model(ckpt["config"]["model_type"], ckpt["model_args"] | changes)
        model.load_state_dict(ckpt["model"])
    except Exception as e:
        unreadable(ckpt["path"], e)
    return model

def model_settings(ckpt):
    """-> the names of the settings of the checkpoint's model: its type and its config's fields
    (not d_emb, which its data decides)"""
    config = MODELS[ckpt["config"]["model_type"]][1]
    return ["model_type"] + [k for k in ckpt["model_args"] if k in config.__dataclass_fields__ and k != "d_emb"]

def settings(ckpt):
    """-> the settings a checkpoint was made with: its run's, and its model's"""
    return ckpt["config"] | ckpt["model_args"]

def check_changes(ckpt, source, given, finetune):
    """given: the settings given on the command line that the run takes from the checkpoint at
    source (name -> value). Those of its model cannot change (but for a finetuning's dropout): one
    line and an exit; the others, resuming, are printed."""
    old = settings(ckpt)
    changed = {k: v for k, v in given.items() if v != old[k]}
    for k in set(changed) & set(model_settings(ckpt)) - {"dropout" if finetune else ""}:
        die(f"--{k}={changed[k]}, but {source} was made with {k}={old[k]}: the model's settings cannot "
            "change; train a new model in another --out_dir")
    if changed and not finetune:
        print("changed from the checkpoint: " + ", ".join(f"{k} {old[k]} -> {v}" for k, v in changed.items()))

def sampling_settings(model, where, **settings):
    """-> the sampler's settings given (not 0) for the model's predict; one of another model's (a
    Base-LCM's noise, a diffusion LCM's steps) is one line."""
    given = {k: v for k, v in settings.items() if v}
    unknown = [k for k in given if k not in inspect.signature(model.predict).parameters]
    require(not unknown, f"--{', --'.join(unknown)}: not a sampling setting of the {type(model).__name__} "
            f"in {where}")
    return given

def load_model(path):
    """-> (the model of the checkpoint at path, the checkpoint)"""
    ckpt = load(path)
    return model_from(ckpt), ckpt

def rng_states(device):
    """The random states of every process, by rank: the CPU's and the accelerator's (dropout and
    noise draw from the GPU's on a GPU). A checkpoint keeps them all: each rank's draws replay."""
    kind = torch.device(device).type
    state = {"device": kind, "cpu": torch.get_rng_state()}
    if kind != "cpu":
        state[kind] = getattr(torch, kind).get_rng_state()
    if not torch.distributed.is_initialized():
        return [state]
    states = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(states, state)
    return states

def set_rng_states(states, device, rank, world):
    """Restores this rank's states from rng_states(); where they came from another number of
    processes or another kind of device, rank 0 says that dropout and noise draw anew."""
    kind = torch.device(device).type
    if rank < len(states):
        torch.set_rng_state(states[rank]["cpu"])
        if kind != "cpu" and kind in states[rank]:
            getattr(torch, kind).set_rng_state(states[rank][kind])
    if rank == 0 and (len(states), states[0]["device"]) != (world, kind):
        print(f"the checkpoint holds the random states of {len(states)} process(es) on "
              f"{states[0]['device']}, this run is {world} on {kind}: dropout and noise draw anew")

def load_optimizer(optimizer, scaler, ckpt):
    """The optimizer's and the GradScaler's states from a checkpoint, fused as this run is (an older
    run on a Mac was not); a scaler the checkpoint's run had off (bf16, fp32), or an optimizer that
    had other parameters (made before the stop head), starts fresh."""
    if ckpt["optimizer"]:
        optimizer.load_state_dict(ckpt["optimizer"])
    for g in optimizer.param_groups:
        g["fused"] = True
    if ckpt["scaler"]:
        scaler.load_state_dict(ckpt["scaler"])
