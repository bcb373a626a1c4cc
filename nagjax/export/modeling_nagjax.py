"""A nagjax model in PyTorch for `transformers` (copied next to the weights by `nagjax export`).

Load with `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`. Self-contained
(torch + transformers only) and written to compute exactly what nagjax computes in float32
(nagjax's docs/methods.md; ground truth: nagjax/model/residual/nag.py, attnres.py and
pallas_kernels/nag_update/reference.py):

* shared decoder (§0): causal attention with RoPE pairing the halves of each head, optional grouped
  K/V heads, SwiGLU MLP, no biases; parameters keep nagjax's layouts ([d, heads, head_dim], ...).
* NAG (§1): a float32 norm lane s and a unit-RMS direction D; sublayers read D and write a centred,
  orthogonalised, RMS-1 update gated by g = alpha * m(D); the head is a cosine scaled by
  exp(s + decode_log_gain).
* AttnRes (§4): each sublayer reads a per-token softmax mixture over earlier sources (embedding,
  completed and partial blocks of `attnres_block_size` sublayer outputs) through its pre-norm.

Every sublayer runs (no Mixture-of-Depths skipping) and there is no KV cache: `generate`
recomputes the whole prefix at every step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

try:
    from .configuration_nagjax import NagjaxConfig
except ImportError:  # loaded as a plain module
    from configuration_nagjax import NagjaxConfig


def _param(*shape):
    return nn.Parameter(torch.zeros(shape))


def rms_normalize(x, eps):
    return x * torch.rsqrt(torch.mean(x * x, dim=-1, keepdim=True) + eps)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.scale = _param(dim)
        self.eps = eps

    def forward(self, x):
        return rms_normalize(x, self.eps) * self.scale


def rope(x_btnh, positions_t, theta):
    half = x_btnh.shape[-1] // 2
    freq = theta ** (-torch.arange(half, dtype=torch.float32, device=x_btnh.device) / half)
    angle = positions_t.to(torch.float32)[:, None] * freq  # [t, half]
    sin, cos = torch.sin(angle)[None, :, None, :], torch.cos(angle)[None, :, None, :]
    x1, x2 = x_btnh[..., :half], x_btnh[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        d, h, kv, hd = (config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                        config.head_dim)
        self.wq, self.wk, self.wv = _param(d, h, hd), _param(d, kv, hd), _param(d, kv, hd)
        self.wo = _param(h, hd, d)
        self.groups, self.theta = h // kv, config.rope_theta

    def forward(self, x_btd):
        positions = torch.arange(x_btd.shape[1], device=x_btd.device)
        q = rope(torch.einsum("btd,dnh->btnh", x_btd, self.wq), positions, self.theta)
        k = rope(torch.einsum("btd,dnh->btnh", x_btd, self.wk), positions, self.theta)
        v = torch.einsum("btd,dnh->btnh", x_btd, self.wv)
        k, v = (t.repeat_interleave(self.groups, dim=2) for t in (k, v))  # query head n -> kv n // G
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True).transpose(1, 2)
        return torch.einsum("btnh,nhd->btd", out, self.wo)


class SwiGLU(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.w_gate, self.w_up, self.w_down = _param(d, f), _param(d, f), _param(f, d)

    def forward(self, x):
        return (F.silu(x @ self.w_gate) * (x @ self.w_up)) @ self.w_down


def centre_rows(w):
    return w - torch.mean(w, dim=-1, keepdim=True)


# --- NAG (§1) -------------------------------------------------------------------------------


class NagStream(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.g_enc, self.decode_log_gain = _param(), _param()
        self.eps = config.nag_eps

    def encode(self, embed_vd, tokens_bt):
        e = centre_rows(embed_vd)[tokens_bt]
        log_rms = 0.5 * torch.log(torch.mean(e * e, dim=-1) + self.eps ** 2)
        return {"log_norm": log_rms + self.g_enc, "direction": e * torch.exp(-log_rms)[..., None]}

    def logits(self, state, head_vd):
        w = centre_rows(head_vd)
        w = w * torch.rsqrt(torch.mean(w * w, dim=-1, keepdim=True) + self.eps ** 2)
        cosine = torch.einsum("btd,vd->btv", state["direction"], w) / head_vd.shape[-1]
        return cosine * torch.exp(state["log_norm"] + self.decode_log_gain)[..., None]


class NagResidual(nn.Module):
    def __init__(self, config, block_id):
        super().__init__()
        c, d = config.nag_modulator_channels, config.hidden_size
        self.alpha, self.beta_raw = _param(2), _param(2)
        self.mod_w, self.mod_b, self.mod_logits = _param(2, c, d), _param(2, c), _param(2, c)
        self.eps, self.gate_floor = config.nag_eps, config.nag_gate_floor

    def forward(self, state, sublayer, slot):
        eps, d = self.eps, state["direction"]
        f = sublayer(d)
        # modulator m(D) (§1.3)
        z = torch.einsum("btd,cd->btc", d, self.mod_w[slot]) + self.mod_b[slot]
        mix = torch.einsum("btc,c->bt", torch.sigmoid(z), torch.softmax(self.mod_logits[slot], dim=-1))
        m = torch.clamp(mix, min=self.gate_floor) ** F.softplus(self.beta_raw[slot])
        # orthogonal RMS-1 update (§1.2)
        f = f - torch.mean(f, dim=-1, keepdim=True)
        coeff = torch.sum(f * d, dim=-1, keepdim=True) / torch.sum(d * d, dim=-1, keepdim=True)
        f_perp = f - coeff * d
        u = f_perp * torch.rsqrt(torch.mean(f_perp * f_perp, dim=-1, keepdim=True) + eps * eps)
        g = self.alpha[slot] * m
        new = d + g[..., None] * u
        new = new * torch.rsqrt(torch.mean(new * new, dim=-1, keepdim=True) + eps * eps)
        new = torch.where((g == 0)[..., None], d, new)
        return {"log_norm": state["log_norm"] + 0.5 * torch.log1p(g * g), "direction": new}


# --- AttnRes (§4) ---------------------------------------------------------------------------


class DepthRouter(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.query = _param(config.hidden_size)
        self.key_norm = RMSNorm(config.hidden_size, config.norm_eps)

    def forward(self, sources):
        """sources: {slot: [b, t, d]} of the n filled slots -> n * sum_i softmax_i(<q, norm(v_i)>) v_i
        (the factor n: every consumer is an RMSNorm, so it only divides that norm's eps by n^2)."""
        v = torch.stack([sources[k] for k in sorted(sources)], dim=2)  # [b, t, n, d]
        w = torch.softmax(torch.einsum("btnd,d->btn", self.key_norm(v), self.query), dim=-1)
        return torch.einsum("btn,btnd->btd", w, v) * v.shape[2]


class AttnResStream(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.final_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.final_router = DepthRouter(config)

    def encode(self, embed_vd, tokens_bt):
        return {"sources": {0: embed_vd[tokens_bt]}}

    def logits(self, state, head_vd):
        h = self.final_norm(self.final_router(state["sources"]))
        return torch.einsum("btd,vd->btv", h, head_vd)


class AttnResResidual(nn.Module):
    def __init__(self, config, block_id):
        super().__init__()
        self.norms = nn.ModuleList([RMSNorm(config.hidden_size, config.norm_eps) for _ in range(2)])
        self.routers = nn.ModuleList([DepthRouter(config) for _ in range(2)])
        self.block_id, self.block_size = block_id, config.attnres_block_size

    def forward(self, state, sublayer, slot):
        sources = dict(state["sources"])
        f = sublayer(self.norms[slot](self.routers[slot](sources)))
        k = 1 + (2 * self.block_id + slot) // self.block_size
        sources[k] = sources[k] + f if k in sources else f
        return {"sources": sources}


SCHEMES = {"nag": (NagStream, NagResidual), "attnres": (AttnResStream, AttnResResidual)}


class Block(nn.Module):
    def __init__(self, config, block_id, width):
        super().__init__()
        self.attn = Attention(config)
        self.mlp = SwiGLU(config.hidden_size, width)
        self.residual = SCHEMES[config.residual][1](config, block_id)

    def forward(self, state):
        state = self.residual(state, self.attn, 0)
        return self.residual(state, self.mlp, 1)


class NagjaxForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = NagjaxConfig
    base_model_prefix = "nagjax"
    _supports_cache_class = False
    _no_split_modules = ["Block"]

    def __init__(self, config):
        super().__init__(config)
        if config.residual not in SCHEMES:
            raise ValueError(f"residual {config.residual!r}: this file implements {sorted(SCHEMES)}")
        self.embed = _param(config.vocab_size, config.hidden_size)
        if not config.tie_embeddings:
            self.head = _param(config.vocab_size, config.hidden_size)
        self.stream = SCHEMES[config.residual][0](config)
        widths = config.mlp_widths or [math.ceil(8 * config.hidden_size / 192) * 64] * config.num_hidden_layers
        self.layers = nn.ModuleList(Block(config, i, w) for i, w in zip(config.block_ids, widths))
        self.post_init()

    def _init_weights(self, module):
        pass  # every parameter comes from the exported checkpoint

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        if attention_mask is not None and not bool(torch.all(attention_mask == 1)):
            raise ValueError("padding is not supported: pass unpadded sequences (one per call)")
        state = self.stream.encode(self.embed, input_ids)
        for block in self.layers:
            state = block(state)
        logits = self.stream.logits(state, self.embed if self.config.tie_embeddings else self.head)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        return {"input_ids": input_ids}  # no KV cache: the whole prefix every step
