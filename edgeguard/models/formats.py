"""Facts the converter and the runtime share, written once: quant names, the files a
checkpoint conversion needs, and the names of the Stream heads' ONNX graph."""

from __future__ import annotations

# quant name -> llama_ftype (llama.h): what `--quant` accepts everywhere
QUANT_FTYPES = {
    "f32": 0,
    "f16": 1,
    "q4_0": 2,
    "q8_0": 7,
    "q5_0": 8,
    "q4_k_s": 14,
    "q4_k_m": 15,
    "q5_k_m": 17,
    "q6_k": 18,
    "bf16": 32,
}
QUANTS = tuple(QUANT_FTYPES)
DEFAULT_QUANTS = ("f16", "q8_0", "q4_k_m")  # what `edgeguard convert` writes by default
LOAD_PREFERENCE = ("q4_k_m", "q8_0", "f16", "bf16")  # which quant a folder loads without --quant

CHECKPOINT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")  # conversion reads these

HEADS_INPUT = "hidden_states"
HEADS_OUTPUTS = ("response_risk", "response_category", "query_risk", "query_category")
