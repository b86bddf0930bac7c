"""
The diffusion LCMs (Meta, "Large Concept Models", 2024, section 2.3). The Base-LCM regresses the
next concept, and an MSE model predicts the mean of the plausible next sentences, a point between
them. A diffusion LCM samples one instead: given the clean concepts before it, a network turns a
Gaussian sample into the next concept in a few dozen denoising steps. It is trained to predict the
clean concept from a noisy one (x0, MSE) at a random noise level (forward: the paper's Algorithm 1)
and samples with DDIM and classifier-free guidance (predict: Algorithm 2); both call one network,
denoise. The One-Tower runs the clean and the noisy concepts through one causal transformer; the
Two-Tower reads the clean ones with the Base-LCM's transformer (the contextualizer) and denoises
with a few blocks of its own. Both reuse baselcm.py's normalizer, pre-net, blocks and post-net.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from baselcm import BaseLCM, LCMConfig, SwiGLU, masked_mean, rope

@dataclass
class DiffusionConfig(LCMConfig):
    n_steps: int = 100             # diffusion timesteps (paper: 100)
    cfg_dropout: float = 0.15      # training: the share of noisy concepts that see no context
    n_denoiser: int = 2            # the Two-Tower's denoiser blocks (the paper's toy: 2)
    denoiser_rope: bool = True     # its cross-attention by position (RoPE); False: the paper's
    last_step_share: float = 0.0   # training: the share of targets noised to the last timestep,
                                   # pure noise, where the prediction is the conditional mean (paper: 0)

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

def attention_mask(T, follows, uncond):
    """Who sees whom in the sequence c_0, ..., c_{T-1}, then K noisy concepts, the k-th the next
    concept after c_j, j = follows[k]. A clean concept sees the clean ones up to itself; a noisy one
    sees c_0..c_j and itself: never its own clean target c_{j+1}, a later concept or another noisy
    one. Where uncond (B, K) is True (guidance's unconditional half), it sees only itself.
    -> (B, 1, T + K, T + K), True where a query may see a key."""
    K = len(follows)
    keys = torch.arange(T + K, device=follows.device)
    clean = keys <= torch.arange(T, device=keys.device)[:, None]  # (T, T + K)
    context = (keys <= follows[:, None]) & ~uncond[..., None]  # (B, K, T + K)
    itself = keys == T + torch.arange(K, device=keys.device)[:, None]
    return torch.cat([clean.expand(len(uncond), T, T + K), context | itself], 1)[:, None]

class DiffusionLCM(BaseLCM):
    """What both towers share: the schedule, the timestep's embedding, training and sampling. A tower
    defines contextualize (what the network reads of the clean concepts) and denoise (the network)."""
    # the prediction that picks the best checkpoint: the estimate of the conditional mean, one
    # denoising step from pure noise, unguided (one pass)
    point = {"guidance": 1.0, "ddim_steps": 1}

    def __init__(self, config):
        super().__init__(config)
        self.time = TimestepEmbedder(config.n_embd)
        self.register_buffer("alpha_bar", cosine_schedule(config.n_steps), persistent=False)

    def forward(self, concepts, targets, mask=None, eot=None, generator=None):
        """Training (Algorithm 1): every next concept noised to its own random timestep, denoised;
        -> (predicted clean targets, the loss): the squared error against the clean ones
        (normalized, summed over the dimensions, averaged over the targets where mask is True),
        every timestep weighted alike (but last_step_share's, drawn at the last), and the stop head's
        (eot). The draws come from generator."""
        x0 = self.normalizer.normalize(targets.float())  # (B, T, d_emb)
        B, T, d = x0.shape
        t = torch.randint(0, self.config.n_steps, (B, T), generator=generator, device=x0.device)
        if self.config.last_step_share:
            last = torch.rand(B, T, generator=generator, device=x0.device) < self.config.last_step_share
            t = t.masked_fill(last, self.config.n_steps - 1)
        a = self.alpha_bar[t][..., None]
        noise = torch.randn(B, T, d, generator=generator, device=x0.device)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        uncond = torch.rand(B, T, generator=generator, device=x0.device) < self.config.cfg_dropout
        context, h = self.contextualize(concepts)
        pred, out = self.denoise(context, noisy, self.timestep(t), uncond)
        err = (pred.float() - x0).pow(2).sum(-1)  # (B, T)
        return pred, masked_mean(err, mask) + self.stop_loss(out if h is None else h, eot, mask)

    @torch.no_grad()
    def denoising_loss(self, batches):
        """The training loss over eval_batches' batches, from seeded noise: one evaluation's like
        the next's"""
        generator = torch.Generator(self.alpha_bar.device).manual_seed(0)
        losses = [self(x, y, mask, generator=generator)[1].item() * mask.sum().item()
                  for x, y, mask, *_ in batches]
        return sum(losses) / sum(b[2].sum().item() for b in batches)

    @torch.no_grad()
    def predict(self, concepts, last=False, z=None, ddim_steps=10, guidance=3.0, rescale=0.7,
                init_noise=0.6):
        """Sampling (Algorithm 2): a next concept after each of concepts (B, T, d_emb) (last: after
        the last one only), in the encoder's space, and the stop head's logits there (from the clean
        concepts' causal pass). DDIM (deterministic, "trailing" timesteps) from init_noise * z, z a
        standard normal draw (B, K, d_emb), with classifier-free guidance and its rescale (Lin et al.
        2024): the paper's settings, but for 10 steps where it takes 40 (docs/speed.md: the same
        quality, 4x the speed). One step without guidance gives the model's estimate of the
        conditional mean. The conditional and the unconditional halves run in one batch."""
        B, T, d = concepts.shape
        K = 1 if last else T
        halves = 1 if guidance == 1 else 2
        # the clean concepts read once, for both halves; the noisy ones denoised at every step
        context, h = self.contextualize(concepts, last, halves)
        # the second half sees no context
        uncond = (torch.arange(halves * B, device=concepts.device) >= B)[:, None].expand(-1, K)
        times = (torch.arange(ddim_steps, 0, -1) * self.config.n_steps / ddim_steps).round().long() - 1
        # what the network reads of each step's timestep, for all the steps at once, all rows alike
        steps = self.timestep(times.to(z.device)[:, None, None])  # (ddim_steps, 1, 1, ...)
        z = init_noise * z
        for i, t in enumerate(times.tolist()):
            x, out = self.denoise(context, z.repeat(halves, 1, 1), steps[i], uncond)
            h = out if h is None else h
            cond = x[:B].float()
            x0 = cond
            if halves == 2:
                x0 = x[B:] + guidance * (cond - x[B:])
                # rescaled to the conditional prediction's spread, against over-saturation
                rescaled = x0 * cond.std(-1, keepdim=True) / x0.std(-1, keepdim=True)
                x0 = rescale * rescaled + (1 - rescale) * x0
            a = self.alpha_bar[t]
            a_next = self.alpha_bar[times[i + 1]] if i + 1 < ddim_steps else self.alpha_bar.new_ones(())
            eps = (z - a.sqrt() * x0) / (1 - a).sqrt()
            z = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
        stop = self.stop(h[:B, -K:]).squeeze(-1).float()
        return self.normalizer.denormalize(z), stop

class OneTower(DiffusionLCM):
    def timestep(self, t):
        """timesteps t (...) -> what the network reads of them: their embedding (..., n_embd)"""
        return self.time(t)

    def contextualize(self, concepts, last=False, copies=1):
        """concepts (B, T, d_emb), clean, in the encoder's space -> (their pre-net embeddings (B, T,
        n_embd), which denoise runs with the noisy ones, and None: denoise gives their outputs); last
        (one next concept, generation): (their keys and values in every layer, computed once, in a
        cache (a (2, B, nh, T + 1, hs) a layer), their outputs (B, T, n_embd), for the stop head).
        What denoise reads comes in copies (guidance's halves: batch copies * B)."""
        x = self.drop(self.prenet(self.normalizer.normalize(concepts)))
        if not last:
            return x.repeat(copies, 1, 1), None
        c = self.config
        shape = (2, x.size(0), c.n_head, x.size(1) + 1, c.n_embd // c.n_head)
        cache = [x.new_zeros(shape) for _ in self.blocks]
        h = self.transformer(x, torch.arange(x.size(1), device=x.device), cache=cache)
        return [layer.repeat(1, copies, 1, 1, 1) for layer in cache], h

    def denoise(self, context, noisy, time, uncond):
        """The network. context: contextualize's; noisy (B, K, d_emb), normalized: the next concepts
        after the last K positions, noised to their timesteps t; time: timestep(t), (B, K, ...), or
        (1, 1, ...) for one t for all; uncond (B, K): those that see no context -> (their predicted
        clean concepts (B, K, d_emb), normalized; the clean concepts' own outputs (B, T, n_embd),
        which the stop head reads, or None). The paper concatenates the timestep's embedding to the
        input; through the pre-net's linear layer that is a sum. One pass: the clean concepts never
        see a noisy one. With a cache, the one next concept after it (K = 1) runs alone against its
        keys and values."""
        x = self.drop(self.prenet(noisy) + time)  # (B, K, n_embd)
        cached = isinstance(context, list)
        T = context[0].size(3) - 1 if cached else context.size(1)
        follows = torch.arange(T - noisy.size(1), T, device=x.device)
        mask = attention_mask(T, follows, uncond)
        # RoPE positions: c_j at j, the concept after it at j + 1
        if cached:
            return self.postnet(self.transformer(x, follows + 1, mask[:, :, T:], context)), None
        pos = torch.cat([torch.arange(T, device=x.device), follows + 1])
        x = self.transformer(torch.cat([context, x], 1), pos, mask)  # (B, T + K, n_embd)
        return self.postnet(x[:, T:]), x[:, :T]

    def flops_per_concept(self):
        """Training FLOPs per concept: a clean and a noisy one in the sequence."""
        return 2 * super().flops_per_concept()

def modulate(x, shift, scale):
    return x * (1 + scale) + shift

class DenoiserBlock(nn.Module):
    """A block of the Two-Tower's denoiser, no positions: self-attention to itself alone (a softmax
    over one key is 1: its value's projection), cross-attention to a zero vector and the
    contextualizer's outputs up to its position, then SwiGLU; each pre-normed, then shifted, scaled
    and gated by the timestep (AdaLN-Zero, DiT): zero-initialised, every block starts as the identity."""

    def __init__(self, config):
        super().__init__()
        n = config.n_embd
        self.n_head = config.n_head
        self.norm = nn.RMSNorm(n, elementwise_affine=False)
        self.itself = nn.Linear(n, n)
        self.q = nn.Linear(n, n)
        self.kv = nn.Linear(n, 2 * n)
        self.proj = nn.Linear(n, n)
        self.mlp = SwiGLU(config)
        self.modulation = nn.Linear(n, 9 * n)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def keys(self, context, rotation=None):
        """context (B, T + 1, n_embd) -> its keys, rotated (RoPE's (cos, sin), if given), and values
        for the cross-attention (2, B, nh, T + 1, hs)"""
        B, T1, C = context.shape
        k, v = self.kv(context).view(B, T1, 2, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        return torch.stack([rope(k, *rotation) if rotation else k, v])

    def forward(self, x, kv, sees, modulation, rotation=None):
        """x (B, K, n_embd), kv: keys(context), sees (B, K, T + 1), modulation: this block's of the
        timestep (B, K, 9 n_embd) or (1, 1, 9 n_embd); rotation: RoPE's (cos, sin) of the queries'
        positions, if any"""
        shift1, scale1, gate1, shift2, scale2, gate2, shift3, scale3, gate3 = modulation.chunk(9, -1)
        x = x + gate1 * self.itself(modulate(self.norm(x), shift1, scale1))
        B, K, C = x.shape
        q = self.q(modulate(self.norm(x), shift2, scale2)).view(B, K, self.n_head, -1).transpose(1, 2)
        q = rope(q, *rotation) if rotation else q
        y = F.scaled_dot_product_attention(q, kv[0], kv[1], sees[:, None])
        x = x + gate2 * self.proj(y.transpose(1, 2).reshape(B, K, C))
        return x + gate3 * self.mlp(modulate(self.norm(x), shift3, scale3))

class TwoTower(DiffusionLCM):
    def __init__(self, config):
        super().__init__(config)
        self.denoiser = nn.ModuleList([DenoiserBlock(config) for _ in range(config.n_denoiser)])
        self.final = nn.Linear(config.n_embd, 2 * config.n_embd)  # shift and scale before the post-net
        nn.init.zeros_(self.final.weight)
        nn.init.zeros_(self.final.bias)

    def rotation(self, pos):
        """positions pos (T,) -> RoPE's (cos, sin) of them, where the denoiser reads positions (a
        departure from the paper, whose denoiser has none: docs/results.md); else None"""
        angles = pos[:, None].float() * self.inv_freq  # (T, hs/2)
        return (angles.cos(), angles.sin()) if self.config.denoiser_rope else None

    def timestep(self, t):
        """timesteps t (...) -> what the network reads of them: every block's shift, scale and gate,
        and the final norm's shift and scale (..., (9 n_denoiser + 2) n_embd)"""
        time = F.silu(self.time(t))
        return torch.cat([block.modulation(time) for block in self.denoiser] + [self.final(time)], -1)

    def contextualize(self, concepts, last=False, copies=1):
        """concepts (B, T, d_emb), clean, in the encoder's space -> (the keys and values, in each
        denoiser block, of the contextualizer's outputs (the Base-LCM's causal transformer) after a
        zero vector, which a concept without context sees (the output at c_j is at position j + 1):
        computed once, however often denoise runs, in copies (guidance's halves); the outputs (B, T,
        n_embd), for the stop head)."""
        x = self.drop(self.prenet(self.normalizer.normalize(concepts)))
        h = self.transformer(x, torch.arange(x.size(1), device=x.device))
        # (copies B, T + 1, n_embd)
        context = torch.cat([torch.zeros_like(h[:, :1]), h], 1).repeat(copies, 1, 1)
        rotation = self.rotation(torch.arange(context.size(1), device=x.device))
        keys = [block.keys(context, rotation) for block in self.denoiser]
        return keys, h

    def denoise(self, context, noisy, time, uncond):
        """The network: as the One-Tower's, on the contextualizer's outputs. The concept after c_j, at
        position j + 1, sees the zero vector and the outputs at c_0..c_j, or, where uncond, the zero
        vector alone."""
        T = context[0].size(3) - 1
        follows = torch.arange(T - noisy.size(1), T, device=noisy.device)
        keys = torch.arange(T + 1, device=noisy.device)
        sees = (keys == 0) | (keys <= follows[:, None] + 1) & ~uncond[..., None]  # (B, K, T + 1)
        x = self.drop(self.prenet(noisy))
        rotation = self.rotation(follows + 1)
        *modulations, final = time.split(9 * x.size(-1), -1)
        for block, kv, modulation in zip(self.denoiser, context, modulations):
            x = block(x, kv, sees, modulation, rotation)
        shift, scale = final.chunk(2, -1)
        return self.postnet(modulate(F.rms_norm(x, x.shape[-1:]), shift, scale)), None
