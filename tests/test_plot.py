"""
The pictures (scripts/plot.py): each kind draws from a run's files what they hold, read back through
matplotlib's objects (curves, points, labels), and bad input is one line.
"""
import json, os, runpy, shutil, sys

import numpy as np
import pytest
import torch

from checkpoints import build_model
from conftest import HERE, run, save_checkpoint, tiny_config, write_dataset

def draw(*args):
    """scripts/plot.py as a user runs it, in this process -> (its figure, the PNG read back)"""
    import matplotlib.image
    argv = sys.argv
    sys.argv = ["plot.py", *args]
    try:
        fig = runpy.run_path(os.path.join(HERE, "scripts", "plot.py"))["fig"]
    finally:
        sys.argv = argv
    out = next(a.split("=", 1)[1] for a in args if a.startswith("--out="))
    return fig, matplotlib.image.imread(out)

def write_log(path, n_evals):
    """A run's log.jsonl: training records every 10 iterations, an evaluation every 25."""
    path.mkdir()
    val = lambda i: {"model": {"loss": 400 - i, "l2": 1.0, "ca": 0.6 + i / 1000},
                     "copy": {"loss": 580.0, "l2": 1.2, "ca": 0.8}, "mean": {"loss": 380.0, "l2": 0.9, "ca": 0.5}}
    records = [{"iter": i, "loss": 420.0 - i} for i in range(10, 25 * n_evals, 10)]
    records += [{"iter": 25 * i, "val": val(25 * i)} for i in range(n_evals)]
    path.joinpath("log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

@pytest.mark.parametrize("n_evals", [3, 5])
def test_a_run_shows_its_losses_its_baselines_and_ca(tmp_path, n_evals):
    write_log(tmp_path / "out", n_evals)
    fig, png = draw("--kind=run", f"--out_dirs={tmp_path / 'out'}", f"--out={tmp_path / 'run.png'}")
    loss, ca = fig.axes
    train, val, copy, mean = loss.lines
    assert len(train.get_xdata()) == len(range(10, 25 * n_evals, 10)) and len(val.get_xdata()) == n_evals
    assert list(copy.get_ydata()) == [580.0, 580.0] and list(mean.get_ydata()) == [380.0, 380.0]
    assert [len(line.get_xdata()) for line in ca.lines] == [n_evals] and png.shape[2] == 4

def write_curve(out, scales, diffusion):
    os.makedirs(out)
    curve = {"conditional mean": {"l2": 0.9, "ca": 0.82}} if diffusion else {}
    curve |= {f"guidance {g}": {"l2": 0.9 + g / 10, "ca": 0.8 + g / 100} for g in scales}
    curve |= {"copy": {"l2": 1.16, "ca": 0.876}, "mean": {"l2": 0.95, "ca": 0.5}, "real next": {"near": 0.62}}
    json.dump(curve, open(os.path.join(out, "guidance.json"), "w"))

@pytest.mark.parametrize("scales", [[1, 1.5, 2, 3, 5], [1, 3]])
def test_guidance_draws_a_curve_a_run_with_its_scales_the_conditional_mean_and_the_baselines(tmp_path, scales):
    write_curve(tmp_path / "base", scales, False)
    write_curve(tmp_path / "two", scales[:-1], True)
    fig, _ = draw("--kind=guidance", f"--out_dirs={tmp_path / 'base'},{tmp_path / 'two'}",
                  f"--out={tmp_path / 'g.png'}")
    [ax] = fig.axes
    lines = {line.get_label(): line for line in ax.lines}
    base, two = str(tmp_path / "base"), str(tmp_path / "two")
    assert [len(lines[run].get_xdata()) for run in (base, two)] == [len(scales), len(scales) - 1]
    assert [t.get_text() for t in ax.texts] == [f"g {g:g}" for g in scales + scales[:-1]]
    # the diffusion model's conditional mean, and the baselines
    mean = lines[f"{two}: conditional mean"]
    assert mean.get_marker() == "*" and list(mean.get_ydata()) == [100 * 0.82]
    assert [lines[f"{b} (baseline)"].get_marker() for b in ("copy", "mean")] == ["X", "P"]
    assert len(ax.lines) == 5

@pytest.fixture()
def two_runs(tmp_path):
    """A dataset and, trained on it, a Base-LCM's checkpoint, a Two-Tower's and a Quant-LCM-c's
    (untrained weights; the Quant-LCM's codebooks fitted)."""
    rng = np.random.default_rng(0)
    docs = [rng.normal(size=(int(n), 16)).astype(np.float32) for n in rng.integers(4, 12, 30)]
    meta = write_dataset(tmp_path / "data", "d", docs[:20], docs[20:], docs[0][-1])
    data = {"encoder": meta["encoder"], "d_emb": 16, "key": "d", "dir": str(tmp_path / "data" / "d")}
    torch.manual_seed(0)
    for name, model_type in (("base", "baselcm"), ("two", "two_tower"), ("quant", "quant_c")):
        # evaluated, a model has no dropout
        model = build_model(model_type, tiny_config(dropout=0.5).__dict__ | {"n_levels": 2, "n_units": 8})
        model.normalizer.mean.copy_(torch.tensor(meta["mean"]))
        if name == "quant":
            model.fit_codebooks(np.concatenate(docs[:20]))
        save_checkpoint(tmp_path / name, model, data, model_type)
    return tmp_path

@pytest.mark.parametrize("prompts, samples", [(2, 5), (3, 3)])
def test_concepts_show_each_prompts_real_next_neighbours_predictions_samples_and_mean(two_runs, prompts,
                                                                                      samples):
    runs = f"--out_dirs={two_runs / 'base'},{two_runs / 'two'},{two_runs / 'quant'}"
    fig, _ = draw("--kind=concepts", runs, f"--prompts={prompts}", f"--samples={samples}",
                  f"--out={two_runs / 'c.png'}")
    assert len(fig.axes) == prompts
    for ax in fig.axes:
        # real next, 6 neighbours, the prediction and its guided twin, each sampler's samples, the mean
        assert [len(line.get_xdata()) for line in ax.lines] == [1, 6, 1, 1, samples, samples, 1]
        # the sentences of the real next, the prediction and a sample of each; their cosines to a sentence
        assert len(ax.texts) == 4 and ax.get_xlabel().startswith("cosine to the nearest")
        assert ax.get_xlabel().count("Base-LCM") == 2
        assert "two_tower 0." in ax.get_xlabel() and "quant_c 0." in ax.get_xlabel()
    # drawn again, the same points: the models predict as evaluated (no dropout), the samples from
    # seed 0
    again, _ = draw("--kind=concepts", runs, f"--prompts={prompts}", f"--samples={samples}",
                    f"--out={two_runs / 'c.png'}")
    points = lambda f: [line.get_xydata().tolist() for ax in f.axes for line in ax.lines]
    assert points(again) == points(fig)

def test_concepts_draw_every_samplers_points_however_many_runs(two_runs):
    runs = ",".join(str(two_runs / name) for name in ("base", "two", "quant", "two", "quant", "two"))
    fig, _ = draw("--kind=concepts", f"--out_dirs={runs}", "--prompts=1", "--samples=2",
                  f"--out={two_runs / 'c.png'}")
    # five samplers, each its own points, and the training mean still last
    lines = fig.axes[0].lines
    assert [len(line.get_xdata()) for line in lines] == [1, 6, 1, 1, 2, 2, 2, 2, 2, 1]
    assert lines[-1].get_label() == "training mean"

@pytest.mark.parametrize("case, message", [
    ("--kind=guidance", "no {out}/guidance.json: run `python eval.py --out_dir={out} --curve=1,1.5,2,3,5`"),
    ("old log", "holds no evaluations with their baselines"),
    ("data gone", "the dataset of {base}, is gone: build it again with embed.py"),
])
def test_plot_bad_input_is_one_line(case, message, two_runs):
    out = two_runs / "run"
    out.mkdir()
    (out / "log.jsonl").write_text(json.dumps({"iter": 0, "val": {"model": {"loss": 1.0}}}) + "\n")
    args = {"--kind=guidance": ["--kind=guidance", f"--out_dirs={out}"],
            "old log": ["--kind=run", f"--out_dirs={out}"],
            "data gone": ["--kind=concepts", f"--out_dirs={two_runs / 'base'},{two_runs / 'two'}"]}[case]
    if case == "data gone":
        shutil.rmtree(two_runs / "data")
    p = run("scripts/plot.py", *args, cwd=two_runs, check=False)
    assert p.returncode == 1 and message.format(out=out, base=two_runs / "base") in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
