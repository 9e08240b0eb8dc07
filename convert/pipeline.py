"""The conversion pipeline: checkpoint folder -> GGUF per quant (+ ONNX heads) + manifest.

Everything is written into a staging folder beside the output and moved into place only when
complete, so an interrupted or failed conversion never leaves a model that looks valid.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeguard.errors import ConversionError
from edgeguard.models.manifest import MANIFEST_NAME, Manifest, file_entry
from edgeguard_convert.checkpoint import Checkpoint, load_checkpoint
from edgeguard_convert.gguf_out import write_model_gguf, write_vocab_gguf
from edgeguard_convert.heads_onnx import write_heads_onnx
from edgeguard_convert.quantize import DEFAULT_QUANTS, quantize
from edgeguard_convert.tokenizer import read_tokenizer

GEN_LABELS = {
    "risk_level": ["Safe", "Unsafe", "Controversial"],
    "category": [
        "Violent",
        "Non-violent Illegal Acts",
        "Sexual Content or Sexual Acts",
        "PII",
        "Suicide & Self-Harm",
        "Unethical Acts",
        "Politically Sensitive Topics",
        "Copyright Violation",
        "Jailbreak",
    ],
    "refusal": ["Yes", "No"],
}


@dataclass(frozen=True)
class ConvertOptions:
    quants: tuple[str, ...] = DEFAULT_QUANTS
    name: str | None = None  # file stem; default from the source
    context: int | None = None  # default: the checkpoint's max_position_embeddings
    source: dict | None = None  # recorded in the manifest (repo, revision); default: the folder
    threads: int | None = None
    show_progress: bool = False  # bars (tensors written, tensors quantized) on stderr


def default_name(src: Path, ckpt: Checkpoint) -> str:
    return src.resolve().name.lower().replace(" ", "-") or f"qwen3guard-{ckpt.kind}"


def _master_suffix(master: str) -> str:
    return master.lower()


def _write_embeddings(ckpt: Checkpoint, path: Path) -> None:
    """The input-embedding table for the Stream runtime, f16 rows, memory-mappable .npy."""
    table = ckpt.tensors["model.embed_tokens.weight"].load_f32()
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=table.shape)
    step = 8192
    for start in range(0, table.shape[0], step):
        out[start : start + step] = table[start : start + step]
    out.flush()
    del out


def _stage(out: Path) -> Path:
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=parent))
    except OSError as e:
        raise ConversionError(f"cannot write to {out}: {e.strerror or e}") from e


def _publish(stage: Path, out: Path) -> None:
    """Move the finished staging folder to ``out``, replacing an earlier conversion only."""
    if out.exists():
        if not out.is_dir():
            raise ConversionError(f"cannot write to {out}: it exists and is not a folder")
        entries = list(out.iterdir())
        if entries and not (out / MANIFEST_NAME).exists():
            raise ConversionError(f"{out} is not empty and holds no edgeguard model: refusing to overwrite it")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(stage, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(stage, out)


def convert(
    src: Path, out: Path, options: ConvertOptions = ConvertOptions(), progress: Callable[[str], None] = lambda m: None
) -> Manifest:
    src, out = Path(src), Path(out)
    progress(f"reading {src}")
    ckpt = load_checkpoint(src)
    tok = read_tokenizer(src, ckpt.hyper.vocab)
    name = options.name or default_name(src, ckpt)
    context = options.context or ckpt.hyper.context
    if out.exists() and not out.is_dir():
        raise ConversionError(f"cannot write to {out}: it exists and is not a folder")
    stage = _stage(out)
    try:
        files = _convert_into(stage, ckpt, tok, name, context, options, progress)
        manifest = Manifest(
            name=name,
            kind=ckpt.kind,
            architecture=ckpt.architecture,
            source=options.source or {"path": str(src.resolve())},
            context_length=context,
            hidden_size=ckpt.hyper.hidden,
            quants=options.quants,
            labels=ckpt.labels if ckpt.kind == "stream" else GEN_LABELS,
            files=files,
        )
        manifest.write(stage)
        _publish(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    progress(f"wrote {out}")
    return manifest


def _convert_into(stage, ckpt, tok, name, context, options, progress) -> dict:
    files: dict[str, dict] = {}
    stream = ckpt.kind == "stream"
    master_path = stage / f".{name}-master.gguf"
    progress("writing lossless GGUF" + (" backbone" if stream else ""))
    master = write_model_gguf(ckpt, None if stream else tok, master_path, name=name, context=context,
                              show_progress=options.show_progress)
    lossless = _master_suffix(master)
    for quant in sorted(options.quants, key=lambda q: q == lossless):
        path = stage / f"{name}-{quant}.gguf"
        if quant == lossless:
            os.replace(master_path, path)
        else:
            progress(f"quantizing to {quant}")
            quantize(master_path, path, quant, threads=options.threads, show_progress=options.show_progress)
        files[path.name] = file_entry(path, role="model", quant=quant)
    master_path.unlink(missing_ok=True)
    if stream:
        vocab = stage / f"{name}-vocab.gguf"
        write_vocab_gguf(ckpt, tok, vocab, name=name, context=context)
        files[vocab.name] = file_entry(vocab, role="vocab")
        progress("writing embedding table")
        embd = stage / f"{name}-embeddings-f16.npy"
        _write_embeddings(ckpt, embd)
        files[embd.name] = file_entry(embd, role="embeddings")
        progress("exporting heads to ONNX")
        heads = stage / "heads.onnx"
        write_heads_onnx(ckpt, heads)
        files[heads.name] = file_entry(heads, role="heads")
    return files
