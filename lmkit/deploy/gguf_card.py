"""The README.md beside a GGUF export (lmkit.deploy.gguf): what the file holds, what llama.cpp does differently,
and how llama.cpp and transformers load it.
"""

from __future__ import annotations

import json

from lmkit.deploy.gguf_vocab import Vocabulary
from lmkit.inference import InferenceModel

# Measured with llama-cpp-python 0.3.16 on an Intel Xeon with AMX, which repacks Q4_0/Q4_1/Q8_0 matrices into its AMX
# buffer by default: Q8_0 right, Q4_0 and Q4_1 logits off by 40-100% of their norm (any file, lmkit's or gguf-py's
# quantization of the float model); right once the model loads without extra buffer types.
AMX_NOTE = ("llama.cpp's AMX kernels (Intel Xeon with AMX) have computed Q4_0 and Q4_1 wrongly "
            "(ggml-org/llama.cpp#16315; measured with llama-cpp-python 0.3.16): there, load the model with "
            "use_extra_bufts=false (llama_model_params)")


def model_card(model: InferenceModel, architecture: str, type: str, size: int, vocab: Vocabulary,
               gelu_note: str, grid_note: str = "") -> str:
    """README.md: the file, the model's shape and tokens, what runs differently in llama.cpp (the notes), and how
    llama.cpp and transformers load it."""
    record = model.record
    shape = ", ".join(f"{k}={v}" for k, v in record.model_settings.items() if k != "kind")
    notes = "".join(f"\n- {note}" for note in [grid_note, *vocab.notes, gelu_note] if note)
    if type in ("q4_0", "q4_1"):
        notes += f"\n- {AMX_NOTE}"
    cfg = record.backbone
    # transformers' GGUF reader maps gpt2's context_length and feed_forward_length to keys GPT2Config
    # does not read, so those two must be given (its defaults are 1024 and 4 * n_embd).
    hf_options = f", n_positions={cfg.max_seq_len}, n_inner={cfg.ffn(0)}" if architecture == "gpt2" else ""
    hf_load = f"model = AutoModelForCausalLM.from_pretrained(\"DIR\", gguf_file=\"model.gguf\"{hf_options})\n"
    if cfg.rope_scaling is not None:
        # llama.cpp reads the scaling from the file; transformers' GGUF reader drops it and would run unscaled
        notes += (f"\n- rope scaling `{cfg.rope_scaling['rope_type']}`: llama.cpp reads it from the file; "
                  "transformers' GGUF reader drops it, so set it back on the config (below)")
        hf_load = ("config = AutoConfig.from_pretrained(\"DIR\", gguf_file=\"model.gguf\")\n"
                   f"config.rope_parameters = {{**config.rope_parameters, **{cfg.rope_scaling!r}}}\n"
                   "model = AutoModelForCausalLM.from_pretrained(\"DIR\", gguf_file=\"model.gguf\", config=config)\n")
    return (f"# lmkit {record.kind} language model (GGUF, llama.cpp)\n\n"
            f"- file: model.gguf, {size:,} bytes, {type}\n- llama.cpp architecture: `{architecture}`\n"
            f"- shape: {shape}\n- tokenizer: {record.tokenizer}, as byte-level BPE ({len(vocab.tokens)} tokens, "
            f"{len(vocab.merges)} merges, split `{vocab.pre}`)\n{_token_lines(vocab)}{notes}\n"
            f"- trained on: {json.dumps(record.data)}\n- source: {json.dumps(record.source)}\n\n"
            "The lmkit record (config.json's content) is in the file's metadata as `lmkit.record`.\n\n"
            "## Use\n\n```python\nfrom llama_cpp import Llama\n\nllm = Llama(\"model.gguf\")\n"
            "print(llm(\"ROMEO:\", max_tokens=200, temperature=0.8, top_k=50)[\"choices\"][0][\"text\"])\n```\n\n"
            "```python\nfrom transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer\n\n"
            f"{hf_load}"
            "tokenizer = AutoTokenizer.from_pretrained(\"DIR\", gguf_file=\"model.gguf\")\n```\n")


def _token_lines(vocab: Vocabulary) -> str:
    """The model card's lines on the start and end tokens and the chat template."""
    def named(token: int | None) -> str:
        return f"`{vocab.tokens[token]}` (id {token})"

    if vocab.eos is None:
        end = ("none known: llama.cpp then takes id 11 "
               f"(`{vocab.tokens[11] if len(vocab.tokens) > 11 else '?'}`) as one; pass `--ignore-eos` (llama.cpp's "
               "tools) or stop by length")
    else:
        also = [named(t) for t in (vocab.eot, vocab.eom) if t is not None]
        end = named(vocab.eos) + (f", also {' and '.join(also)} (as eot/eom)" if also else "")
        if vocab.unwritten_ends:
            end += f"; llama.cpp has no key for the model's other end tokens {vocab.unwritten_ends}"
    start = "none" if vocab.bos is None else named(vocab.bos) + (", added before every text" if vocab.add_bos else "")
    template = "the model's own (`tokenizer.chat_template`)" if vocab.chat_template else "none"
    return f"- start of text: {start}\n- end of text: {end}\n- chat template: {template}"
