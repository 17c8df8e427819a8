"""The tokenizer of a GGUF export (lmkit.deploy.gguf): a model's tokenizer as llama.cpp's vocabulary, tokenizing
text as lmkit does, or one line why llama.cpp could not.

It is written as llama.cpp's byte-level BPE (`tokenizer.ggml.model=gpt2`) with the split llama.cpp names
`tokenizer.ggml.pre`, recognised from the tokenizer's pre_tokenizer JSON (`PRE_TOKENIZERS`): GPT-2's ByteLevel (lmkit's
own BPE, GPT-2) -> `gpt-2`, Llama 3's Split regex -> `llama-bpe`, Qwen2's -> `qwen2`, SmolLM2's single digits before
ByteLevel -> `smollm`. Added tokens marked special are CONTROL, other added ones USER_DEFINED, embedding rows past the
tokenizer `[PAD<id>]` UNUSED, as llama.cpp's converter writes them. An imported model's `record.tokens` gives the
start token, the end token (the first of `eos_token_ids`; later ones llama.cpp would not know by their text as eot and
eom) and the chat template; add_bos/add_eos say what the tokenizer's post-processor adds. A tokenizer lmkit trained
states none of these: `<|endoftext|>`, where the vocabulary has one, is both start and end, as in GPT-2.

Refused, one line each: a character vocabulary (llama.cpp's byte-level BPE needs merges: use tokenizer=bpe), a model
without a tokenizer, any other pre-tokenizer or a normalizer (Qwen2's NFC aside, with a warning: llama.cpp does not
normalize), BPE options llama.cpp lacks, a post-processor adding tokens other than the start and end tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from lmkit.errors import LmkitError
from lmkit.inference import InferenceModel

# llama.cpp's tokenizer.ggml.token_type values
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5

# The Hugging Face pre-tokenizers llama.cpp reimplements, as the steps `pre_tokenizer_steps` spells, named as its
# converter writes them (tokenizer.ggml.pre). The converter recognises a tokenizer by hashing how it splits a fixed
# text; lmkit reads the pre_tokenizer JSON instead (no download). The regexes are those of the hub's tokenizer.json
# files, which llama.cpp's src/llama-vocab.cpp quotes beside its own rewrites of them.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")  # digits one by one
PRE_TOKENIZERS = {
    ("ByteLevel",): "gpt-2",  # GPT-2's split inside ByteLevel: lmkit's own BPE, GPT-2
    (f"Split({LLAMA3_SPLIT}, Isolated)", "ByteLevel(use_regex=False)"): "llama-bpe",  # Llama 3
    (f"Split({QWEN2_SPLIT}, Isolated)", "ByteLevel(use_regex=False)"): "qwen2",  # Qwen2, Qwen2.5
    ("Digits(individual_digits=True)", "ByteLevel"): "smollm",  # SmolLM, SmolLM2 (and StarCoder's split)
}
IGNORES_MERGES = ("llama-bpe",)  # llama.cpp takes a whole word found in the vocabulary as one token (ignore_merges)
# Token texts llama.cpp ends generation at whatever the file says (src/llama-vocab.cpp, the oldest list it has had)
LLAMA_CPP_END_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>", "<EOT>")


@dataclass
class Vocabulary:
    """A tokenizer as llama.cpp's `gpt2` (byte-level BPE) tokenizer model spells it, with its special tokens."""

    tokens: list[str]  # in id order, spelled in GPT-2's byte alphabet
    merges: list[str]  # "left right", best first
    types: list[int]
    pre: str = "gpt-2"  # tokenizer.ggml.pre: the split llama.cpp applies before the merges
    bos: int | None = None  # the token that starts a text
    eos: int | None = None  # the token that ends one
    eot: int | None = None  # further end tokens llama.cpp would not know by their text (end of turn, of message)
    eom: int | None = None
    unwritten_ends: list[int] = field(default_factory=list)  # end tokens beyond those three: llama.cpp runs past them
    add_bos: bool = False  # whether the tokenizer's post-processor puts `bos` before every text
    add_eos: bool = False  # and `eos` after it
    chat_template: str | None = None
    notes: list[str] = field(default_factory=list)  # what llama.cpp tokenizes differently, one line each



def vocabulary(model: InferenceModel) -> Vocabulary:
    """The model's tokenizer as llama.cpp's byte-level BPE, tokenizing text exactly as lmkit does, with the start and
    end tokens and chat template of `model.record.tokens`, or one line why not."""
    if not model.has_tokenizer:
        raise LmkitError("format=gguf needs the model's tokenizer (llama.cpp reads text); this model takes token "
                         "ids only")
    tokenizer = model.tokenizer
    if tokenizer.kind == "char":
        # llama.cpp tokenizes bytes through byte-level BPE, which needs a merges list: one character per
        # token has none, gguf writes no empty list, and a merge of its own would need a token (and an
        # embedding row) the model does not have. (A SentencePiece vocabulary might keep one token per
        # character in llama.cpp; transformers' GGUF reader rebuilds those with its own space handling,
        # so it is untried.)
        raise LmkitError("format=gguf writes llama.cpp's byte-level BPE tokenizer; this model has a character "
                         "vocabulary, which it cannot express: train with tokenizer=bpe")
    vocab = _bpe_vocabulary(json.loads(tokenizer.to_json()), model.record.backbone.vocab_size)
    _add_special_tokens(vocab, model.record.tokens, *_framing(tokenizer.tokenizer))
    return vocab


def pre_tokenizer_steps(pre: dict[str, Any] | None) -> tuple[str, ...]:
    """A `tokenizers` pre-tokenizer (its JSON) as the steps that decide where text splits, one string each, to
    match against PRE_TOKENIZERS and to name in a refusal (trim_offsets, which moves offsets only, left out)."""
    if not pre:
        return ()
    kind = pre.get("type")
    if kind == "Sequence":
        return tuple(step for part in pre.get("pretokenizers", []) for step in pre_tokenizer_steps(part))
    if kind == "ByteLevel":
        options = [f"{k}={v}" for k, v, default in (("add_prefix_space", pre.get("add_prefix_space", False), False),
                                                    ("use_regex", pre.get("use_regex", True), True)) if v != default]
        return (f"ByteLevel({', '.join(options)})" if options else "ByteLevel",)
    if kind == "Split":
        pattern = pre.get("pattern") or {}
        spelled = pattern["Regex"] if "Regex" in pattern else json.dumps(pattern.get("String"))
        return (f"Split({spelled}, {pre.get('behavior')}{', invert=True' if pre.get('invert') else ''})",)
    if kind == "Digits":
        return (f"Digits(individual_digits={pre.get('individual_digits', False)})",)
    return (kind or json.dumps(pre),)


def _bpe_vocabulary(spec: dict[str, Any], vocab_size: int) -> Vocabulary:
    """A `tokenizers` byte-level BPE (lmkit's, GPT-2's, Llama 3's, Qwen2's, SmolLM2's) as llama.cpp's `gpt2`
    tokenizer model with the split PRE_TOKENIZERS names."""
    bpe = spec.get("model") or {}
    if bpe.get("type") != "BPE":
        raise LmkitError(f"format=gguf writes llama.cpp's byte-level BPE; this tokenizer's model is "
                         f"{bpe.get('type')!r}")
    steps = pre_tokenizer_steps(spec.get("pre_tokenizer"))
    pre = PRE_TOKENIZERS.get(steps)
    if pre is None:
        raise LmkitError(f"format=gguf writes the byte-level splits llama.cpp names gpt-2 (GPT-2, lmkit), llama-bpe "
                         f"(Llama 3), qwen2 (Qwen2) and smollm (SmolLM2); this tokenizer splits with "
                         f"{' + '.join(steps) or 'no pre-tokenizer'}")
    options = [k for k in ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "byte_fallback") if bpe.get(k)]
    if options:
        raise LmkitError(f"format=gguf: this tokenizer's BPE sets {options[0]}={bpe[options[0]]!r}, which llama.cpp "
                         f"lacks")
    if bool(bpe.get("ignore_merges")) != (pre in IGNORES_MERGES):
        raise LmkitError(f"format=gguf: this tokenizer's BPE has ignore_merges={bool(bpe.get('ignore_merges'))}, but "
                         f"llama.cpp's {pre} split always runs with ignore_merges={pre in IGNORES_MERGES}")
    vocab = Vocabulary(*_token_list(spec, vocab_size), pre=pre)
    normalizer = (spec.get("normalizer") or {}).get("type")
    if normalizer == "NFC":  # Qwen2's: the identity on text already in NFC, which most text is
        vocab.notes.append("the tokenizer NFC-normalizes text and llama.cpp does not: text not in NFC (decomposed "
                           "accents, for one) encodes to other ids")
    elif normalizer is not None:
        raise LmkitError(f"format=gguf: llama.cpp's byte-level BPE normalizes nothing; this tokenizer has a "
                         f"{normalizer} normalizer")
    return vocab


def _token_list(spec: dict[str, Any], vocab_size: int) -> tuple[list[str], list[str], list[int]]:
    """(tokens, merges, types) in id order over the model's vocab_size rows: added tokens marked special as CONTROL
    and other added ones as USER_DEFINED, ids the tokenizer leaves unused as `[PAD<id>]` UNUSED (both as llama.cpp's
    converter does: Qwen2.5's embedding has more rows than its tokenizer has tokens)."""
    bpe = spec["model"]
    ids = {**bpe["vocab"], **{t["content"]: t["id"] for t in spec.get("added_tokens", [])}}
    if max(ids.values()) >= vocab_size:
        raise LmkitError(f"format=gguf: the tokenizer has id {max(ids.values())}, past the model's {vocab_size} "
                         f"embedding rows")
    by_id = {i: t for t, i in ids.items()}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    special = {t["content"]: bool(t.get("special")) for t in spec.get("added_tokens", [])}
    types = [UNUSED if i not in by_id else NORMAL if t not in special else CONTROL if special[t] else USER_DEFINED
             for i, t in enumerate(tokens)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges", [])]
    return tokens, merges, types


def _framing(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids a `tokenizers.Tokenizer`'s post-processor puts before and after every text (lmkit's encode adds
    them)."""
    bare = tokenizer.encode("a", add_special_tokens=False).ids
    full = tokenizer.encode("a").ids
    at = next(i for i in range(len(full) - len(bare) + 1) if full[i:i + len(bare)] == bare)
    return full[:at], full[at + len(bare):]


def _add_special_tokens(vocab: Vocabulary, tokens: dict[str, Any], before: list[int], after: list[int]) -> None:
    """Fill `vocab`'s start, end and chat-template fields from a model's `record.tokens` (see lmkit.record.TOKENS)
    and what its post-processor adds, or one line why llama.cpp could not add the same."""
    if not tokens:  # a tokenizer lmkit trained states nothing; GPT-2's vocabulary ends texts with <|endoftext|>
        vocab.bos = vocab.eos = vocab.tokens.index("<|endoftext|>") if "<|endoftext|>" in vocab.tokens else None
    else:
        vocab.bos = tokens.get("bos_token_id")
        ends = tokens.get("eos_token_ids") or []
        vocab.eos = ends[0] if ends else None
        # llama.cpp stops at eos, eot, eom and at tokens it knows by their text: the others take eot and eom
        unknown = [i for i in ends[1:] if vocab.tokens[i] not in LLAMA_CPP_END_TEXTS]
        vocab.eot, vocab.eom = (unknown + [None, None])[:2]
        vocab.unwritten_ends = unknown[2:]
        vocab.chat_template = tokens.get("chat_template")
    for where, added, token, key in (("before", before, vocab.bos, "bos_token_id"),
                                     ("after", after, vocab.eos, "eos_token_ids[0]")):
        if added and added != [token]:
            raise LmkitError(f"format=gguf: the tokenizer's post-processor puts ids {added} {where} every text, and "
                             f"llama.cpp can add only the model's {key} ({token}) there")
    vocab.add_bos, vocab.add_eos = bool(before), bool(after)



def write_vocabulary(writer: Any, vocab: Vocabulary) -> None:
    """The tokenizer's keys, as llama.cpp's converter writes them (gguf-py's SpecialVocab)."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    for token, add in ((vocab.bos, writer.add_bos_token_id), (vocab.eos, writer.add_eos_token_id),
                       (vocab.eot, writer.add_eot_token_id), (vocab.eom, writer.add_eom_token_id)):
        if token is not None:
            add(token)
    # always written: llama.cpp's llama-bpe split would otherwise add a start token on its own
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template is not None:
        writer.add_chat_template(vocab.chat_template)

