"""
The One-Tower diffusion LCM (Meta, "Large Concept Models", 2024, section 2.3). The Base-LCM regresses
the next concept, and an MSE model predicts the mean of the plausible next sentences, a point between
them. The diffusion LCM samples one instead: given the clean concepts before it, one causal transformer
turns a Gaussian sample into the next concept in a few dozen denoising steps. It is trained to predict
the clean concept from a noisy one (x0, MSE) at a random noise level; it samples with DDIM and
classifier-free guidance. It reuses baselcm.py's normalizer, pre-net, blocks and post-net.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from baselcm import BaseLCM, LCMConfig

@dataclass
class DiffusionConfig(LCMConfig):
    n_steps: int = 100             # diffusion timesteps (paper: 100)
    cfg_dropout: float = 0.15      # training: the share of noisy concepts that see no context
    # sampling, which may change after training (paper: 40, 3.0, 0.7, 0.6)
    ddim_steps: int = 40
    guidance: float = 3.0          # classifier-free guidance scale; 1 = none
    guidance_rescale: float = 0.7
    init_noise: float = 0.6        # the scale of the Gaussian sample the denoising starts from

SAMPLING = ("ddim_steps", "guidance", "guidance_rescale", "init_noise")

def cosine_schedule(n_steps, s=0.008):
    """-> alpha_bar (n_steps,): the share of signal in the noisy concept at each timestep. The
    cosine schedule (Nichol & Dhariwal 2021), rescaled to zero terminal SNR (Lin et al. 2024): at
    the last step only noise is left, as at the start of sampling."""
    t = torch.arange(n_steps + 1, dtype=torch.float64) / n_steps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = torch.cumprod(1 - (1 - f[1:] / f[:-1]).clamp(max=0.999), 0)
    # shift and scale sqrt(alpha_bar) to end at 0 and start where it started
    a = alpha_bar.sqrt()
    a = (a - a[-1]) * a[0] / (a[0] - a[-1])
    return (a ** 2).float()

class TimestepEmbedder(nn.Module):
    """timestep -> sinusoidal features (DiT's) -> MLP -> a vector of the model width"""

    def __init__(self, n_embd, n_freq=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(n_freq, n_embd), nn.SiLU(), nn.Linear(n_embd, n_embd))
        freqs = torch.exp(-math.log(10000) * torch.arange(n_freq // 2) / (n_freq // 2))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t):
        angles = t[..., None].float() * self.freqs  # (..., n_freq / 2)
        return self.mlp(torch.cat([angles.cos(), angles.sin()], -1))

def attention_mask(queries, n_slots, uncond=None):
    """The attention of the interleaved sequence c_0, z_1, c_1, z_2, ..., c_{T-1}, z_T: the clean
    concept c_j in slot 2j, the noisy next concept z_{j+1} in slot 2j + 1. queries (L,): the slots
    of the positions that attend -> (L, n_slots), True where a query may see a key: the clean
    concepts up to its own sentence, and itself. A noisy z_{t+1} sees c_0..c_t: never its own clean
    target c_{t+1}, a later concept or another noisy one. uncond (B, L): queries that see only
    themselves (guidance's unconditional half) -> (B, 1, L, n_slots)."""
    keys = torch.arange(n_slots, device=queries.device)
    itself = keys == queries[:, None]
    sees = (keys % 2 == 0) & (keys // 2 <= queries[:, None] // 2) | itself
    if uncond is None:
        return sees
    return (sees & ~uncond[..., None] | itself)[:, None]

class DiffusionLCM(BaseLCM):
    supports_cache = False  # generate runs a window at a time; predict caches the clean context itself

    def __init__(self, config):
        super().__init__(config)
        self.time = TimestepEmbedder(config.n_embd)
        self.register_buffer("alpha_bar", cosine_schedule(config.n_steps), persistent=False)

    def run(self, x, positions, mask, cache=None, slots=None):
        """The transformer on x (B, L, n_embd) at sentence positions (L,) (RoPE), attending by mask;
        with a cache (a (2, B, nh, n_slots, hs) tensor per layer), x's keys and values go in slots."""
        cos = self.rope_cos[positions]
        sin = self.rope_sin[positions]
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, None if cache is None else cache[i], slots, mask)
        return x

    def noisy_input(self, noisy, t):
        # the paper concatenates the timestep's embedding to the input; through the pre-net's linear
        # layer that is a sum. Clean concepts carry none (a constant would only shift the bias).
        return self.prenet(noisy) + self.time(t)

    def denoise(self, concepts, noisy, t, uncond):
        """concepts (B, T, d_emb), clean, in the encoder's space; noisy (B, T, d_emb): the next
        concept of each position noised to timestep t (B, T), normalized; uncond (B, T): those that
        see no context -> the predicted clean next concepts (B, T, d_emb), normalized. Training's
        path: the whole interleaved sequence in one pass."""
        B, T, _ = concepts.shape
        clean = self.prenet(self.normalizer.normalize(concepts))  # (B, T, n_embd)
        x = torch.stack([clean, self.noisy_input(noisy, t)], 2).view(B, 2 * T, -1)  # c_0, z_1, ...
        slots = torch.arange(2 * T, device=x.device)
        uncond = torch.stack([torch.zeros_like(uncond), uncond], 2).view(B, 2 * T)
        # sentence positions: c_j at j, z_{j+1} at j + 1
        x = self.run(self.drop(x), (slots + 1) // 2, attention_mask(slots, 2 * T, uncond))
        return self.postnet(self.ln_f(x[:, 1::2]))  # (B, T, d_emb)

    def forward(self, concepts, targets=None, mask=None, cache=None, pos=None, generator=None):
        """With targets: (predicted clean targets, the loss): every next concept noised to its own
        random timestep, the squared error of the prediction against the clean one (normalized,
        summed over the dimensions, averaged over the targets where mask is True), every timestep
        weighted alike; the draws from generator if given. Without: (a sampled next concept for
        every position, None)."""
        if targets is None:
            return self.predict(concepts), None
        x0 = self.normalizer.normalize(targets.float())  # (B, T, d_emb)
        B, T, d = x0.shape
        t = torch.randint(0, self.config.n_steps, (B, T), generator=generator, device=x0.device)
        a = self.alpha_bar[t][..., None]
        noise = torch.randn(B, T, d, generator=generator, device=x0.device)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        uncond = torch.rand(B, T, generator=generator, device=x0.device) < self.config.cfg_dropout
        pred = self.denoise(concepts, noisy, t, uncond)
        err = (pred.float() - x0).pow(2).sum(-1)  # (B, T)
        if mask is None:
            return pred, err.mean()
        return pred, (err * mask).sum() / mask.sum()

    @torch.no_grad()
    def predict(self, concepts, cache=None, pos=None, generator=None):
        """A next concept sampled after each position of concepts (B, T, d_emb) -> (B, T, d_emb),
        normalized (called by generate, pos given: after the last position only, (B, 1, d_emb)).
        DDIM (deterministic, "trailing" timesteps) from init_noise * N(0, I) drawn from generator,
        with classifier-free guidance and its rescale (Lin et al. 2024): each step runs the
        conditional and the unconditional halves in one batch."""
        c = self.config
        B, T, _ = concepts.shape
        # the clean concepts never see a noisy one: their keys and values are computed once
        hs = c.n_embd // c.n_head
        kv = [concepts.new_zeros(2, 2 * B, c.n_head, 2 * T, hs) for _ in self.blocks]
        j = torch.arange(T, device=concepts.device)
        clean = self.prenet(self.normalizer.normalize(concepts)).repeat(2, 1, 1)
        self.run(clean, j, attention_mask(2 * j, 2 * T), kv, 2 * j)
        j = j[-1:] if pos is not None else j  # the positions whose next concept is sampled
        # the second half sees no context
        free = (torch.arange(2 * B, device=j.device) >= B)[:, None].expand(2 * B, len(j))
        sees = attention_mask(2 * j + 1, 2 * T, free)
        steps = (torch.arange(c.ddim_steps, 0, -1) * c.n_steps / c.ddim_steps).round().long() - 1
        z = torch.randn(B, len(j), c.d_emb, generator=generator, device=j.device) * c.init_noise
        for i, t in enumerate(steps.tolist()):
            x = self.noisy_input(z, torch.full((B, len(j)), t, device=j.device)).repeat(2, 1, 1)
            x = self.postnet(self.ln_f(self.run(x, j + 1, sees, kv, 2 * j + 1))).float()
            cond, free = x.chunk(2)
            x0 = free + c.guidance * (cond - free)
            # rescaled to the conditional prediction's spread, against guidance's over-saturation
            rescaled = x0 * cond.std(-1, keepdim=True) / x0.std(-1, keepdim=True)
            x0 = c.guidance_rescale * rescaled + (1 - c.guidance_rescale) * x0
            a = self.alpha_bar[t]
            a_next = self.alpha_bar[steps[i + 1]] if i + 1 < len(steps) else self.alpha_bar.new_ones(())
            eps = (z - a.sqrt() * x0) / (1 - a).sqrt()
            z = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
        return z

    def flops_per_concept(self):
        """Training FLOPs per concept: a clean and a noisy one in the interleaved sequence."""
        return 2 * super().flops_per_concept()
