"""
The diffusion LCMs (diffusion.py, both towers): what a noisy concept sees, the schedule, the sampler
against the training path's network, the paper's two-mode argument, and a diffusion run of train.py
(resume, evaluation, the guidance curve).
"""
import json, os

import numpy as np
import pytest
import torch

import checkpoints, diffusion
from baselcm import BaseLCM
from conftest import log_of, resumes_exactly, run, tiny_config
from diffusion import DiffusionLCM, OneTower, TwoTower

def tiny_diffusion(tower=OneTower, **kw):
    return tower(diffusion.DiffusionConfig(**tiny_config(**kw).__dict__))

@pytest.mark.parametrize("tower", [OneTower, TwoTower])
def test_a_noisy_concept_sees_neither_its_clean_target_nor_later_concepts_nor_other_noisy_ones(tower):
    torch.manual_seed(0)
    model = tiny_diffusion(tower).eval()
    with torch.no_grad():
        # the Two-Tower's modulations start at zero (every denoiser block the identity): as trained
        for name, p in model.named_parameters():
            if "modulation" in name or name.startswith("final"):
                p.normal_(std=0.1)
    B, T, k = 2, 10, 4
    concepts, noisy = torch.randn(B, T, 16), torch.randn(B, T, 16)
    t = torch.randint(0, 100, (B, T))
    cond = torch.zeros(B, T, dtype=torch.bool)
    # the one network of training and sampling, on the clean concepts' context
    denoise = lambda concepts, noisy, t, uncond: model.denoise(model.contextualize(concepts)[0], noisy,
                                                              model.timestep(t), uncond)[0]
    with torch.no_grad():
        pred = denoise(concepts, noisy, t, cond)
        # position k denoises the concept after c_k: c_{k+1} on is its target and the future
        later = concepts.clone()
        later[:, k + 1:] += torch.randn(B, T - k - 1, 16)
        other = noisy.clone()
        other[:, torch.arange(T) != k] += torch.randn(B, T - 1, 16)
        assert torch.allclose(denoise(later, noisy, t, cond)[:, :k + 1], pred[:, :k + 1], atol=1e-5)
        assert torch.allclose(denoise(concepts, other, t, cond)[:, k], pred[:, k], atol=1e-5)
        # the context does reach it, unless it is unconditional (guidance)
        earlier = concepts.clone()
        earlier[:, :k + 1] += torch.randn(B, k + 1, 16)
        assert not torch.allclose(denoise(earlier, noisy, t, cond)[:, k], pred[:, k], atol=1e-3)
        free = cond.clone()
        free[:, k] = True
        alone = denoise(concepts, noisy, t, free)[:, k]
        assert torch.allclose(denoise(earlier, noisy, t, free)[:, k], alone, atol=1e-5)
        # generation keeps the context's keys and values (a cache) for the one next concept: same
        last = torch.tensor([[False], [True]])
        at = model.timestep(t[:, -1:])
        kept = model.denoise(model.contextualize(concepts, True)[0], noisy[:, -1:], at, last)[0]
        again = model.denoise(model.contextualize(concepts)[0], noisy[:, -1:], at, last)[0]
        assert torch.allclose(kept, again, atol=1e-5)

def test_the_schedule_goes_from_almost_clean_to_pure_noise():
    alpha_bar = diffusion.cosine_schedule(100)
    assert alpha_bar.shape == (100,) and alpha_bar[-1] == 0  # zero terminal SNR
    assert alpha_bar[0] > 0.999 and (alpha_bar[1:] < alpha_bar[:-1]).all()

@pytest.mark.parametrize("share", [0.0, 0.5])
def test_last_step_share_trains_that_share_of_targets_from_pure_noise(share):
    """The conditional mean's training signal: the uniform draw gives the last timestep 1 %."""
    model = TwoTower(diffusion.DiffusionConfig(**tiny_config().__dict__, last_step_share=share))
    seen = []
    model.timestep = lambda t: seen.append(t) or TwoTower.timestep(model, t)
    x = torch.randn(128, 12, 16)
    model(x, x, generator=torch.Generator().manual_seed(0))
    at_last = (seen[0] == model.config.n_steps - 1).float().mean().item()
    assert abs(at_last - (share + (1 - share) / model.config.n_steps)) < 0.03

def test_ddim_with_guidance_1_equals_sampling_without_guidance():
    torch.manual_seed(0)
    model = tiny_diffusion().eval()
    concepts = torch.randn(3, 7, 16)

    def ddim_by_hand(z):
        # DDIM written out on the training path's network, the conditional half only
        # "trailing" (diffusers): 8 of 100, the first pure noise
        steps = [99, 87, 74, 61, 49, 37, 24, 11]
        with torch.no_grad():
            for t, t_next in zip(steps, steps[1:] + [None]):
                x0, _ = model.denoise(model.contextualize(concepts)[0], z,
                                      model.timestep(torch.full(z.shape[:2], t)),
                                      torch.zeros(z.shape[:2], dtype=torch.bool))
                a = model.alpha_bar[t]
                a_next = model.alpha_bar[t_next] if t_next is not None else torch.tensor(1.0)
                z = a_next.sqrt() * x0 + (1 - a_next).sqrt() * (z - a.sqrt() * x0) / (1 - a).sqrt()
        return model.normalizer.denormalize(z)
    z = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(5))
    sampled, _ = model.predict(concepts, z=z, ddim_steps=8, guidance=1.0)
    # 0.6: the paper's initial noise
    assert torch.allclose(sampled, ddim_by_hand(z * 0.6), atol=1e-5)
    # generation samples after the last position only, the context's keys and values computed once:
    # the same network
    last, _ = model.predict(concepts, last=True, z=z[:, :1], ddim_steps=8, guidance=1.0)
    assert last.shape == (3, 1, 16) and torch.allclose(last, ddim_by_hand(z[:, :1] * 0.6), atol=1e-5)
    # guided, the conditional and unconditional halves go through the same network
    guided, _ = model.predict(concepts, z=z, ddim_steps=8, guidance=3.0)
    assert not torch.allclose(guided, sampled, atol=1e-3)

def test_where_two_next_concepts_are_equally_likely_diffusion_samples_one_and_mse_predicts_the_mean():
    """The paper's argument for the diffusion LCM in one test: after the same context, A or B."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    a, b = torch.tensor(rng.normal(size=(2, 16)), dtype=torch.float32) * 2
    start = torch.tensor(rng.normal(size=16), dtype=torch.float32)
    models = {"mse": BaseLCM(tiny_config(block_size=2)), "one tower": tiny_diffusion(block_size=2),
              "two towers": tiny_diffusion(TwoTower, block_size=2)}
    for model in models.values():
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for _ in range(400):
            nxt = torch.where(torch.rand(64, 1) < 0.5, a, b)
            docs = torch.stack([start.expand(64, 16), nxt], 1)  # (64, 2, 16): start, then A or B
            _, loss = model(docs[:, :1], docs[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad()
        model.eval()
    context = start.expand(200, 1, 16)
    mean = models["mse"].predict(context)[0][0, 0]
    assert torch.dist(mean, (a + b) / 2) < 0.1 * torch.dist(a, b)
    for tower in ("one tower", "two towers"):
        z = torch.randn(context.shape, generator=torch.Generator().manual_seed(0))
        samples = models[tower].predict(context, z=z)[0][:, 0]
        to_a, to_b = (samples - a).norm(dim=-1), (samples - b).norm(dim=-1)
        near = torch.minimum(to_a, to_b) < 0.25 * torch.dist(a, b)
        assert near.float().mean() > 0.9, tower  # each sample lands by A or by B, not between them
        assert 0.2 < (to_a < to_b).float().mean() < 0.8, tower  # and both appear

@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["one_tower", "two_tower"])
def test_a_diffusion_run_resumes_exactly_and_evaluates_with_sampling_settings_changed(model_type,
                                                                                     rotation_data,
                                                                                     tmp_path):
    # the Two-Tower with the recipe's moving average of the weights, the One-Tower without
    resumes_exactly(model_type, rotation_data, tmp_path, *["--ema=0.5"] * (model_type == "two_tower"))
    model, ckpt = checkpoints.load_model(str(tmp_path / "b" / "ckpt.pt"))
    assert isinstance(model, DiffusionLCM) and ckpt["config"]["model_type"] == model_type
    # the average is what is evaluated and saved; the weights trained are kept beside it, to resume
    averaged = model_type == "two_tower"
    assert (ckpt["trained"] is not None) == averaged
    assert not averaged or not all(torch.equal(ckpt["trained"][k], w) for k, w in ckpt["model"].items())
    # its periodic evaluations report the conditional mean's metrics, comparable with the
    # baselines', whose loss chooses the checkpoint, and the denoising loss
    val = [r["val"] for r in log_of(tmp_path / "b") if "val" in r]
    assert all({"loss", "l2", "ca", "denoising"} <= set(v["model"]) for v in val)
    assert ckpt["best_val_loss"] == min(v["model"]["loss"] for v in val[1:])
    # the guidance curve: the same conditional mean, then each scale
    run("eval.py", "--out_dir=b", "--curve=1,2", cwd=tmp_path)
    curve = json.load(open(tmp_path / "b" / "guidance.json"))
    assert list(curve) == ["conditional mean", "guidance 1", "guidance 2", "copy", "mean", "real next"]
    assert abs(curve["conditional mean"]["l2"] - val[-1]["model"]["l2"]) < 1e-4
    assert curve["guidance 1"]["l2"] != curve["guidance 2"]["l2"]
    # sampling's settings may change after training; the model's may not
    run("train.py", "--eval_only=True", "--out_dir=b", "--guidance=1.5", "--ddim_steps=4",
        "--init_noise=1.0", cwd=tmp_path)
    report = json.load(open(tmp_path / "b" / "eval.json"))
    assert report["sampling"] == {"guidance": 1.5, "ddim_steps": 4, "init_noise": 1.0}
    assert 0 < report["model"]["ca"] <= 1  # 20 iterations learn little: a share, near chance
    p = run("train.py", "--init_from=resume", "--out_dir=b", "--n_embd=64", cwd=tmp_path,
            check=False)
    assert p.returncode == 1 and "the model's settings cannot change" in p.stderr
    p = run("train.py", "--init_from=resume", "--out_dir=b", "--model_type=baselcm", cwd=tmp_path,
            check=False)
    assert p.returncode == 1 and "the model's settings cannot change" in p.stderr
