"""Model export (`nagjax export`): a trained workdir as a Hugging Face `transformers` folder.

hf.py writes the folder (safetensors weights, config.json, tokenizer); each residual scheme's
registry entry names how its weights map (`Scheme.hf_export`): Pre-LN and LNS as
`LlamaForCausalLM` (llama.py), NAG and AttnRes with nagjax's own PyTorch modelling code loaded
through `trust_remote_code` (remote.py, modeling_nagjax.py). No torch is needed to export.
"""
