"""Model export and import (`nagjax export`, `nagjax import`): a trained workdir as a Hugging Face
`transformers` folder, and such a folder (a Llama, or an export) back as a workdir (hf_import.py).

hf.py writes the folder (safetensors weights, config.json, tokenizer); each residual scheme has an
exporter registered here (registry.py) that says how its weights map: Pre-LN and LNS as
`LlamaForCausalLM` (llama.py), NAG and AttnRes with nagjax's own PyTorch modelling code loaded
through `trust_remote_code` (remote.py, modeling_nagjax.py). No torch is needed to export.
"""

from nagjax.export import llama, remote  # noqa: F401  (register their schemes' exporters)
