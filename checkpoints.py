"""
The models a checkpoint can hold, by their model_type, and a checkpoint's model built and loaded.
"""
from baselcm import BaseLCM, LCMConfig
from common import load_checkpoint, unreadable
from diffusion import DiffusionConfig, OneTower, TwoTower
from quant import QuantC, QuantConfig, QuantD

MODELS = {"baselcm": (BaseLCM, LCMConfig), "one_tower": (OneTower, DiffusionConfig),
          "two_tower": (TwoTower, DiffusionConfig), "quant_c": (QuantC, QuantConfig),
          "quant_d": (QuantD, QuantConfig)}

def build_model(model_type, settings):
    """-> a new model of model_type, with the settings (a dict) that its config has."""
    model, config = MODELS[model_type]
    return model(config(**{k: v for k, v in settings.items() if k in config.__dataclass_fields__}))

def model_from(ckpt, **changes):
    """-> the checkpoint's model with its weights; changes: finetuning's dropout"""
    try:
        model = build_model(ckpt["config"]["model_type"], ckpt["model_args"] | changes)
        model.load_state_dict(ckpt["model"])
    except Exception as e:
        unreadable(ckpt["path"], e)
    return model

def load_model(path):
    """-> (the model of the checkpoint at path, the checkpoint)"""
    ckpt = load_checkpoint(path)
    return model_from(ckpt), ckpt
