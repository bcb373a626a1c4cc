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

Batches: `attention_mask` [b, t] (1 = token, 0 = padding, left or right) is honoured in forward
and `generate`: padding gives no keys, positions (RoPE) count real tokens only (`position_ids`
from the mask unless given), so a padded row computes what it computes alone. A mask this file
cannot honour (not [b, past + t] of 0/1) raises.

KV cache: `generate` (and a forward with `use_cache=True`) keeps each layer's rotated K/V in a
`transformers` `DynamicCache`; the stream state is per token, so NAG's two lanes and AttnRes's
per-token sources need nothing cached beyond K/V.

Mixture-of-Depths (§2): an export of a run trained with MoD carries its trained thresholds
(`mod_thresholds` [depth][2]); with `mod_skipping` (the default then) a token runs a routed
sublayer iff NAG's modulator m >= tau, causally, as `nagjax sample` does: a skipped token is left
exactly unchanged, with `mod_kv="kept"` it gives no K/V to that attention (a validity channel is
cached beside the keys), and a sublayer no token in the call executes is not computed (the MLP runs on the
executed rows only). `mod_skipping=False` runs every sublayer (dense).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

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


def rope_bt(x_btnh, positions_bt, theta):
    half = x_btnh.shape[-1] // 2
    freq = theta ** (-torch.arange(half, dtype=torch.float32, device=x_btnh.device) / half)
    angle = positions_bt.to(torch.float32)[..., None] * freq  # [b, t, half]
    sin, cos = torch.sin(angle)[:, :, None, :], torch.cos(angle)[:, :, None, :]
    x1, x2 = x_btnh[..., :half], x_btnh[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Context:
    """What one forward call shares across layers: positions [b, t], the key mask [b, past + t]
    (1 = a real token), the cache and this call's offset into it."""

    def __init__(self, positions, key_mask, cache, past, flag_keys):
        self.positions, self.key_mask, self.cache, self.past = positions, key_mask, cache, past
        self.active = key_mask[:, past:].bool()  # this call's real tokens [b, t]
        self.flag_keys = flag_keys


class Attention(nn.Module):
    def __init__(self, config, layer_idx=0):
        super().__init__()
        d, h, kv, hd = (config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                        config.head_dim)
        self.wq, self.wk, self.wv = _param(d, h, hd), _param(d, kv, hd), _param(d, kv, hd)
        self.wo = _param(h, hd, d)
        self.groups, self.theta, self.layer_idx = h // kv, config.rope_theta, layer_idx

    def keys_values(self, x_btd, ctx, gives_bt=None):
        """(keys, values) [b, kv, past + t, hd] and which of them are valid [b, past + t]: the new
        tokens' rotated K/V appended to the cache (when there is one). `gives_bt`: the new tokens
        that give K/V (Mixture-of-Depths kv="kept"); padding never gives any."""
        b, t, _ = x_btd.shape
        kv, hd = self.wk.shape[1], self.wk.shape[2]
        if gives_bt is not None and not bool(gives_bt.any()):  # nothing to project: a placeholder
            k = v = x_btd.new_zeros(b, kv, t, hd)
        else:
            k = rope_bt(torch.einsum("btd,dnh->btnh", x_btd, self.wk), ctx.positions, self.theta)
            v = torch.einsum("btd,dnh->btnh", x_btd, self.wv)
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # [b, kv, t, hd]: the cache's layout
        keys_valid = ctx.key_mask.bool()  # [b, past + t]
        if ctx.cache is not None:
            if ctx.flag_keys:  # MoD kv="kept": a last key channel says whether the token gave K/V
                gives = torch.ones(b, t, dtype=torch.bool, device=x_btd.device) if gives_bt is None else gives_bt
                k = torch.cat([k, gives.to(k.dtype)[:, None, :, None].expand(-1, kv, -1, 1)], dim=-1)
            k, v = ctx.cache.update(k, v, self.layer_idx)
            if ctx.flag_keys:
                keys_valid = keys_valid & k[:, 0, :, -1].bool()
                k = k[..., :-1]
        elif gives_bt is not None:
            keys_valid = keys_valid & torch.cat([torch.ones_like(keys_valid[:, :-t]), gives_bt], dim=1)
        return k, v, keys_valid

    def record(self, x_btd, ctx, gives_bt=None):
        """A skipped attention: only the cache is written (so every layer's cache stays aligned)."""
        if ctx.cache is not None:
            self.keys_values(x_btd, ctx, gives_bt)

    def forward(self, x_btd, ctx, gives_bt=None):
        """Causal attention of the new tokens over the cached ones and themselves."""
        b, t, _ = x_btd.shape
        q = rope_bt(torch.einsum("btd,dnh->btnh", x_btd, self.wq), ctx.positions, self.theta)
        k, v, keys_valid = self.keys_values(x_btd, ctx, gives_bt)
        s = k.shape[2]
        key_pos = torch.arange(s, device=x_btd.device)
        causal = key_pos[None, :] <= (ctx.past + torch.arange(t, device=x_btd.device))[:, None]  # [t, s]
        mask = causal[None] & keys_valid[:, None, :]  # [b, t, s]
        k, v = (u.repeat_interleave(self.groups, dim=1) for u in (k, v))  # query head n -> kv n // G
        scores = torch.einsum("btnh,bnsh->bnts", q, k) * q.shape[-1] ** -0.5
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
        top = torch.amax(scores, dim=-1, keepdim=True)
        weights = torch.exp(scores - torch.where(torch.isfinite(top), top, torch.zeros_like(top)))
        total = weights.sum(-1, keepdim=True)
        out = torch.einsum("bnts,bnsh->bnth", weights, v) / torch.where(total > 0, total, torch.ones_like(total))
        out = out.transpose(1, 2)
        return torch.einsum("btnh,nhd->btd", out, self.wo)  # a query that sees no key gets zeros


class SwiGLU(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.w_gate, self.w_up, self.w_down = _param(d, f), _param(d, f), _param(f, d)

    def forward(self, x, ctx=None, gives_bt=None):
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

    def forward(self, state, sublayer, slot, ctx, tau=None, kv_all=False):
        """One sublayer. `tau`: its Mixture-of-Depths threshold (None: every token runs it)."""
        eps, d = self.eps, state["direction"]
        # modulator m(D) (§1.3): computed from the input direction, before the sublayer
        z = torch.einsum("btd,cd->btc", d, self.mod_w[slot]) + self.mod_b[slot]
        mix = torch.einsum("btc,c->bt", torch.sigmoid(z), torch.softmax(self.mod_logits[slot], dim=-1))
        m = torch.clamp(mix, min=self.gate_floor) ** F.softplus(self.beta_raw[slot])
        g = self.alpha[slot] * m
        if tau is None:
            f = sublayer(d, ctx)
        else:  # causal thresholds (§2): a token runs the sublayer iff m >= tau; padding never does
            executed = (m >= tau) & ctx.active
            g = torch.where(executed, g, torch.zeros_like(g))
            f = self._routed(sublayer, d, ctx, executed, kv_all)
        # orthogonal RMS-1 update (§1.2); g = 0 (a skipped token) is an exact identity
        f = f - torch.mean(f, dim=-1, keepdim=True)
        coeff = torch.sum(f * d, dim=-1, keepdim=True) / torch.sum(d * d, dim=-1, keepdim=True)
        f_perp = f - coeff * d
        u = f_perp * torch.rsqrt(torch.mean(f_perp * f_perp, dim=-1, keepdim=True) + eps * eps)
        new = d + g[..., None] * u
        new = new * torch.rsqrt(torch.mean(new * new, dim=-1, keepdim=True) + eps * eps)
        new = torch.where((g == 0)[..., None], d, new)
        return {"log_norm": state["log_norm"] + 0.5 * torch.log1p(g * g), "direction": new}

    @staticmethod
    def _routed(sublayer, d, ctx, executed, kv_all):
        """The sublayer's output for the executed tokens (zeros elsewhere), really skipping work:
        an attention no token runs only writes the cache (K/V of every token under kv="all", none
        under "kept"); the token-wise MLP runs on the executed rows only."""
        if isinstance(sublayer, Attention):
            gives = None if kv_all else executed
            if not bool(executed.any()):
                sublayer.record(d, ctx, gives)
                return torch.zeros_like(d)
            return sublayer(d, ctx, gives)
        f = torch.zeros_like(d)
        if bool(executed.any()):
            f[executed] = sublayer(d[executed])
        return f


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

    def forward(self, state, sublayer, slot, ctx, tau=None, kv_all=False):
        sources = dict(state["sources"])
        f = sublayer(self.norms[slot](self.routers[slot](sources)), ctx)
        k = 1 + (2 * self.block_id + slot) // self.block_size
        sources[k] = sources[k] + f if k in sources else f
        return {"sources": sources}


SCHEMES = {"nag": (NagStream, NagResidual), "attnres": (AttnResStream, AttnResResidual)}


class Block(nn.Module):
    def __init__(self, config, block_id, width, layer_idx):
        super().__init__()
        self.attn = Attention(config, layer_idx)
        self.mlp = SwiGLU(config.hidden_size, width)
        self.residual = SCHEMES[config.residual][1](config, block_id)
        self.kv_all = getattr(config, "mod_kv", "kept") == "all"

    def forward(self, state, ctx, taus=(None, None)):
        state = self.residual(state, self.attn, 0, ctx, taus[0], self.kv_all)
        return self.residual(state, self.mlp, 1, ctx, taus[1], self.kv_all)


class NagjaxForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = NagjaxConfig
    base_model_prefix = "nagjax"
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
        self.layers = nn.ModuleList(Block(config, b, w, i)
                                    for i, (b, w) in enumerate(zip(config.block_ids, widths)))
        self.post_init()

    def _init_weights(self, module):
        pass  # every parameter comes from the exported checkpoint

    def layer_thresholds(self):
        """Per layer (position in the stack), the Mixture-of-Depths thresholds (attention, MLP) of
        the sublayers that route: None where a sublayer runs for every token."""
        c = self.config
        taus = getattr(c, "mod_thresholds", None)
        if not taus or not getattr(c, "mod_skipping", False):
            return [(None, None)] * len(self.layers)
        which = getattr(c, "mod_sublayers", "both")
        routes = (which in ("both", "attention"), which in ("both", "mlp"))
        exempt = getattr(c, "mod_exempt_first_blocks", 1)
        return [tuple(float(taus[i][slot]) if i >= exempt and routes[slot] else None for slot in (0, 1))
                for i in range(len(self.layers))]

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=None, labels=None, **kwargs):
        b, t = input_ids.shape
        if past_key_values is None:  # the name newer transformers versions pass
            past_key_values = kwargs.get("cache")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        if past_key_values is not None and not isinstance(past_key_values, Cache):
            raise ValueError("past_key_values: expected a transformers Cache (e.g. DynamicCache)")
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if attention_mask is None:
            key_mask = torch.ones(b, past + t, dtype=torch.long, device=input_ids.device)
        else:
            if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (b, past + t):
                raise ValueError(f"attention_mask: expected a [batch, cached + new tokens] = [{b}, {past + t}] "
                                 f"mask of 0/1, got shape {tuple(attention_mask.shape)}; this model "
                                 "cannot honour other masks")
            if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
                raise ValueError("attention_mask: expected 0 (padding) and 1 (token) only")
            key_mask = attention_mask.long()
        if position_ids is None:  # a row's real tokens count 0, 1, ... whatever padding precedes them
            position_ids = (key_mask.cumsum(-1) - 1).clamp(min=0)[:, past:]
        flag_keys = any(tau[0] is not None for tau in self.layer_thresholds()) and not self.layers[0].kv_all
        ctx = Context(position_ids, key_mask, past_key_values, past, flag_keys)
        state = self.stream.encode(self.embed, input_ids)
        for block, taus in zip(self.layers, self.layer_thresholds()):
            state = block(state, ctx, taus)
        logits = self.stream.logits(state, self.embed if self.config.tie_embeddings else self.head)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits,
                                      past_key_values=past_key_values if use_cache else None)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None,
                                      use_cache=None, cache=None, **kwargs):
        """Only the tokens the cache does not hold yet; the whole attention mask (left padding).
        The cache arrives as `cache` (newer transformers) or `past_key_values` (older)."""
        cache = cache if cache is not None else past_key_values
        if cache is not None and cache.get_seq_length() > 0:
            input_ids = input_ids[:, cache.get_seq_length():]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "past_key_values": cache,
                "use_cache": use_cache}
