"""The remote-code export (NAG, AttnRes, NAG + Mixture-of-Depths) under `transformers`: padded
batches (left padding, positions from the mask) equal each row alone in forward and greedy
`generate`; the KV cache (DynamicCache) gives the uncached result; an export of a run trained
with MoD carries its thresholds, routes causally with them, really skips, and generates what
`nagjax sample --temperature 0` generates. Needs torch + transformers (skipped without them)."""

from __future__ import annotations

import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from nagjax.analysis.diagnostics import load_run
from nagjax.cli import main
from nagjax.infer.calibration import calibrate_thresholds
from nagjax.infer.sample import generate_ids
from nagjax.model.residual.base import StepContext
from nagjax.train.checkpoint import CheckpointStore
from test_export import saved_run

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

MOD_RUNS = {"nag_mod": ["model.n_kv_heads=1", "model.depth=3", "mod.rate=0.5"],
            "nag_mod_kv_all": ["model.depth=3", "mod.rate=0.5", "mod.kv=all", "mod.sublayers=attention"]}
EOS = 1


def mod_run(workdir, name):
    """A NAG run trained with MoD: random parameters and thresholds that skip about half the tokens
    (the signal's median per sublayer on random tokens, written where training writes them)."""
    cfg = saved_run("nag", workdir, MOD_RUNS[name])
    run = load_run(workdir)
    tokens = np.random.default_rng(1).integers(0, cfg.model.vocab_size, (4, 32))
    tau = calibrate_thresholds(run.graphdef, run.params, [{"inputs": tokens}], (0.5,))[..., 0]
    state = jax.tree.map(np.asarray, run.state)
    state["aux"]["mod_tau"] = tau.astype(np.float32)
    store = CheckpointStore(workdir / "checkpoints")
    store.save(2, state, {}, cfg.to_dict())
    store.close()
    return cfg


@pytest.fixture(scope="module", params=["nag", "attnres", "nag_mod", "nag_mod_kv_all"])
def exported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    cfg = mod_run(root / "run", request.param) if request.param in MOD_RUNS else saved_run(request.param, root / "run")
    assert main(["export", "--workdir", str(root / "run"), "--out", str(root / "hf")]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(str(root / "hf"), trust_remote_code=True,
                                                              dtype=torch.float32)
    return request.param, cfg, root, model.eval()


def left_pad(rows, pad=0):
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + list(r) for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def prompts(cfg, lengths=(7, 13, 4)):
    rng = np.random.default_rng(3)
    return [[EOS] + rng.integers(2, cfg.model.vocab_size, n - 1).tolist() for n in lengths]


def test_padded_forward_equals_each_row_alone(exported):
    _, cfg, _, model = exported
    rows = prompts(cfg)
    ids, mask = left_pad(rows)
    with torch.no_grad():
        batch = model(ids, attention_mask=mask).logits
        for i, r in enumerate(rows):
            alone = model(torch.tensor([r])).logits[0]
            got = batch[i, ids.shape[1] - len(r):]
            assert float((got - alone).abs().max()) < 1e-4


def test_batched_left_padded_generate_equals_per_row(exported):
    residual, cfg, _, model = exported
    rows = prompts(cfg)
    ids, mask = left_pad(rows)
    kw = dict(max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        batch = model.generate(ids, attention_mask=mask, **kw)[:, ids.shape[1]:]
        for i, r in enumerate(rows):
            alone = model.generate(torch.tensor([r]), **kw)[0, len(r):]
            assert batch[i].tolist() == alone.tolist(), (residual, i)
    print(f"{residual}: left-padded batch of {len(rows)} (prompt lengths {[len(r) for r in rows]}) "
          "generates what each row generates alone")


def test_cached_greedy_equals_uncached(exported):
    residual, cfg, _, model = exported
    ids = torch.tensor(prompts(cfg, (11,)))
    kw = dict(max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    lengths = []
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]),
                                           with_kwargs=True)
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **kw)
        hook.remove()
        uncached = model.generate(ids, use_cache=False, **kw)
        full = model(cached).logits
        step = model(cached[:, :-3], use_cache=True)
        tail = model(cached[:, -3:], past_key_values=step.past_key_values, use_cache=True).logits
    assert lengths == [ids.shape[1]] + [1] * (len(lengths) - 1)  # generate really reads the cache
    assert cached.tolist() == uncached.tolist()
    assert float((tail - full[:, -3:]).abs().max()) < 1e-4  # cached forward = full forward
    print(f"{residual}: cached greedy generate == uncached ({cached.shape[1] - ids.shape[1]} tokens)")


def test_mask_that_cannot_be_honoured_raises(exported):
    _, cfg, _, model = exported
    ids = torch.tensor(prompts(cfg, (6,)))
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(1, 1, 6, 6))
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(1, 5, dtype=torch.long))


def test_mod_export_routes_skips_and_samples_like_nagjax(exported):
    residual, cfg, root, model = exported
    if residual not in MOD_RUNS:
        pytest.skip("Mixture-of-Depths: the NAG runs trained with it")
    run = load_run(root / "run")
    tau = np.asarray(run.state["aux"]["mod_tau"])
    assert model.config.mod_skipping and np.allclose(model.config.mod_thresholds, tau)
    tokens = np.asarray(prompts(cfg, (24,)))
    policy = run.model().mod_policy

    def nagjax_logits(routing):
        f = jax.jit(lambda p, t: nnx.merge(run.graphdef, p)(t, ctx=StepContext(routing=routing))[0])
        return np.asarray(f(run.params, jax.numpy.asarray(tokens)))

    rows = []
    mlp = model.layers[2].mlp
    hook = mlp.register_forward_hook(lambda m, args, out: rows.append(args[0].reshape(-1, args[0].shape[-1]).shape[0]))
    with torch.no_grad():
        routed = model(torch.as_tensor(tokens)).logits.numpy()
    hook.remove()
    diff = float(np.abs(routed - nagjax_logits(policy.eval_routing(run.state["aux"]))).max())
    assert diff < 1e-4, diff
    if model.config.mod_sublayers == "both":  # the MLP of a routed block ran on the executed rows only
        assert 0 < rows[0] < tokens.shape[1]
    else:
        assert rows[0] == tokens.shape[1]
    model.config.mod_skipping = False
    with torch.no_grad():
        dense = model(torch.as_tensor(tokens)).logits.numpy()
    model.config.mod_skipping = True
    dense_diff = float(np.abs(dense - nagjax_logits(policy.sample_routing(None))).max())
    assert dense_diff < 1e-4 and np.abs(dense - routed).max() > 1e-3
    # greedy generation: the export (cached, skipping) == nagjax's sampler at the same thresholds
    prompt = prompts(cfg, (9,))[0]
    ours = generate_ids(run.graphdef, run.params, [prompt], eos_id=EOS, max_new_tokens=16, thresholds=tau)
    with torch.no_grad():
        theirs = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=EOS,
                                pad_token_id=0)[0, len(prompt):].tolist()
    assert theirs == ours.tokens[0], (theirs, ours.tokens[0])
    print(f"{residual} (kv={model.config.mod_kv}, sublayers={model.config.mod_sublayers}): routed logits vs nagjax causal thresholds max |diff| = {diff:.3g}; dense (mod_skipping="
          f"false) vs nagjax dense {dense_diff:.3g}; routed block MLP ran {rows[0]}/{tokens.shape[1]} rows; "
          f"greedy generate == nagjax generate_ids ({len(theirs)} tokens)")


@pytest.mark.parametrize("residual", ["prenorm", "lns"])
def test_import_a_transformers_llama(residual, tmp_path):
    """A LlamaForCausalLM saved by transformers (random weights, grouped K/V, untied head) imports
    as Pre-LN with equal logits, and into LNS as the same function (its factor undone)."""
    saved_run("prenorm", tmp_path / "run", [])
    assert main(["export", "-w", str(tmp_path / "run"), "-o", str(tmp_path / "ours")]) == 0
    config = transformers.LlamaConfig(vocab_size=4096, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                                      rope_theta=5000.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norm gains away from 1, so that carrying them over is tested
        for name, p in llama.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    llama.save_pretrained(tmp_path / "llama")
    for f in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(tmp_path / "ours" / f, tmp_path / "llama" / f)
    assert main(["import", str(tmp_path / "llama"), "-w", str(tmp_path / "w"), "--set", f"model.residual={residual}",
                 "data.seq_len=32", "data.batch_size=4", "train.progress_bar=false"]) == 0
    run = load_run(tmp_path / "w")
    tokens = np.random.default_rng(0).integers(0, 4096, (2, 20))
    ours = np.asarray(jax.jit(lambda p, t: nnx.merge(run.graphdef, p)(t)[0])(run.params, tokens))
    with torch.no_grad():
        theirs = llama(torch.as_tensor(tokens)).logits.numpy()
    diff = float(np.abs(ours - theirs).max())
    print(f"LlamaForCausalLM -> nagjax {residual}: max |logit difference| = {diff:.3g}")
    assert diff < 1e-4


# Looped stacks (model.repeat) export unrolled: Pre-LN/LNS as a plain Llama with the shared weights
# written once per executed layer, NAG/AttnRes through the remote code with per-pass residuals.
LOOPED = {"lns": ["model.repeat=2", "model.repeat_order=block"],
          "nag": ["model.depth=3", "model.repeat=2", "model.repeat_blocks=1:3"],
          "attnres": ["model.repeat=2", "model.attnres.block_size=3"]}


@pytest.mark.parametrize("residual", sorted(LOOPED))
def test_a_looped_stack_exports_with_the_logits_of_its_loop(residual, tmp_path):
    cfg = saved_run(residual, tmp_path / "run", LOOPED[residual])
    assert main(["export", "--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    run = load_run(tmp_path / "run")
    tokens = np.random.default_rng(3).integers(0, cfg.model.vocab_size, (2, 16))
    expected = np.asarray(nnx.merge(run.graphdef, run.params)(jax.numpy.asarray(tokens))[0])
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "hf"), trust_remote_code=residual != "lns", dtype=torch.float32).eval()
    assert model.config.num_hidden_layers == cfg.model.executed_depth > cfg.model.depth
    with torch.no_grad():
        got = model(torch.as_tensor(tokens)).logits.numpy()
    print(f"looped {residual}: max |logit difference| = {np.max(np.abs(got - expected)):.3g}")
    assert np.abs(expected).max() > 1.0
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
