"""
Checkpoints (checkpoints.py, common.py): atomic writes, compiled models, and what an older baselcm
wrote.
"""
import json, os, shutil

import pytest
import torch

import checkpoints, common
from baselcm import BaseLCM
from conftest import HERE, log_of, run, tiny_config

def test_failed_checkpoint_write_leaves_the_previous_loadable(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    common.atomic_save({"iter_num": 1}, path)
    real_save = torch.save

    def crash(obj, f):
        real_save({"half": "written"}, f)
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        common.atomic_save({"iter_num": 2}, path)
    assert torch.load(path)["iter_num"] == 1 and os.listdir(tmp_path) == ["ckpt.pt"]

def test_checkpoint_of_a_compiled_model_loads(tmp_path):
    model = BaseLCM(tiny_config())
    compiled = torch.compile(model)
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())
    common.atomic_save({"model": compiled.state_dict(), "model_args": model.config.__dict__,
                        "config": {}, "data": {}},
                        tmp_path / "c.pt")
    loaded, _ = checkpoints.load_model(str(tmp_path / "c.pt"))
    x = torch.randn(1, 5, 16)
    assert torch.equal(loaded.eval()(x)[0], model.eval()(x)[0])

def test_a_checkpoint_made_before_guidance_loads_and_guides_from_the_median(tmp_path, capsys):
    model = BaseLCM(tiny_config()).eval()
    weights = {k: v for k, v in model.state_dict().items() if k != "normalizer.mean"}  # as at aa44a11
    common.atomic_save({"model": weights, "model_args": model.config.__dict__, "config": {}, "data": {}},
                       tmp_path / "c.pt")
    loaded, _ = checkpoints.load_model(str(tmp_path / "c.pt"))
    assert capsys.readouterr().out.count("made before guidance") == 1
    x = torch.randn(1, 5, 16)
    p, g = loaded.predict(x)[0], loaded.predict(x, guidance=2.0)[0]
    center = loaded.normalizer.normalize(loaded.normalizer.center)
    assert torch.allclose(g, center + 2 * (p - center), atol=1e-5)

def test_a_diffusion_checkpoint_made_before_its_best_was_the_conditional_means_looks_afresh(tmp_path,
                                                                                           capsys):
    model = checkpoints.build_model("two_tower", tiny_config().__dict__)
    args = {k: v for k, v in model.config.__dict__.items() if k != "denoiser_rope"}  # as at d1cf044
    common.atomic_save({"model": model.state_dict(), "model_args": args, "data": {},
                        "config": {"model_type": "two_tower"}, "best_val_loss": 140.0,
                        "evals_since_best": 2}, tmp_path / "c.pt")
    loaded, ckpt = checkpoints.load_model(str(tmp_path / "c.pt"))
    # the paper's denoiser, and no best by the denoising loss to hold a conditional mean's loss against
    assert loaded.config.denoiser_rope is False and capsys.readouterr().out.count("afresh") == 1
    assert ckpt["best_val_loss"] == float("inf") and ckpt["evals_since_best"] == 0
    # one made since keeps its own
    common.atomic_save({"model": model.state_dict(), "model_args": model.config.__dict__, "data": {},
                        "config": {"model_type": "two_tower"}, "best_val_loss": 330.0}, tmp_path / "d.pt")
    _, ckpt = checkpoints.load_model(str(tmp_path / "d.pt"))
    assert ckpt["best_val_loss"] == 330.0 and capsys.readouterr().out == ""

@pytest.mark.slow
def test_a_dataset_and_checkpoint_written_by_d41f47d_still_work(tmp_path):
    fixture = os.path.join(HERE, "fixtures", "d41f47d")
    shutil.copytree(os.path.join(fixture, "data"), tmp_path / "data")
    shutil.copytree(os.path.join(fixture, "out"), tmp_path / "out")
    meta = json.load(open(tmp_path / "data" / "tiny" / "meta.json"))
    # the source where it was embedded, with its size and time: embed.py sees the same settings
    source = meta["settings"]["dataset"]
    os.makedirs(os.path.dirname(source), exist_ok=True)
    shutil.copy(os.path.join(fixture, "docs.txt"), source)
    _, size, mtime_ns = meta["settings"]["files"][0]
    assert os.path.getsize(source) == size
    os.utime(source, ns=(mtime_ns, mtime_ns))
    p = run("embed.py", f"--dataset={source}", "--name=tiny", "--val_fraction=0.2", cwd=tmp_path)
    assert "already built with these settings" in p.stdout
    p = run("sample.py", "--start=The fire spread. Residents left.", "--json=True",
            "--max_new_concepts=2",
            "--data_dir=data/tiny", cwd=tmp_path)
    steps = json.loads(p.stdout.strip().splitlines()[-1])["steps"]
    bank = set((tmp_path / "data" / "tiny" / "train.txt").read_text().splitlines())
    assert 1 <= len(steps) <= 2 and all(s["text"] in bank for s in steps)
    # made before the stop head: it stops as it did, and says so once
    assert p.stdout.count("has no stop head (made before it)") == 1
    run("train.py", "--eval_only=True", cwd=tmp_path)
    assert json.load(open(tmp_path / "out" / "eval.json"))["iter"] == 6
    p = run("train.py", "--init_from=resume", "--max_iters=9", cwd=tmp_path)
    assert "changed from the checkpoint: max_iters 6 -> 9" in p.stdout
    assert max(r["iter"] for r in log_of(tmp_path / "out")) == 9
