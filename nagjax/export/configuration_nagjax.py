"""Configuration of a nagjax model exported for `transformers` (written by `nagjax export`).

Self-contained: needs only `transformers`. See modeling_nagjax.py for the forward pass.
"""

from transformers import PretrainedConfig


class NagjaxConfig(PretrainedConfig):
    model_type = "nagjax"

    def __init__(self, residual="nag", vocab_size=4096, hidden_size=256, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=4, head_dim=64, mlp_widths=None,
                 block_ids=None, rope_theta=10000.0, norm_eps=1e-6, nag_eps=1e-6,
                 nag_gate_floor=1e-6, nag_modulator_channels=32, attnres_block_size=1, attnres_sources=9,
                 tie_embeddings=False, mod_thresholds=None, mod_skipping=None, mod_sublayers="both",
                 mod_exempt_first_blocks=1, mod_kv="kept", use_cache=True, **kwargs):
        self.residual = residual
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.mlp_widths = list(mlp_widths or [])
        self.block_ids = list(block_ids if block_ids is not None else range(num_hidden_layers))
        self.rope_theta = rope_theta
        self.norm_eps = norm_eps
        self.nag_eps = nag_eps
        self.nag_gate_floor = nag_gate_floor
        self.nag_modulator_channels = nag_modulator_channels
        self.attnres_block_size = attnres_block_size
        self.attnres_sources = attnres_sources
        self.tie_embeddings = tie_embeddings
        # Mixture-of-Depths (a run trained with it): thresholds [depth][2] by stack position, and
        # whether the model routes with them (default: yes when there are thresholds).
        self.mod_thresholds = mod_thresholds
        self.mod_skipping = bool(mod_thresholds) if mod_skipping is None else bool(mod_skipping)
        self.mod_sublayers = mod_sublayers
        self.mod_exempt_first_blocks = mod_exempt_first_blocks
        self.mod_kv = mod_kv
        self.use_cache = use_cache
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)
