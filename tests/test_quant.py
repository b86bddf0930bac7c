"""
The Quant-LCMs' concept space (quant.py): residual vector quantization, fitted by k-means level by level.
"""
import json

import numpy as np
import pytest
import torch

import checkpoints, quant
from generation import generate
from conftest import log_of, resumes_exactly, rotation_docs, run, tiny_config, write_dataset

def test_units_follow_the_data_at_39_concepts_a_centroid_or_more():
    assert quant.units_for(2698) == 64  # Lee's training concepts
    assert quant.units_for(36_000) == 256
    assert quant.units_for(10) == 2
    assert all(n // quant.units_for(n) >= 39 for n in (100, 2698, 5000, 9000))

def test_kmeans_finds_well_separated_clusters():
    g = torch.Generator().manual_seed(0)
    means = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([m + 0.1 * torch.randn(200, 2, generator=g) for m in means])
    found = quant.kmeans(x, 3, 10, torch.Generator().manual_seed(1))
    # each mean has a centroid within 0.1 of it
    assert torch.cdist(means, found).min(1).values.max() < 0.1

def test_a_concept_is_the_sum_of_its_codes_centroids_and_each_level_quantizes_what_is_left():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 16, generator=g)
    codebooks = quant.fit_rvq(x, levels=4, units=8, iters=5)
    codes = quant.rvq_encode(x, codebooks)
    assert codes.shape == (500, 4) and codebooks.shape == (4, 8, 16)
    residual = x.clone()
    for level in range(4):
        # the code at each level is the centroid nearest what the levels before it left
        assert torch.equal(codes[:, level], torch.cdist(residual, codebooks[level]).argmin(1))
        residual -= codebooks[level][codes[:, level]]
        assert torch.allclose(quant.rvq_decode(codes, codebooks, level + 1), x - residual, atol=1e-5)
    # on the concepts it was fitted on, every level lowers the error
    errors = [(quant.rvq_decode(codes, codebooks, d) - x).pow(2).sum().item() for d in range(1, 5)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.8 * x.pow(2).sum().item()

def test_the_full_depth_round_trip_of_a_training_concept_is_exact_where_the_codebooks_can_hold_it():
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
    # as many units as concepts: each its own centroid at the first level, nothing left for the others
    codebooks = quant.fit_rvq(x, levels=3, units=32, iters=3)
    codes = quant.rvq_encode(x, codebooks)
    assert torch.allclose(quant.rvq_decode(codes, codebooks), x, atol=1e-6)
    # codes of any batch shape
    assert torch.equal(quant.rvq_encode(x.view(4, 8, 8), codebooks), codes.view(4, 8, 3))

@pytest.mark.slow
def test_the_round_trip_script_measures_each_depth_and_refuses_too_few_concepts(rotation_data, tmp_path):
    p = run("scripts/quant_roundtrip.py", f"--data_root={rotation_data}", "--dataset=rot", "--levels=4",
            "--units=16", cwd=tmp_path)
    r = json.load(open(rotation_data / "rot" / "quant_roundtrip.json"))
    val = [row for row in r["rows"] if row["split"] == "val"]
    train = [row for row in r["rows"] if row["split"] == "train"]
    assert [row["depth"] for row in val] == [1, 2, 3, 4] and "16 units" in p.stdout
    # deeper is closer on the concepts it was fitted on, and more often the same sentence is retrieved
    assert train[-1]["rel_l2"] < train[0]["rel_l2"] and val[-1]["same_sentence"] > val[0]["same_sentence"]
    p = run("scripts/quant_roundtrip.py", f"--data_root={rotation_data}", "--dataset=rot", "--units=100000",
            cwd=tmp_path, check=False)
    assert p.returncode == 1 and "fewer than --units=100000" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1

def tiny_quant(variant, units=8, **kw):
    torch.manual_seed(0)
    config = quant.QuantConfig(**tiny_config(**kw).__dict__, n_levels=3, n_units=units)
    model = {"c": quant.QuantC, "d": quant.QuantD}[variant](config)
    with torch.no_grad():
        # trained modulations (they start at zero) and codebooks
        for name, p in model.named_parameters():
            if "modulation" in name or name.startswith("final"):
                p.normal_(std=0.1)
        model.codebooks.normal_()
    return model.eval()

@pytest.mark.parametrize("variant", ["c", "d"])
def test_no_position_sees_its_own_target_or_a_later_concept(variant):
    model = tiny_quant(variant)
    concepts = torch.randn(2, 10, 16)
    z = torch.randn(2, 10, 16)
    k = 4
    pred = model.predict(concepts, z=z)[0]
    later = concepts.clone()
    later[:, k + 1:] += 10 * torch.randn(2, 10 - k - 1, 16)
    # the prediction after c_k: from c_0..c_k alone, c_{k+1} (its target) and on unseen
    assert torch.allclose(model.predict(later, z=z)[0][:, :k + 1], pred[:, :k + 1], atol=1e-5)
    earlier = concepts.clone()
    earlier[:, :k + 1] += 10 * torch.randn(2, k + 1, 16)
    assert not torch.allclose(model.predict(earlier, z=z)[0][:, k], pred[:, k], atol=1e-3)
    # and the training path's network is the one sampling runs: the loss ignores later inputs too
    targets = torch.randn(2, 10, 16)
    mask = torch.arange(10).expand(2, 10) <= k
    loss = lambda x: model(x, targets, mask, generator=torch.Generator().manual_seed(0))[1]
    assert torch.allclose(loss(later), loss(concepts), atol=1e-5)

@pytest.mark.parametrize("variant", ["c", "d"])
def test_a_sampled_concept_is_built_one_centroid_a_level_and_guidance_1_is_the_conditional_one(variant):
    model = tiny_quant(variant)
    concepts = torch.randn(3, 6, 16)
    z = torch.randn(3, 1, 16)
    sampled = model.normalizer.normalize(model.predict(concepts, last=True, z=z)[0][:, 0])
    c = model.codebooks
    if variant == "d":  # the sum of one centroid a level: one of every choice's sums
        built = (c[0][:, None, None] + c[1][None, :, None] + c[2][None, None, :]).view(1, -1, 16)
    else:  # the network's regression at the last level, after one centroid a level before it
        context, _ = model.contextualize(concepts)
        uncond = torch.zeros(3, 1, dtype=torch.bool)
        last = model.timestep(torch.tensor([[2]]))
        built = torch.stack([model.denoise(context, p.expand(3, 1, 16), last, uncond)[0][:, 0]
                             for p in (c[0][:, None] + c[1][None, :]).view(-1, 16)], 1)
    assert (sampled[:, None] - built).norm(dim=-1).min(1).values.max() < 1e-4
    # guided at 1, through both halves, it is the conditional prediction; guided more, another
    plain = model.predict(concepts, last=True, z=z, guidance=1.0)[0]
    assert torch.allclose(model.predict(concepts, last=True, z=z, guidance=1.0 + 1e-6)[0], plain)
    assert not torch.allclose(model.predict(concepts, last=True, z=z, guidance=4.0)[0], plain)
    # greedy, the draws do not matter; sampled among several units, they do
    greedy = lambda z: model.predict(concepts, last=True, z=z, top_k=1)[0]
    assert torch.equal(greedy(z), greedy(torch.randn(3, 1, 16)))
    draws = [model.predict(concepts, last=True, z=torch.randn(3, 1, 16), top_k=8, temperature=1e3)[0]
             for _ in range(4)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])

@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["quant_c", "quant_d"])
def test_a_quant_run_keeps_its_codebooks_resumes_exactly_and_samples_and_evaluates(model_type, rotation_data,
                                                                                  tmp_path):
    args = resumes_exactly(model_type, rotation_data, tmp_path, "--n_levels=3", "--n_units=16")
    model, ckpt = checkpoints.load_model(str(tmp_path / "b" / "ckpt.pt"))
    first = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    # the codebooks, fitted at the start, travel in the checkpoint
    assert model.codebooks.shape == (3, 16, 16) and model.codebooks.abs().sum() > 0
    assert torch.equal(model.codebooks, first["model"]["codebooks"])
    # its best is by its own loss on the validation windows, not its greedy prediction's
    val = [r["val"]["model"] for r in log_of(tmp_path / "b") if "val" in r]
    assert ckpt["best_val_loss"] == min(v["denoising"] for v in val[1:])
    # generation, as sample.py and eval.py run it: each text from its own generator
    prompt = torch.randn(4, 16)
    g = lambda: [torch.Generator().manual_seed(1)]
    [(a, _, _)], [(b, _, _)] = (generate(model.eval(), [prompt], torch.ones(16), 3, generators=g(), top_k=4,
                                         stop_end=0.0, stop_repeat=0.0) for _ in range(2))
    assert a.shape == (3, 16) and torch.equal(a, b)
    # finetuned on other data, it keeps the codebooks it was trained with: its concept space
    train, eot = rotation_docs(np.random.default_rng(5), 40)
    write_dataset(tmp_path / "data2", "rot2", train, rotation_docs(np.random.default_rng(6), 6)[0], eot)
    run("train.py", *args, "--init_from=b", "--max_iters=2", "--out_dir=ft", f"--data_root={tmp_path / 'data2'}",
        "--dataset=rot2", cwd=tmp_path)
    tuned = torch.load(tmp_path / "ft" / "ckpt.pt", weights_only=True)["model"]["codebooks"]
    assert torch.equal(tuned, model.codebooks)
    run("eval.py", "--out_dir=b", "--curve=1,2", cwd=tmp_path)
    curve = json.load(open(tmp_path / "b" / "guidance.json"))
    assert list(curve) == ["greedy", "guidance 1", "guidance 2", "copy", "mean", "quantized real next",
                           "real next"]
    # the ceiling: the real next concept through the codebooks, closer than any prediction of it
    assert curve["quantized real next"]["l2"] < min(curve[k]["l2"] for k in ("greedy", "guidance 1"))
    p = run("train.py", *args, "--max_iters=2", "--n_units=100000", "--out_dir=c", cwd=tmp_path, check=False)
    assert p.returncode == 1 and "cannot fit codebooks of 100000 units" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    p = run("train.py", *args, "--max_iters=2", "--model_type=quant_x", "--out_dir=c", cwd=tmp_path, check=False)
    assert p.returncode == 1 and "quant_c, quant_d" in p.stderr
