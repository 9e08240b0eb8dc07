"""The trained tiny Qwen3Guard fixtures give the verdicts their synthetic data set teaches,
checked with the PyTorch oracle on the saved bf16 checkpoints (no llama.cpp here)."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from tests.fixtures.oracle import load_torch, next_token_logits, stream_logits
from tests.fixtures.trained import (
    GEN_EXAMPLES,
    STREAM_EXAMPLES,
    STREAM_PROMPT_CATEGORY,
    gen_target_text,
    gen_train_sample,
    stream_encode,
    trained_gen_checkpoint,
    trained_stream_checkpoint,
)

LABELS = ["Safe", "Unsafe", "Controversial"]
GEN_CATEGORIES = ["Violent", "Non-violent Illegal Acts", "Sexual Content or Sexual Acts", "PII",
                  "Suicide & Self-Harm", "Unethical Acts", "Politically Sensitive Topics",
                  "Copyright Violation", "Jailbreak", "None"]


@pytest.fixture(scope="module")
def gen():
    ckpt = trained_gen_checkpoint()
    info = json.loads((ckpt / "training.json").read_text())
    print(f"\ngen training: {info}")
    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    return ckpt, tok, load_torch(ckpt)


@pytest.fixture(scope="module")
def stream():
    ckpt = trained_stream_checkpoint()
    info = json.loads((ckpt / "training.json").read_text())
    print(f"\nstream training: {info}")
    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    return ckpt, tok, load_torch(ckpt)


def _first_tokens(tok, names):
    ids = [tok.encode(" " + n, add_special_tokens=False)[0] for n in names]
    assert len(set(ids)) == len(ids)
    return ids


def _readout(model, tok, ids, names):
    """Restricted next-token argmax over the first tokens of ' <name>'."""
    logits = next_token_logits(model, ids)[-1]
    cand = _first_tokens(tok, names)
    return names[int(np.argmax(logits[cand]))]


def test_trained_checkpoints_have_the_fixture_layout():
    from tests.fixtures.checkpoints import build_checkpoint
    from tests.fixtures.trained import BASE_SHAPE

    for kind, ckpt in (("gen", trained_gen_checkpoint()), ("stream", trained_stream_checkpoint())):
        base = build_checkpoint(kind, **BASE_SHAPE, seed=7 if kind == "gen" else 8)
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            assert (ckpt / name).read_bytes() == (base / name).read_bytes(), name
        from safetensors import safe_open

        with safe_open(str(ckpt / "model.safetensors"), "pt") as a, \
                safe_open(str(base / "model.safetensors"), "pt") as b:
            assert sorted(a.keys()) == sorted(b.keys())
            for k in a.keys():  # noqa: SIM118 (safe_open is not iterable)
                ta, tb = a.get_tensor(k), b.get_tensor(k)
                assert ta.dtype == torch.bfloat16 and ta.shape == tb.shape, k


# The trained model must reproduce its training conversations, and generalize to held-out
# wording.  Training is bit-for-bit reproducible on one machine (tests/fixtures/trained.py);
# measured held-out accuracy 91% (21 of 23, Intel Xeon, torch 2.13 CPU).  Another CPU may round
# differently and land elsewhere, so the floor leaves room for two more misses.
GEN_MIN_TRAIN_ACCURACY = 0.9
GEN_MIN_HELDOUT_ACCURACY = 0.8


def oracle_verdict(model, tok, messages):
    """(label, category, refusal) by the restricted read-outs, the way edgeguard scores."""
    ids = tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False).input_ids
    label = _readout(model, tok, ids + tok.encode("Safety:", add_special_tokens=False), LABELS)
    names = GEN_CATEGORIES if len(messages) == 1 else [c for c in GEN_CATEGORIES if c != "Jailbreak"]
    cat_ids = tok.encode(f"Safety: {label}\nCategories:", add_special_tokens=False)
    category = _readout(model, tok, ids + cat_ids, names)
    refusal = None
    if len(messages) == 2:
        ref_ids = tok.encode(gen_target_text(label, category) + "\nRefusal:", add_special_tokens=False)
        refusal = _readout(model, tok, ids + ref_ids, ["Yes", "No"])
    return ids, (label, category, refusal)


def test_gen_verdicts_by_readout_and_generation(gen):
    ckpt, tok, model = gen
    train = gen_train_sample(tok)
    scores = {}
    for name, examples in (("training", train), ("held-out", GEN_EXAMPLES)):
        misses = []
        for messages, label, category, refusal in examples:
            ids, got = oracle_verdict(model, tok, messages)
            with torch.no_grad():
                out = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                     eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                                     pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"))
            text = tok.decode(out[0, len(ids):].tolist())
            # greedy generation (the official way) always agrees with the read-outs
            assert text == gen_target_text(*got) + "<|im_end|>", (messages, text, got)
            if got != (label, category, refusal):
                misses.append((messages[-1]["content"], (label, category, refusal), got))
        scores[name] = 1 - len(misses) / len(examples)
        print(f"gen {name} accuracy {scores[name]:.0%}; misses: {misses}")
    assert scores["training"] >= GEN_MIN_TRAIN_ACCURACY
    assert scores["held-out"] >= GEN_MIN_HELDOUT_ACCURACY


def test_stream_heldout_prompt_and_response_verdicts(stream):
    ckpt, tok, model = stream
    cfg = json.loads((ckpt / "config.json").read_text())
    risk_names = cfg["response_risk_level_map"]
    qcat_names = cfg["query_category_map"]
    rcat_names = cfg["response_category_map"]
    for prompt, response, prompt_label, span_start in STREAM_EXAMPLES:
        ids, q_pos, r0, offsets = stream_encode(tok, prompt, response)
        lg = stream_logits(model, ids)
        q = int(lg["query_risk"][q_pos].argmax())
        assert risk_names[str(q)] == prompt_label, prompt
        if prompt_label != "Safe":
            qc = int(lg["query_category"][q_pos].argmax())
            assert qcat_names[str(qc)] == STREAM_PROMPT_CATEGORY[prompt], prompt
        unsafe = [risk_names[str(int(r))] == "Unsafe"
                  for r in lg["response_risk"][r0:r0 + len(offsets)].argmax(-1)]
        pairs = [j for j in range(1, len(unsafe)) if unsafe[j - 1] and unsafe[j]]
        if span_start is None:
            assert not pairs, (response, pairs)
            continue
        assert pairs, response
        first = pairs[0]
        assert offsets[first - 1][1] > span_start, (response, first)
        cat = int(lg["response_category"][r0 + first].argmax())
        assert rcat_names[str(cat)] == "Violent", response


_TRAIN_AND_HASH = """
import hashlib, sys
sys.path.insert(0, {root!r})
from tests.fixtures.trained import train_into
print(hashlib.sha256(train_into({kind!r}, {folder!r}, {steps}).read_bytes()).hexdigest())
"""


@pytest.mark.parametrize("kind, steps", [("gen", 8), ("stream", 4)])
def test_training_is_bit_for_bit_reproducible(kind, steps, tmp_path):
    """Two fresh processes train the same weights, byte for byte (a few steps suffice: any
    run-to-run difference in a product's summation order shows in the first update)."""
    root = str(Path(__file__).resolve().parents[1])
    procs = [subprocess.Popen([sys.executable, "-c", _TRAIN_AND_HASH.format(
        root=root, kind=kind, folder=str(tmp_path / f"run{i}"), steps=steps)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    hashes = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
        hashes.append(out.split()[-1])
    assert hashes[0] == hashes[1]
    weights = (tmp_path / "run0" / "model.safetensors").read_bytes()
    assert hashlib.sha256(weights).hexdigest() == hashes[0]


def test_training_settings_are_restored():
    from tests.fixtures.trained import _deterministic

    threads = torch.get_num_threads()
    with _deterministic():
        assert torch.get_num_threads() == 1 and torch.are_deterministic_algorithms_enabled()
    assert torch.get_num_threads() == threads and not torch.are_deterministic_algorithms_enabled()
