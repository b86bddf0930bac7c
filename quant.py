"""
The Quant-LCMs' concept space (Meta, "Large Concept Models", 2024, section 2.3.5), first part: residual
vector quantization (RVQ). In the normalized space that the models predict, a concept is the sum of one
centroid per codebook: the first codebook quantizes the concept, each next one what the codebooks before
it left. Fitted offline on the training concepts, level by level, by k-means (torch: no dependency, and
fast enough here, docs/results.md); the paper used FAISS's. Never renormalize a residual: the sum of the
centroids must rebuild the concept.

$ python scripts/quant_roundtrip.py --dataset=lee      # the round trip by depth (the paper's Figure 9)
"""
import math

import torch

def units_for(n_concepts, points_per_unit=39, most=256):
    """Units per codebook for n training concepts: a power of two with at least 39 concepts a centroid
    (where FAISS's k-means stops warning), at most `most`"""
    return max(2, min(most, 2 ** int(math.log2(max(2, n_concepts // points_per_unit)))))

@torch.no_grad()
def kmeans(x, k, iters, generator):
    """Lloyd's k-means of x (n, d), from k of its points drawn at random -> centroids (k, d)"""
    centroids = x[torch.randperm(len(x), generator=generator)[:k]].clone()
    for _ in range(iters):
        assign = torch.cdist(x, centroids).argmin(1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)[:, None]
        # a centroid that lost all its points stays where it was
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
    return centroids

@torch.no_grad()
def fit_rvq(x, levels, units, iters=20, seed=0):
    """x (n, d) normalized training concepts -> codebooks (levels, units, d): k-means of x, then of what
    each level leaves"""
    generator = torch.Generator().manual_seed(seed)
    residual = x.float().clone()
    codebooks = []
    for _ in range(levels):
        centroids = kmeans(residual, units, iters, generator)
        residual -= centroids[torch.cdist(residual, centroids).argmin(1)]
        codebooks.append(centroids)
    return torch.stack(codebooks)

@torch.no_grad()
def rvq_encode(x, codebooks):
    """x (..., d) -> codes (..., levels): at each level, the centroid nearest what the levels before left"""
    residual = x.float().reshape(-1, x.size(-1))
    codes = []
    for centroids in codebooks:
        code = torch.cdist(residual, centroids).argmin(1)
        residual = residual - centroids[code]
        codes.append(code)
    return torch.stack(codes, -1).view(*x.shape[:-1], len(codebooks))

def rvq_decode(codes, codebooks, depth=None):
    """codes (..., levels) -> the sum of the centroids of the first depth levels (all: None), (..., d)"""
    depth = codebooks.size(0) if depth is None else depth
    levels = torch.arange(depth, device=codes.device)
    return codebooks[levels, codes[..., :depth]].sum(-2)
