"""Writing a checkpoint's backbone and tokenizer as a GGUF file that llama.cpp loads as qwen3.

Tensors are streamed one at a time (memory stays near one tensor), in the source precision:
bf16 bits are copied as they are, 1-D norms go to f32 as llama.cpp expects.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType

from edgeguard.progress import bar
from edgeguard_convert.checkpoint import Checkpoint
from edgeguard_convert.tokenizer import TokenizerData

ARCH = "qwen3"
_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_MASTER_TYPES = {
    "BF16": (GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16),
    "F16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "F32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
}
# The backbone-only GGUF (Stream) keeps a few placeholder tokens: llama.cpp needs a
# vocabulary, and the tied output projection over it then costs nothing.
DUMMY_VOCAB = 8


def gguf_tensor_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    prefix, _, rest = hf_name.partition(".layers.")
    layer, _, sub = rest.partition(".")
    return f"blk.{int(layer)}.{_LAYER_NAMES[sub.removesuffix('.weight')]}.weight"


def master_dtype(ckpt: Checkpoint) -> str:
    """The lossless GGUF type for the checkpoint's matrices: its own storage type."""
    dtypes = {r.dtype for r in ckpt.tensors.values() if len(r.shape) == 2}
    return "F32" if "F32" in dtypes else ("BF16" if "BF16" in dtypes else "F16")


def _add_hparams(w: GGUFWriter, ckpt: Checkpoint, name: str, context: int) -> None:
    h = ckpt.hyper
    w.add_name(name)
    w.add_context_length(context)
    w.add_embedding_length(h.hidden)
    w.add_block_count(h.layers)
    w.add_feed_forward_length(h.ffn)
    w.add_head_count(h.heads)
    w.add_head_count_kv(h.kv_heads)
    w.add_key_length(h.head_dim)
    w.add_value_length(h.head_dim)
    w.add_layer_norm_rms_eps(h.rms_eps)
    w.add_rope_freq_base(h.rope_theta)
    w.add_string("edgeguard.kind", ckpt.kind)


def _add_tokenizer(w: GGUFWriter, tok: TokenizerData) -> None:
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tok.tokens)
    w.add_token_types(tok.types)
    w.add_token_merges(tok.merges)
    w.add_eos_token_id(tok.eos_id)
    if tok.pad_id is not None:
        w.add_pad_token_id(tok.pad_id)
    if tok.bos_id is not None:
        w.add_bos_token_id(tok.bos_id)
    w.add_add_bos_token(False)
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)


def _add_dummy_tokenizer(w: GGUFWriter) -> None:
    # "none": llama.cpp loads no tokenizer; the row count then comes from {arch}.vocab_size.
    w.add_tokenizer_model("none")
    w.add_vocab_size(DUMMY_VOCAB)


def _tensor_plan(ckpt: Checkpoint, dummy_vocab: bool) -> list[tuple[str, str | None]]:
    """(gguf name, hf name or None for the dummy embedding) in writing order."""
    plan = [("token_embd.weight", None if dummy_vocab else "model.embed_tokens.weight")]
    for i in range(ckpt.hyper.layers):
        for sub in _LAYER_NAMES:
            hf = f"model.layers.{i}.{sub}.weight"
            plan.append((gguf_tensor_name(hf), hf))
    plan.append(("output_norm.weight", "model.norm.weight"))
    if ckpt.has_lm_head and not dummy_vocab:
        plan.append(("output.weight", "lm_head.weight"))
    return plan


_NP_DTYPES = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32}


def _tensor_spec(ckpt: Checkpoint, hf_name: str | None, master: str):
    """(shape, numpy dtype, GGUF type) of one planned tensor."""
    if hf_name is None:
        return (DUMMY_VOCAB, ckpt.hyper.hidden), np.dtype(np.float32), GGMLQuantizationType.F32
    shape = ckpt.tensors[hf_name].shape
    if len(shape) == 1:
        return shape, np.dtype(np.float32), GGMLQuantizationType.F32
    return shape, np.dtype(_NP_DTYPES[master]), _MASTER_TYPES[master][0]


def _tensor_data(ckpt: Checkpoint, hf_name: str | None, master: str) -> np.ndarray:
    if hf_name is None:
        return np.zeros((DUMMY_VOCAB, ckpt.hyper.hidden), dtype=np.float32)
    rec = ckpt.tensors[hf_name]
    if len(rec.shape) == 2 and rec.dtype == master:
        return np.ascontiguousarray(rec.load_raw())
    _, np_dtype, _ = _tensor_spec(ckpt, hf_name, master)
    return np.ascontiguousarray(rec.load_f32().astype(np_dtype))


def write_model_gguf(
    ckpt: Checkpoint,
    tok: TokenizerData | None,
    path: Path,
    *,
    name: str,
    context: int,
    show_progress: bool = False,
) -> str:
    """Write the lossless GGUF; ``tok=None`` writes the Stream backbone with a dummy vocabulary.
    ``show_progress``: a bar of the tensors written on stderr.

    Returns the master dtype name ("BF16", "F16" or "F32").
    """
    master = master_dtype(ckpt)
    dummy = tok is None
    w = GGUFWriter(path, ARCH)
    _add_hparams(w, ckpt, name, context)
    w.add_file_type(int(_MASTER_TYPES[master][1]))
    if dummy:
        _add_dummy_tokenizer(w)
    else:
        _add_tokenizer(w, tok)
    plan = _tensor_plan(ckpt, dummy)
    for gguf_name, hf_name in plan:
        shape, np_dtype, qtype = _tensor_spec(ckpt, hf_name, master)
        nbytes = int(np.prod(shape)) * np_dtype.itemsize
        w.add_tensor_info(gguf_name, shape, np_dtype, nbytes, raw_dtype=qtype)
    w.write_header_to_file(path)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    with bar(total=len(plan), desc=f"writing {path.name}", unit="tensor", enabled=show_progress) as tensors:
        for gguf_name, hf_name in plan:
            w.write_tensor_data(_tensor_data(ckpt, hf_name, master))
            tensors.update(1)
    w.close()
    return master


def write_vocab_gguf(ckpt: Checkpoint, tok: TokenizerData, path: Path, *, name: str, context: int) -> None:
    """A GGUF with the tokenizer and hyperparameters only, loadable with vocab_only."""
    w = GGUFWriter(path, ARCH)
    _add_hparams(w, ckpt, name, context)
    _add_tokenizer(w, tok)
    w.write_header_to_file(path)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
