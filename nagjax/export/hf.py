"""`nagjax export --format hf`: a workdir's checkpoint as a Hugging Face `transformers` folder.

OUT/ gets `model.safetensors` (float32, written with safetensors' numpy API: no torch needed),
`config.json` (+ `generation_config.json`), the tokeniser the run was trained with
(`tokenizer.json` or SentencePiece `tokenizer.model`, with `tokenizer_config.json` and
`special_tokens_map.json`), and for schemes without a `transformers` architecture the modelling
code (`configuration_nagjax.py`, `modeling_nagjax.py`) that `trust_remote_code=True` loads.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np

from safetensors.numpy import save_file

from nagjax.analysis.diagnostics import load_run
from nagjax.config import ConfigError
from nagjax.data.mixture import run_tokenizer
from nagjax.export import remote
from nagjax.export.layers import numpy_tree
from nagjax.export.registry import exporter_for
from nagjax.model.mod import MoDPolicy

FORMATS = ("hf",)


def export_workdir(workdir: str | pathlib.Path, out: str | pathlib.Path, fmt: str = "hf",
                   step: int | None = None) -> dict:
    """Write the export of `workdir`'s checkpoint (latest, or `step`) to `out`; returns config."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format: got {fmt!r}; expected one of {', '.join(FORMATS)}")
    run = load_run(workdir, step)
    cfg = run.config.model
    config, tensors = exporter_for(cfg.residual)(cfg, numpy_tree(run.params))
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = run_tokenizer(run.config.data, workdir)
    config.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                  max_position_embeddings=run.config.data.seq_len,
                  nagjax={"step": run.step, "residual": cfg.residual, "name": run.config.name,
                          "mod_rate": run.config.mod.rate, "block_ids": cfg.block_index_list})
    config.update(mod_config(run))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if config["model_type"] == "nagjax":
        here = pathlib.Path(__file__).resolve().parent
        for name in remote.CODE_FILES:
            shutil.copyfile(here / name, out / name)
    _write_tokenizer(tokenizer, out)
    return config


def mod_config(run) -> dict:
    """config.json's Mixture-of-Depths entries: the trained thresholds [depth][2] (by position in
    the stack) and the routing rules the remote code applies with them, for a run that trained with
    MoD (the model's policy says so); nothing otherwise. `mod_skipping` true: the export routes and
    skips by default (set it false in config.json, or pass mod_skipping=False, for dense)."""
    policy = MoDPolicy.of(run.config.model, run.config.mod)
    tau = policy.trained_thresholds(run.state["aux"])
    if tau is None:
        return {}
    mod = run.config.mod
    return {"mod_thresholds": np.asarray(tau, np.float64).tolist(), "mod_skipping": True,
            "mod_sublayers": mod.sublayers, "mod_exempt_first_blocks": mod.exempt_first_blocks,
            "mod_kv": mod.kv}


def _write_tokenizer(tokenizer, out: pathlib.Path) -> None:
    """The run's tokeniser and the `transformers` config that loads it with AutoTokenizer."""
    shutil.copyfile(tokenizer.path, out / tokenizer.filename)
    if tokenizer.kind == "sentencepiece":
        special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
        config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False,
                  "add_prefix_space": False, "legacy": False, "clean_up_tokenization_spaces": False,
                  "sp_model_kwargs": {}, **special}
    else:
        special = {"eos_token": tokenizer.eos_token}
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                  **special}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
