"""Typed, frozen experiment configs with dotted overrides.

Every part of nagjax takes the one dataclass it needs (no global config object). An experiment is a
`Config`; the CLI applies `key=value` overrides such as `model.depth=24` through `apply_overrides`,
which parses each value with the field's declared type and re-validates the whole tree, so a bad key
or value fails before any work starts with a message that names the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

MAX_STEPS = 2**31 - 1


class ConfigError(ValueError):
    """A config key or value is invalid; the message names the key and what is allowed."""


def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {message}")


@dataclass(frozen=True)
class SchemeOptions:
    """Base of a residual scheme's own hyperparameters, the config group `model.<scheme name>`.

    A scheme defines its options class in its own file and names it in its registry entry
    (`Scheme(options=...)`, nagjax/model/residual/base.py); registration declares it here
    (`declare_scheme`), so `model.<name>.<key>=...` overrides, validation and saved configs know
    it without this file importing any scheme (Levanter's `register_subclass` is the model).
    """

    def validate(self, prefix: str) -> None:
        """Raise ConfigError naming `prefix.<key>` for a bad value."""


@dataclass(frozen=True)
class SchemeDeclaration:
    """What config validation needs to know of a registered residual scheme."""

    name: str
    options: type[SchemeOptions] | None = None  # its config group model.<name>, if it has options
    skip_signal: bool = False  # Mixture-of-Depths can route on it (mod.rate > 0 allowed)


_SCHEMES: dict[str, SchemeDeclaration] = {}


def declare_scheme(declaration: SchemeDeclaration) -> None:
    """Make `model.residual=<name>` valid (and `model.<name>.*` a group, with options); called by
    the scheme registry when a scheme registers (importing `nagjax.model` registers the built-ins)."""
    existing = _SCHEMES.get(declaration.name)
    if existing is not None and existing != declaration:
        raise ValueError(f"residual scheme {declaration.name!r} is already declared as {existing}")
    if declaration.options is not None:
        if not (isinstance(declaration.options, type) and issubclass(declaration.options, SchemeOptions)
                and dataclasses.is_dataclass(declaration.options)):
            raise TypeError(f"scheme {declaration.name!r}: options must be a frozen dataclass subclassing "
                            f"SchemeOptions (got {declaration.options!r})")
        clash = {f.name for f in dataclasses.fields(ModelConfig)} & {declaration.name}
        if clash:
            raise ValueError(f"scheme {declaration.name!r}: its options group would shadow model.{declaration.name}")
    _SCHEMES[declaration.name] = declaration


def undeclare_scheme(name: str) -> None:
    """Forget scheme `name` (the scheme registry's `unregister`)."""
    _SCHEMES.pop(name, None)


def declared_schemes() -> dict[str, SchemeDeclaration]:
    """Every registered residual scheme's declaration, by name (registration order)."""
    return dict(_SCHEMES)


def scheme_declaration(name: str) -> SchemeDeclaration:
    """The declaration of scheme `name`; an unknown name is a ConfigError naming the choices."""
    if name not in _SCHEMES:
        hint = difflib.get_close_matches(name, list(_SCHEMES), n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        known = ", ".join(repr(n) for n in _SCHEMES) or "none registered: import nagjax.model first"
        raise ConfigError(f"model.residual: got {name!r}; expected one of {known}{extra}")
    return _SCHEMES[name]


def _option_groups() -> dict[str, type[SchemeOptions]]:
    return {n: d.options for n, d in _SCHEMES.items() if d.options is not None}


def _options_name(cls: type) -> str:
    for name, options in _option_groups().items():
        if options is cls:
            return name
    raise ConfigError(f"model.options: {cls.__name__} is no registered scheme's options class")


def require_skip_signal(residual: str, what: str) -> None:
    """A ConfigError unless scheme `residual` gives Mixture-of-Depths a skip signal; names the ones that do."""
    if not scheme_declaration(residual).skip_signal:
        able = [n for n, d in _SCHEMES.items() if d.skip_signal]
        raise ConfigError(f"{what} needs a residual scheme with a skip signal (model.residual one of "
                          f"{', '.join(map(repr, able))}; got {residual!r})")


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.replace(" ", "").split(",") if v]


@dataclass(frozen=True)
class ModelConfig:
    """Decoder shape and residual scheme (docs/methods.md §0). Sizes of 0 are derived (the
    properties below; the vocabulary from the tokeniser when a run starts)."""

    residual: str = "prenorm"  # a registered scheme (nagjax/model/residual/): prenorm, lns, nag, attnres
    vocab_size: int = 0  # 0: take it from the tokeniser
    d_model: int = 256
    depth: int = 4  # Transformer blocks; each has an attention and an MLP sublayer
    n_heads: int = 4
    n_kv_heads: int = 0  # 0: same as n_heads (no grouped KV)
    d_ff: int = 0  # 0: 8/3 * d_model rounded up to a multiple of 64
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    norm_eps: float = 1e-6
    init_std: float = 0.02
    compute_dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 on GPU/TPU
    remat: Literal["none", "full", "dots", "dots_attention"] = "none"  # see transformer.REMAT_POLICIES
    scan_unroll: int = 1  # lax.scan unroll factor over blocks; >= depth: no scan, one block after another
    attention: Literal["auto", "xla", "cudnn"] = "auto"
    # The schemes' own hyperparameters (`SchemeOptions`), read as `cfg.nag`, `cfg.attnres`, ... and
    # set as `model.nag.<key>=...`: only values that differ from their scheme's defaults are kept.
    options: tuple[SchemeOptions, ...] = ()
    # CascadeFormer taper (docs/methods.md §5, nagjax/model/taper.py): per-block MLP widths; "custom" reads
    # `taper_widths`. Widths are rounded to `taper_multiple` (0: 128, or 8 when d_ff < 1024) and
    # matched to the uniform model's MLP parameters (= MLP FLOPs); `taper_stages` > 0 makes the
    # schedule piecewise constant over that many scanned stages (compile time ~ stages).
    taper: Literal["none", "linear", "power", "custom"] = "none"
    taper_gamma: float = 2.0  # power: width_i ~ (L - i) ** gamma
    taper_multiple: int = 0
    taper_stages: int = 0  # 0: one stage per run of equal rounded widths
    taper_widths: str = ""  # custom: comma-separated MLP width per block
    # Original index of each block, comma-separated ("" = 0..depth-1). `nagjax prune` sets it so a
    # pruned model keeps each block's index-dependent behaviour (LNS factor, AttnRes source slots).
    block_ids: str = ""
    # Parameter-shared repetition (docs/methods.md §9, nagjax/model/loops.py): the blocks run `repeat`
    # times with shared attention/MLP weights. `repeat_order`: cycle = 1..L, 1..L, ...; block = each
    # block `repeat` times in a row (MobileLLM). `repeat_blocks` = "START:STOP" (0-based, STOP
    # exclusive; "" = the whole stack) repeats only that contiguous group, the rest runs once. The
    # scheme's per-pass parameters (its registry entry's `per_pass`) are one set per executed
    # position unless `repeat_share_residual`. repeat=1 is the plain stack.
    repeat: int = 1
    repeat_order: Literal["cycle", "block"] = "cycle"
    repeat_blocks: str = ""
    repeat_share_residual: bool = False

    def __post_init__(self):
        # A canonical form (one entry per scheme, defaults dropped, sorted), so that equal configs
        # compare, hash and save equal however their options were given.
        by_name = {}
        for opt in self.options:
            name = _options_name(type(opt))
            if name in by_name:
                raise ConfigError(f"model.options: two option sets for scheme {name!r}")
            by_name[name] = opt
        canonical = tuple(by_name[n] for n in sorted(by_name) if by_name[n] != type(by_name[n])())
        object.__setattr__(self, "options", canonical)

    def __getattr__(self, name: str):
        # Only called when normal lookup fails: `cfg.nag` is scheme nag's options (its defaults
        # unless set). Dunder and private names never mean a scheme.
        if name.startswith("_"):
            raise AttributeError(name)
        groups = _option_groups()
        if name not in groups:
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r} (scheme option groups: "
                                 f"{', '.join(sorted(groups)) or 'none registered'})")
        for opt in self.options:
            if isinstance(opt, groups[name]):
                return opt
        return groups[name]()

    def with_options(self, options: SchemeOptions) -> "ModelConfig":
        """This config with one scheme's options replaced."""
        kept = tuple(o for o in self.options if type(o) is not type(options))
        return dataclasses.replace(self, options=kept + (options,))

    def option_groups(self) -> dict[str, SchemeOptions]:
        """Every registered scheme's options in force (set or default), by group name."""
        return {name: getattr(self, name) for name in _option_groups()}

    @property
    def block_index_list(self) -> list[int]:
        return _int_list(self.block_ids) if self.block_ids else list(range(self.depth))

    @property
    def repeat_group(self) -> tuple[int, int]:
        """(start, stop) of the blocks that repeat (`model.repeat_blocks`; the whole stack by default)."""
        if not self.repeat_blocks:
            return 0, self.depth
        start, stop = (int(v) for v in self.repeat_blocks.replace(" ", "").split(":"))
        return start, stop

    @property
    def executed_depth(self) -> int:
        """Blocks executed per forward pass: depth + (repeat - 1) x the repeated group's size."""
        start, stop = self.repeat_group
        return self.depth + (self.repeat - 1) * (stop - start)

    @property
    def executed_index_list(self) -> list[int]:
        """The index each executed block hands its residual scheme (LNS factor, AttnRes slots): the
        original block index without repetition (`block_ids`), else the executed position."""
        return self.block_index_list if self.repeat == 1 else list(range(self.executed_depth))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def mlp_width(self) -> int:
        if self.d_ff:
            return self.d_ff
        return -(-(8 * self.d_model) // (3 * 64)) * 64

    @property
    def taper_width_list(self) -> list[int]:
        return _int_list(self.taper_widths)

    def validate(self, prefix: str = "model") -> None:
        scheme_declaration(self.residual)  # an unknown scheme names the registered ones
        _check(self.vocab_size >= 0, f"{prefix}.vocab_size", "must be >= 0 (0 = from the tokeniser)")
        _check(self.d_model >= 8, f"{prefix}.d_model", "must be >= 8")
        _check(self.depth >= 1, f"{prefix}.depth", "must be >= 1")
        _check(self.n_heads >= 1, f"{prefix}.n_heads", "must be >= 1")
        _check(
            self.d_model % self.n_heads == 0,
            f"{prefix}.n_heads",
            f"must divide model.d_model={self.d_model} (got {self.n_heads})",
        )
        _check(self.head_dim % 2 == 0, f"{prefix}.n_heads", "d_model / n_heads must be even for RoPE")
        _check(self.n_kv_heads >= 0, f"{prefix}.n_kv_heads", "must be >= 0 (0 = n_heads)")
        _check(
            self.n_heads % self.kv_heads == 0,
            f"{prefix}.n_kv_heads",
            f"must divide model.n_heads={self.n_heads} (got {self.kv_heads})",
        )
        _check(self.d_ff >= 0, f"{prefix}.d_ff", "must be >= 0 (0 = 8/3 d_model)")
        _check(self.rope_theta > 0, f"{prefix}.rope_theta", "must be > 0")
        _check(self.init_std > 0, f"{prefix}.init_std", "must be > 0")
        _check(self.scan_unroll >= 1, f"{prefix}.scan_unroll", "must be >= 1")
        for name, options in self.option_groups().items():
            options.validate(f"{prefix}.{name}")
        _check(self.taper_gamma > 0, f"{prefix}.taper_gamma", "must be > 0")
        _check(self.taper_multiple >= 0, f"{prefix}.taper_multiple", "must be >= 0 (0 = auto)")
        _check(self.taper_stages >= 0, f"{prefix}.taper_stages", "must be >= 0 (0 = per distinct width)")
        try:
            widths, ids = _int_list(self.taper_widths), self.block_index_list
        except ValueError:
            raise ConfigError(f"{prefix}.taper_widths/block_ids: expected comma-separated ints") from None
        if self.taper == "custom":
            _check(len(widths) == self.depth and min(widths) >= 1, f"{prefix}.taper_widths",
                   f"taper=custom needs {self.depth} positive comma-separated widths (got {self.taper_widths!r})")
        _check(len(ids) == self.depth and len(set(ids)) == len(ids) and ids == sorted(ids) and ids[0] >= 0,
               f"{prefix}.block_ids", f"must be {self.depth} increasing block indices >= 0 (got {self.block_ids!r})")
        _check(self.repeat >= 1, f"{prefix}.repeat", f"must be >= 1 (1 = every block once; got {self.repeat})")
        _check(self.repeat_order in ("cycle", "block"), f"{prefix}.repeat_order",
               f"must be cycle or block (got {self.repeat_order!r})")
        try:
            start, stop = self.repeat_group
        except ValueError:
            raise ConfigError(f"{prefix}.repeat_blocks: expected START:STOP block indices, e.g. 1:3 "
                              f"(got {self.repeat_blocks!r})") from None
        _check(0 <= start < stop <= self.depth, f"{prefix}.repeat_blocks",
               f"must be START:STOP with 0 <= START < STOP <= model.depth={self.depth} (got {self.repeat_blocks!r})")
        _check(self.repeat == 1 or not self.block_ids, f"{prefix}.block_ids",
               "a pruned stack (block_ids) cannot repeat (model.repeat > 1)")


@dataclass(frozen=True)
class ModConfig:
    """Mixture-of-Depths (docs/methods.md §2, nagjax/model/mod/): per-token skipping of sublayers
    by a scheme's skip signal (NAG's modulator m).

    Training keeps, per sequence and per sublayer, the top k = ceil((1 - rate) * T) tokens by m and
    runs the sublayer on those only (gather/scatter, static shapes); inference executes a token iff
    m >= tau, with tau calibrated during training (EMA of the batch's rate-quantile of m).
    """

    rate: float = 0.0  # fraction of tokens that skip each eligible sublayer; 0 = dense
    sublayers: Literal["both", "attention", "mlp"] = "both"
    exempt_first_blocks: int = 1  # the first blocks never skip (default: all but the first block)
    kv: Literal["kept", "all"] = "kept"  # kept: a token that skips attention gives no K/V there
    threshold_ema: float = 0.99  # EMA decay of the calibrated inference thresholds
    kept_multiple: int = 1  # round k up to this multiple (128: whole GPU tiles; see mod.kept_tokens)

    def validate(self, prefix: str = "mod") -> None:
        _check(0.0 <= self.rate < 1.0, f"{prefix}.rate", "must be in [0, 1)")
        _check(self.exempt_first_blocks >= 0, f"{prefix}.exempt_first_blocks", "must be >= 0")
        _check(0.0 <= self.threshold_ema < 1.0, f"{prefix}.threshold_ema", "must be in [0, 1)")
        _check(self.kept_multiple >= 1, f"{prefix}.kept_multiple", "must be >= 1")


def parse_sources(text: str, key: str = "data.sources") -> list[tuple[str, str, float]]:
    """`[NAME=]DIR:WEIGHT,...` -> [(name, dir, weight)]; the name defaults to DIR's last part."""
    out = []
    for item in (i.strip() for i in text.split(",")):
        name, sep, rest = item.partition("=")
        if not sep:
            name, rest = "", item
        where, colon, weight = rest.rpartition(":")
        try:
            w = float(weight)
        except ValueError:
            w = -1.0
        if not colon or not where or not w > 0:
            raise ConfigError(f"{key}: item {item!r} is not [NAME=]DIR:WEIGHT with WEIGHT > 0 "
                              f"(e.g. {key}=shards/prose:0.7,shards/code:0.3)")
        name = name or where.rstrip("/").split("/")[-1]
        _check(name.replace("-", "_").replace(".", "_").isidentifier(), key,
               f"source name {name!r} must be letters, digits, '_', '-' or '.' (set one: NAME=DIR:WEIGHT)")
        out.append((name, where, w))
    names = [n for n, _, _ in out]
    _check(len(set(names)) == len(names), key, f"source names must differ (got {names}); "
           "name them: NAME=DIR:WEIGHT")
    return out


@dataclass(frozen=True)
class DataConfig:
    """Where tokens come from and how they are batched.

    `source="embedded"` uses the corpus shipped in the package (train/validation split built in);
    any other value is a shard folder written by `nagjax data`. `sources` mixes several instead:
    `[NAME=]DIR:WEIGHT,...` (DIR a shard folder or `embedded`; the name, default DIR's last part,
    tags the per-source validation losses `eval/loss/NAME`); see nagjax/data/mixture.py.
    """

    source: str = "embedded"
    sources: str = ""  # a weighted mixture of shard folders; overrides `source`
    tokenizer: str = ""  # tokeniser file; "" = the shards' own (or the embedded corpus's)
    vocab_size: int = 4096  # used when the embedded corpus's tokeniser is trained
    seq_len: int = 256
    batch_size: int = 16  # global batch, in sequences
    shuffle_seed: int = 0
    worker_count: int = 0  # Grain worker processes; 0 = in the main process
    # Packed windows hold several documents separated by EOS. document_mask: a token attends only
    # to tokens of its own document (an EOS opens the document it precedes) in training and
    # evaluation; document_positions: RoPE positions also restart at each EOS. Default off: on the
    # embedded corpus it measured no validation-loss benefit (docs/training.md, "Document masking").
    document_mask: bool = False
    document_positions: bool = False

    def validate(self, prefix: str = "data") -> None:
        _check(bool(self.source), f"{prefix}.source", "must be 'embedded' or a token-shard directory")
        if self.sources:
            parse_sources(self.sources, f"{prefix}.sources")
            _check(self.source == "embedded", f"{prefix}.sources",
                   f"set either {prefix}.source or {prefix}.sources, not both")
        _check(self.vocab_size >= 64, f"{prefix}.vocab_size", "must be >= 64")
        _check(self.seq_len >= 2, f"{prefix}.seq_len", "must be >= 2")
        _check(self.batch_size >= 1, f"{prefix}.batch_size", "must be >= 1")
        _check(self.worker_count >= 0, f"{prefix}.worker_count", "must be >= 0")
        _check(self.document_mask or not self.document_positions, f"{prefix}.document_positions",
               f"needs {prefix}.document_mask=true (positions restart per document only when documents "
               "are masked from each other)")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up and cosine decay; the schemes' parameter groups (docs/methods.md §1.6)."""

    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global-norm clip; 0 disables
    nag_lr_ratio: float = 0.1  # NAG's `nag` group (scalars, modulator): LR relative to the matrix LR

    def validate(self, prefix: str = "optim") -> None:
        _check(self.lr > 0, f"{prefix}.lr", "must be > 0")
        _check(0 <= self.min_lr_ratio <= 1, f"{prefix}.min_lr_ratio", "must be in [0, 1]")
        _check(self.warmup_steps >= 0, f"{prefix}.warmup_steps", "must be >= 0")
        _check(self.weight_decay >= 0, f"{prefix}.weight_decay", "must be >= 0")
        _check(0 <= self.b1 < 1, f"{prefix}.b1", "must be in [0, 1)")
        _check(0 <= self.b2 < 1, f"{prefix}.b2", "must be in [0, 1)")
        _check(self.eps > 0, f"{prefix}.eps", "must be > 0")
        _check(self.grad_clip >= 0, f"{prefix}.grad_clip", "must be >= 0 (0 disables)")
        _check(self.nag_lr_ratio > 0, f"{prefix}.nag_lr_ratio", "must be > 0")


LOGGERS = ("tensorboard", "jsonl", "wandb")


@dataclass(frozen=True)
class TrainConfig:
    """Loop length, evaluation, checkpointing and logging cadence, and what a long run does when a
    step goes bad or the latest checkpoint is damaged (README, "Long runs")."""

    steps: int = 300
    seed: int = 0
    eval_every: int = 100  # 0: only at the end
    eval_batches: int = 8
    checkpoint_every: int = 100  # 0: only at the end
    keep_checkpoints: int = 2
    log_every: int = 10
    progress_bar: bool = True
    grad_accum: int = 1  # microbatches per step (data.batch_size must divide); one optimiser update
    # Token losses in chunks of about this many tokens per device, so the batch's float32 logits
    # never exist at once: 0 = auto (chunk only above 256 MiB of logits), -1 = never (train/loss.py).
    loss_chunk_tokens: int = 0
    # A bad step (non-finite loss or gradient norm, or a loss spike) is skipped; this many bad steps
    # in a row roll the run back to its last checkpoint, at most `max_rollbacks` times per run.
    max_bad_steps: int = 5
    max_rollbacks: int = 3
    skip_batches_on_rollback: int = 0  # batches dropped after a rollback (besides the bad ones)
    spike_factor: float = 0.0  # a loss above this x its running mean is bad; 0 = off
    strict_resume: bool = False  # a latest checkpoint that fails to restore stops the run (no fallback)
    # Checkpoints are written by a background thread while training goes on (at most one in flight);
    # false: every save blocks the loop until it is committed.
    async_checkpointing: bool = True
    # Where scalars go (comma-separated; nagjax/train/logging.py): tensorboard (logs/events.*),
    # jsonl (logs/metrics.jsonl, what tests, sweeps and `read_metrics` read), wandb (extra [wandb]).
    loggers: str = "tensorboard,jsonl"
    wandb_project: str = "nagjax"
    wandb_entity: str = ""  # "" = your default W&B entity

    @property
    def logger_list(self) -> list[str]:
        return [n.strip() for n in self.loggers.split(",") if n.strip()]

    def validate(self, prefix: str = "train") -> None:
        _check(self.steps >= 1, f"{prefix}.steps", "must be >= 1")
        _check(self.steps <= MAX_STEPS, f"{prefix}.steps",
               f"must be <= {MAX_STEPS} (the step counter is a 32-bit int on device)")
        _check(self.eval_every >= 0, f"{prefix}.eval_every", "must be >= 0 (0 = at the end only)")
        _check(self.eval_batches >= 1, f"{prefix}.eval_batches", "must be >= 1")
        _check(self.checkpoint_every >= 0, f"{prefix}.checkpoint_every", "must be >= 0")
        _check(self.keep_checkpoints >= 1, f"{prefix}.keep_checkpoints", "must be >= 1")
        _check(self.log_every >= 1, f"{prefix}.log_every", "must be >= 1")
        _check(self.grad_accum >= 1, f"{prefix}.grad_accum", "must be >= 1")
        _check(self.loss_chunk_tokens >= -1, f"{prefix}.loss_chunk_tokens",
               "must be > 0 (tokens per chunk), 0 (auto) or -1 (never chunk)")
        _check(self.max_bad_steps >= 1, f"{prefix}.max_bad_steps", "must be >= 1")
        _check(self.max_rollbacks >= 0, f"{prefix}.max_rollbacks", "must be >= 0 (0 = stop at the first)")
        _check(self.skip_batches_on_rollback >= 0, f"{prefix}.skip_batches_on_rollback", "must be >= 0")
        _check(self.spike_factor == 0 or self.spike_factor > 1, f"{prefix}.spike_factor",
               "must be 0 (off) or > 1 (a multiple of the running mean loss)")
        unknown = [n for n in self.logger_list if n not in LOGGERS]
        _check(not unknown, f"{prefix}.loggers", f"unknown logger(s) {unknown}; expected a "
               f"comma-separated list of {', '.join(LOGGERS)} (or empty)")


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh axis sizes (see nagjax/sharding.py).

    dcn_data * stage * data * fsdp * tensor must equal the device count; one of data/fsdp/tensor
    may be -1 (the rest). `dcn_data` is data parallelism across TPU slices (or hosts) over the
    data-centre network; `stage` splits the stacked blocks into pipeline stages (docs/pipeline.md,
    `pipeline.*`); `data` replicates parameters; `fsdp` shards parameters and optimiser state;
    `tensor` splits attention heads and MLP width.
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    dcn_data: int = 1
    stage: int = 1

    def validate(self, prefix: str = "mesh") -> None:
        _check(self.dcn_data >= 1, f"{prefix}.dcn_data", "must be >= 1 (slices or hosts)")
        _check(self.stage >= 1, f"{prefix}.stage", "must be >= 1 (1 = no pipeline)")
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        for name, size in sizes.items():
            _check(size == -1 or size >= 1, f"{prefix}.{name}", "must be >= 1 or -1 (the rest)")
        _check(
            sum(1 for s in sizes.values() if s == -1) <= 1,
            prefix,
            "at most one axis may be -1",
        )


@dataclass(frozen=True)
class PipelineConfig:
    """Pipeline parallelism over `mesh.stage` (docs/pipeline.md, nagjax/model/pipeline.py): the
    executed blocks are cut into `mesh.stage x repeats` contiguous pieces, piece q running on stage
    q mod stage, and each (grad-accumulation) batch flows through them in `microbatches` parts.
    Ignored while `mesh.stage` is 1."""

    microbatches: int = 0  # 0: as many as stages (the least the schedule allows)
    repeats: int = 1  # pieces per stage; > 1 is the circular schedule (a smaller bubble)
    # Block AttnRes across stages: a stage keeps the block summaries of each microbatch it already
    # holds and a hop carries only those produced since (false: the whole buffer every hop).
    cross_stage_cache: bool = True

    def microbatch_count(self, stages: int) -> int:
        return self.microbatches or stages

    def validate(self, prefix: str = "pipeline") -> None:
        _check(self.microbatches >= 0, f"{prefix}.microbatches", "must be >= 0 (0 = as many as stages)")
        _check(self.repeats >= 1, f"{prefix}.repeats", "must be >= 1 (1 = one piece per stage)")


@dataclass(frozen=True)
class Config:
    """One experiment: everything needed to reproduce a run."""

    name: str = "custom"
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    mod: ModConfig = field(default_factory=ModConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)

    def validate(self) -> "Config":
        self.model.validate()
        self.mod.validate()
        if self.mod.rate > 0:
            require_skip_signal(self.model.residual, f"mod.rate={self.mod.rate} (Mixture-of-Depths; or mod.rate=0)")
        self.data.validate()
        self.optim.validate()
        self.train.validate()
        _check(self.data.batch_size % self.train.grad_accum == 0, "train.grad_accum",
               f"must divide data.batch_size={self.data.batch_size} (got {self.train.grad_accum})")
        self.mesh.validate()
        self.pipeline.validate()
        if self.mesh.stage > 1:
            stages, m = self.mesh.stage, self.pipeline.microbatch_count(self.mesh.stage)
            _check(m >= stages, "pipeline.microbatches",
                   f"must be >= mesh.stage={stages} (a microbatch must leave the last stage before "
                   f"it re-enters the first; got {m})")
            micro = self.data.batch_size // self.train.grad_accum
            _check(micro % m == 0, "pipeline.microbatches",
                   f"must divide the {micro} sequences of a step's batch (data.batch_size="
                   f"{self.data.batch_size} / train.grad_accum={self.train.grad_accum}); got {m}")
        return self

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain nested dicts (JSON); every scheme's options appear as `model.<name>`."""
        return to_dict(self)



# ---------------------------------------------------------------------------------------------
# Dotted overrides
# ---------------------------------------------------------------------------------------------


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def to_dict(obj: Any) -> dict:
    """A config dataclass as nested dicts; a ModelConfig's options as one group per scheme."""
    out = {}
    for f in dataclasses.fields(obj):
        if isinstance(obj, ModelConfig) and f.name == "options":
            continue
        value = getattr(obj, f.name)
        out[f.name] = to_dict(value) if dataclasses.is_dataclass(value) else value
    if isinstance(obj, ModelConfig):
        out.update({name: to_dict(opt) for name, opt in obj.option_groups().items()})
    return out


def _groups(obj: Any) -> dict[str, Any]:
    """The sub-config groups of a config dataclass: its dataclass fields and, on a ModelConfig,
    the registered schemes' options."""
    out = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)
           if dataclasses.is_dataclass(getattr(obj, f.name))}
    if isinstance(obj, ModelConfig):
        out.update(obj.option_groups())
    return out


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def parse_value(key: str, raw: str, tp: Any) -> Any:
    """Parse the string `raw` as the declared type `tp` of config field `key`."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if raw in choices:
            return raw
        hint = difflib.get_close_matches(raw, [str(c) for c in choices], n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ConfigError(f"{key}: got {raw!r}; expected {_type_name(tp)}{extra}")
    if tp is bool:
        low = raw.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}: got {raw!r}; expected a bool (true/false)")
    if tp is int:
        # Integer literals only (1000, -3, 10_000, 0x40): "1e99" or "1.5" is a mistake, not an int.
        try:
            value = int(raw, 10) if raw[:2].lower() not in ("0x", "0o", "0b") else int(raw, 0)
        except ValueError:
            raise ConfigError(f"{key}: got {raw!r}; expected an int written as digits, e.g. 1000 "
                              "or 10_000") from None
        if not -(2**63) <= value < 2**63:
            raise ConfigError(f"{key}: got {raw!r}; out of range for an int (64 bits)")
        return value
    if tp is float:
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{key}: got {raw!r}; expected a float, e.g. 0.1 or 3e-4") from None
        if not math.isfinite(value):
            raise ConfigError(f"{key}: got {raw!r}; expected a finite float")
        return value
    if tp is str:
        return raw
    raise ConfigError(f"{key}: fields of type {tp} cannot be set from the command line")


def _set_path(obj: Any, path: list[str], raw: str, full_key: str) -> Any:
    name = path[0]
    if not dataclasses.is_dataclass(obj):
        raise ConfigError(f"{full_key}: {type(obj).__name__} has no sub-keys")
    types_ = _field_types(type(obj))
    groups = _groups(obj)
    if name in groups and name not in types_:  # a scheme's options group (ModelConfig)
        if len(path) == 1:
            raise ConfigError(f"{full_key}: is a group; set one of its keys, e.g. {full_key}.<key>=...")
        return obj.with_options(_set_path(groups[name], path[1:], raw, full_key))
    if name not in types_:
        prefix = full_key[: len(full_key) - len(".".join(path))]
        known = [prefix + k for k in {**types_, **groups}]
        hint = difflib.get_close_matches(prefix + name, known, n=1)
        extra = f"; did you mean {hint[0]!r}?" if hint else ""
        raise ConfigError(
            f"unknown config key {full_key!r}{extra} (keys here: {', '.join(sorted({**types_, **groups}))})"
        )
    current = getattr(obj, name)
    if len(path) == 1:
        if dataclasses.is_dataclass(current):
            raise ConfigError(f"{full_key}: is a group; set one of its keys, e.g. {full_key}.<key>=...")
        new = parse_value(full_key, raw, types_[name])
    else:
        new = _set_path(current, path[1:], raw, full_key)
    return dataclasses.replace(obj, **{name: new})


def apply_overrides(config: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """Apply `key=value` strings (dotted keys) and validate the result."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value, e.g. model.depth=24")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        config = _set_path(config, key.split("."), raw.strip(), key)
    return config.validate()


def config_from_dict(data: dict, cls: type = Config) -> Any:
    """Rebuild a (nested) config dataclass from `to_dict()` output, e.g. a saved run's config."""
    kwargs = {}
    types_ = _field_types(cls)
    for f in dataclasses.fields(cls):
        if f.name not in data or (cls is ModelConfig and f.name == "options"):
            continue
        value = data[f.name]
        tp = types_[f.name]
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            value = config_from_dict(value, tp)
        kwargs[f.name] = value
    known = {f.name for f in dataclasses.fields(cls)}
    if cls is ModelConfig:
        groups = _option_groups()
        kwargs["options"] = tuple(config_from_dict(data[n], groups[n]) for n in groups if n in data)
        known |= set(groups)
    unknown = set(data) - known
    if unknown:
        extra = "; a scheme's options need its scheme registered (import it first)" if cls is ModelConfig else ""
        raise ConfigError(f"unknown keys in saved {cls.__name__}: {sorted(unknown)}{extra}")
    return cls(**kwargs)
