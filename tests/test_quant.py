"""
The Quant-LCMs' concept space (quant.py): residual vector quantization, fitted by k-means level by level.
"""
import json

import pytest
import torch

import quant
from conftest import run

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
