"""
The Quant-LCMs (Meta, "Large Concept Models", 2024, section 2.3.5): the next concept built one
codebook unit at a time. Residual vector quantization (RVQ) first: in the normalized space the
models predict, a concept is the sum of one centroid per codebook, the first quantizing the
concept, each next one what the codebooks before it left; fitted on the training concepts, level by
level, by k-means (in torch: no dependency, fast enough here, docs/results.md; the paper used
FAISS's). A residual is never renormalized: the sum of the centroids must rebuild the concept. Then
the models: the Two-Tower's network (diffusion.py), its noisy concept replaced by the sum of the
first k - 1 centroids and its timestep by the level k. Quant-LCM-c regresses the next concept and
turns what it adds into units; -d classifies the unit of level k.

$ python scripts/quant_roundtrip.py --dataset=lee   # the round trip by depth (the paper's Figure 9)
$ python train.py config/train_quant.py             # Quant-LCM-c on Lee; --model_type=quant_d
"""
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

from baselcm import masked_mean
from common import require
from diffusion import DiffusionConfig, TwoTower

def units_for(n_concepts, points_per_unit=39, most=256):
    """Units a codebook for n training concepts: a power of two, 39 concepts a centroid or more
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
    """x (n, d) normalized training concepts -> codebooks (levels, units, d): k-means of x, then of
    what each level leaves"""
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
    """x (..., d) -> codes (..., levels): each level's centroid nearest what the ones before left"""
    residual = x.float().reshape(-1, x.size(-1))
    codes = []
    for centroids in codebooks:
        code = torch.cdist(residual, centroids).argmin(1)
        residual = residual - centroids[code]
        codes.append(code)
    return torch.stack(codes, -1).view(*x.shape[:-1], len(codebooks))

def rvq_decode(codes, codebooks, depth=None):
    """codes (..., levels) -> the sum of the first depth levels' centroids (all: None), (..., d)"""
    depth = codebooks.size(0) if depth is None else depth
    levels = torch.arange(depth, device=codes.device)
    return codebooks[levels, codes[..., :depth]].sum(-2)

@dataclass
class QuantConfig(DiffusionConfig):
    n_levels: int = 8              # codebooks (depth)
    n_units: int = 64              # units a codebook (train.py: from the data, units_for)

class QuantLCM(TwoTower):
    """What -c and -d share: the codebooks (in the checkpoint: a model never meets another's),
    training at a random level, and sampling from zero, one unit a level"""
    # the point prediction the evaluations report: greedy, unguided
    point = {"guidance": 1.0, "top_k": 1}

    def __init__(self, config):
        super().__init__(config)
        shape = (config.n_levels, config.n_units, config.d_emb)
        self.register_buffer("codebooks", torch.zeros(shape))

    def fit_codebooks(self, rows, iters=20, seed=0):
        """rows (n, d_emb): the training concepts, in the encoder's space"""
        L, U = self.codebooks.shape[:2]
        require(len(rows) >= U, f"{len(rows)} training concepts cannot fit codebooks of {U} units: "
                "use more data or a smaller --n_units")
        x = self.normalizer.normalize(torch.as_tensor(np.asarray(rows, np.float32)))
        self.codebooks.copy_(fit_rvq(x, L, U, iters, seed))

    def quantized(self, concepts):
        """concepts (..., d_emb), quantized to every level: what no sample beats"""
        x = self.normalizer.normalize(concepts.float())
        codes = rvq_encode(x, self.codebooks)
        return self.normalizer.denormalize(rvq_decode(codes, self.codebooks))

    def forward(self, concepts, targets, mask=None, eot=None, generator=None):
        """Training, as the paper: each target at a level k of its own, drawn uniformly; the network
        reads the context and the sum of the target's first k - 1 centroids"""
        x0 = self.normalizer.normalize(targets.float())  # (B, T, d_emb)
        B, T, d = x0.shape
        codes = rvq_encode(x0, self.codebooks)  # (B, T, n_levels)
        levels = torch.arange(self.config.n_levels, device=x0.device)
        level = torch.randint(0, len(levels), (B, T), generator=generator, device=x0.device)
        chosen = self.codebooks[levels, codes]  # (B, T, n_levels, d_emb)
        # the sum of the centroids before the level, (B, T, d_emb)
        partial = (chosen * (levels < level[..., None])[..., None]).sum(2)
        uncond = torch.rand(B, T, generator=generator, device=x0.device) < self.config.cfg_dropout
        context, h = self.contextualize(concepts)
        out, _ = self.denoise(context, partial, self.timestep(level), uncond)
        err = self.level_loss(out, x0, codes.gather(-1, level[..., None]).squeeze(-1))  # (B, T)
        return out, masked_mean(err, mask) + self.stop_loss(h, eot, mask)

    @torch.no_grad()
    def predict(self, concepts, last=False, z=None, guidance=1.0, temperature=1.0, top_k=3):
        """The next concept after each of concepts (last: the last only), built from zero one level
        at a time: a unit drawn among the top_k by the variant's scores, guided, at temperature,
        by a uniform draw a level from z (B, K, d_emb); in the encoder's space, and the stop logits"""
        B, T, d = concepts.shape
        K = 1 if last else T
        halves = 1 if guidance == 1 else 2
        context, h = self.contextualize(concepts, copies=halves)
        uncond = (torch.arange(halves * B, device=concepts.device) >= B)[:, None].expand(-1, K)
        levels = torch.arange(len(self.codebooks), device=concepts.device)
        levels = self.timestep(levels[:, None, None])  # what the network reads of each level
        u = 0.5 * (1 + torch.erf(z / math.sqrt(2)))  # uniform, (B, K, d_emb)
        partial = concepts.new_zeros(B, K, d)
        for k, centroids in enumerate(self.codebooks):
            out, _ = self.denoise(context, partial.repeat(halves, 1, 1), levels[k], uncond)
            scores, estimate = self.scores(out.float(), partial, centroids, guidance, B)
            top, idx = (scores / temperature).topk(min(top_k, scores.size(-1)), -1)
            # inverse-CDF: the first of the top_k whose cumulative probability passes the draw
            pick = (top.softmax(-1).cumsum(-1) < u[..., k:k + 1]).sum(-1, keepdim=True)
            unit = idx.gather(-1, pick.clamp(max=idx.size(-1) - 1)).squeeze(-1)
            partial = partial + centroids[unit]
        stop = self.stop(h[:, -K:]).squeeze(-1).float()
        # -d: the sum of the units; -c: its regression at the last level, within the units before it
        # (a departure from the paper, which adds a last unit: docs/results.md)
        return self.normalizer.denormalize(partial if estimate is None else estimate), stop

class QuantC(QuantLCM):
    """Quant-LCM-c: regresses the full next concept by MSE, at any level; sampling turns what the
    prediction adds to the partial sum into a unit, p(c) ~ exp(-||c - r||^2 / temperature), Eq. 23"""

    def level_loss(self, pred, x0, code):
        return (pred.float() - x0).pow(2).sum(-1)

    def scores(self, out, partial, centroids, guidance, B):
        # guidance on the prediction
        pred = out[:B] if len(out) == B else out[B:] + guidance * (out[:B] - out[B:])
        return -torch.cdist(pred - partial, centroids[None].expand(len(pred), -1, -1)) ** 2, pred

class QuantD(QuantLCM):
    """Quant-LCM-d: a softmax over the units of codebook k, trained by cross-entropy"""

    def __init__(self, config):
        super().__init__(config)
        self.units = nn.Linear(config.d_emb, config.n_units)

    def level_loss(self, out, x0, code):
        logits = self.units(out).float()  # (B, T, n_units)
        return F.cross_entropy(logits.transpose(1, 2), code, reduction="none")

    def scores(self, out, partial, centroids, guidance, B):
        # guidance on the logits
        logits = self.units(out)
        return (logits[:B] if len(out) == B else logits[B:] + guidance * (logits[:B] - logits[B:])), None
