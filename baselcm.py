"""
The Base Large Concept Model (Meta, "Large Concept Models", 2024): a causal transformer over
sentence embeddings (concepts). The pre-net normalizes each concept and projects it to the model
width, the transformer mixes them causally, and the post-net projects back; the model is trained to
predict the next concept with mean squared error, and generates by appending its own predictions.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

MAX_SENTENCES = 128  # the stop prior's lengths; a longer text takes the last one's odds

@dataclass
class LCMConfig:
    d_emb: int = 384          # encoder width (SONAR 1024, MiniLM 384): taken from the data
    block_size: int = 64      # context length in concepts
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256         # model width (d_model)
    dropout: float = 0.1
    bias: bool = False        # biases in the transformer's linears (pre/post-net always have one)
    rope_theta: float = 10000.0

class Normalizer(nn.Module):
    """(x - median) / (IQR / 1.349) per dimension, fitted on the training data; in checkpoints"""

    def __init__(self, d_emb):
        super().__init__()
        self.register_buffer("center", torch.zeros(d_emb))
        self.register_buffer("scale", torch.ones(d_emb))
        self.register_buffer("mean", torch.zeros(d_emb))  # the training mean (guidance)

    def normalize(self, x):
        return (x - self.center) / self.scale

    def denormalize(self, x):
        return x * self.scale + self.center

def rope(x, cos, sin):
    # x (B, nh, T, hs): rotate the pairs (i, i + hs/2) by the angle of each position
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

class RMSNorm(nn.RMSNorm):
    def forward(self, x):
        # the weight in x's dtype: under bf16 autocast the fused kernel still applies
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)

class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x, cos, sin, attn_mask=None, cache=None, pos=None):
        B, T, C = x.size()
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, nh, T, hs) each
        q = rope(q, cos, sin)
        k = rope(k, cos, sin)
        if cache is not None:
            # this layer's (2, B, nh, block_size, hs): new rows go in place at pos, attention runs
            # over all rows, masked to the filled ones: every step has one shape (compiles once)
            cache[0].index_copy_(2, pos, k.to(cache.dtype))
            cache[1].index_copy_(2, pos, v.to(cache.dtype))
            k, v = cache
            if attn_mask is None:
                attn_mask = torch.arange(cache.size(3), device=x.device) <= pos[:, None]  # (T, block_size)
        dropout = self.dropout if self.training else 0.0
        causal = attn_mask is None and T > 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout, is_causal=causal)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))

class SwiGLU(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden = 64 * math.ceil(8 * config.n_embd / 3 / 64)  # 2/3 of 4x, as in LLaMA
        # the gate and the value in one matmul
        self.c_fc = nn.Linear(config.n_embd, 2 * hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        gate, value = self.c_fc(x).chunk(2, dim=-1)
        return self.dropout(self.c_proj(F.silu(gate) * value))

class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = RMSNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = RMSNorm(config.n_embd)
        self.mlp = SwiGLU(config)

    def forward(self, x, cos, sin, attn_mask=None, cache=None, pos=None):
        x = x + self.attn(self.ln_1(x), cos, sin, attn_mask, cache, pos)
        return x + self.mlp(self.ln_2(x))

def masked_mean(err, mask=None):
    """err (B, T) averaged over the real targets, where mask (B, T) is True (all, if None)"""
    return err.mean() if mask is None else (err * mask).sum() / mask.sum()

class BaseLCM(nn.Module):
    # the prediction that picks the best checkpoint: the model's own, unguided
    point = {"guidance": 1.0}

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.normalizer = Normalizer(config.d_emb)
        self.prenet = nn.Linear(config.d_emb, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = RMSNorm(config.n_embd)
        self.postnet = nn.Linear(config.n_embd, config.d_emb)
        # the stop head, P(end of text next), no random draw; its prior: log-odds of ending after i
        self.stop = nn.utils.skip_init(nn.Linear, config.n_embd, 1)
        self.register_buffer("stop_prior", torch.zeros(MAX_SENTENCES))
        hs = config.n_embd // config.n_head
        self.register_buffer("inv_freq", config.rope_theta ** (-torch.arange(0, hs, 2).float() / hs),
                             persistent=False)
        # GPT-2's init: matrices N(0, 0.02), residual projections scaled down by depth, biases 0
        # (the norms' weights stay 1; the stop head starts at 0, its bias set from the data: fit)
        for name, p in self.named_parameters():
            if name.endswith(".bias") or name.startswith("stop."):
                nn.init.zeros_(p)
            elif p.dim() == 2:
                scaled = name.endswith("c_proj.weight")
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.n_layer) if scaled else 0.02)

    def transformer(self, x, pos, attn_mask=None, cache=None):
        """The blocks on x (B, T, n_embd) at positions pos (T,), causal unless attn_mask"""
        angles = pos[:, None].float() * self.inv_freq  # (T, hs/2)
        cos, sin = angles.cos(), angles.sin()
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, attn_mask, None if cache is None else cache[i], pos)
        return self.ln_f(x)

    def forward(self, concepts, targets=None, mask=None, eot=None, cache=None, pos=None):
        """concepts (B, T, d_emb) -> normalized next concepts, and the loss (or stop logits)"""
        T = concepts.size(1)
        assert T <= self.config.block_size, f"{T} concepts > block_size {self.config.block_size}"
        pos = torch.arange(T, device=concepts.device) if pos is None else pos
        x = self.drop(self.prenet(self.normalizer.normalize(concepts)))  # (B, T, n_embd)
        h = self.transformer(x, pos, cache=cache)
        pred = self.postnet(h)  # (B, T, d_emb)
        if targets is None:
            return pred, self.stop(h).squeeze(-1).float()
        # in fp32, whatever the autocast dtype
        err = (pred.float() - self.normalizer.normalize(targets.float())).pow(2).sum(-1)  # (B, T)
        return pred, masked_mean(err, mask) + self.stop_loss(h, eot, mask)

    def stop_loss(self, h, eot, mask):
        """The stop head's cross-entropy against eot (B, T) where mask is True; h read detached"""
        if eot is None:
            return 0.0
        logits = self.stop(h.detach()).squeeze(-1).float()
        return masked_mean(F.binary_cross_entropy_with_logits(logits, eot.float(), reduction="none"), mask)

    @torch.no_grad()
    def predict(self, concepts, last=False, z=None, guidance=1.0, noise=0.0, cache=None, pos=None):
        """The next concepts (last: the last only), guided from the training mean, + noise * z"""
        pred, stop = self(concepts, cache=cache, pos=pos)
        if last:
            pred, stop = pred[:, -1:], stop[:, -1:]
        pred = pred.float()
        if guidance != 1:
            pred = torch.lerp(self.normalizer.normalize(self.normalizer.mean), pred, guidance)
        if noise > 0:
            pred = pred + noise * z
        return self.normalizer.denormalize(pred), stop

    def configure_optimizers(self, weight_decay, learning_rate, betas, eps):
        # weight decay on the matrices only, not on biases and norms
        groups = [{"params": [p for p in self.parameters() if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in self.parameters() if p.dim() < 2], "weight_decay": 0.0}]
        # fused AdamW: one kernel for all parameters (cuda, cpu and mps have it)
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=True)

    def flops_per_concept(self):
        """Training FLOPs per concept: 6N for the weights, plus attention (PaLM, appendix B)"""
        c = self.config
        return 6 * sum(p.numel() for p in self.parameters()) + 12 * c.n_layer * c.n_embd * c.block_size
