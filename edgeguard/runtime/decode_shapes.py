"""How a decode is cut into llama.cpp calls so that a token's numbers never depend on what shares
its call (the batch-invariance contract: docs/performance.md).

llama.cpp 0.3.36's CPU backend picks its matrix kernels by the number of tokens in each
``llama_decode`` call, and the kernels round differently (each gives a token the same numbers
whatever else shares its call, as long as the kernel is the same):

- K-quant weights (Q4_K, Q5_K, Q6_K, ...: q4_k_m) times 8 or more tokens take a tiled kernel,
  times fewer a per-row one (``ggml_tiled_min_batch``, ggml-cpu/tiled/tiled.cpp);
- F16, BF16, Q8_0, Q4_0, Q5_0 and IQ4_NL weights times one token take ggml's dot product, times
  two or more llamafile's sgemm (``llamafile_sgemm``: ``n < 2``; on ARM F16 from 8);
- repacked weights (``repack=True``) take a 4-token kernel for each whole group of 4 tokens and a
  one-token kernel for the rest (``forward_mul_mat_one_chunk``, ggml-cpu/repack.cpp);
- in logits mode the vocabulary product multiplies only the output rows, so the same holds for
  the number of output rows.

Flash attention has three kernels chosen by shape when keys and values are both f16; the backend
keeps an f16 cache's keys in bf16 on the CPU, for which llama.cpp always takes the one that
computes each query token on its own, over its own sequence's cells in order.

So every call is one of two kinds, chosen by what is decoded and never by load:

- *wide*, for inputs known whole (Gen's conversations, Stream's prompts): at least ``WIDE_MIN``
  tokens, a multiple of 4 with repacked weights (padding tokens in a spare sequence, removed
  after the call, make up the rest), and in logits mode 2 to ``Rules.narrow_max`` output rows;
- *narrow*, for tokens that arrive as they are generated (Stream's responses, grouped by timing):
  at most ``Rules.narrow_max`` tokens, and at least 2 (a lone token gets a padding token) when
  the model has weights whose kernel changes between one token and two.

A wide input is then decoded by the fast many-token kernels while a streamed token gets the
numbers it would get alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

WIDE_MIN = 8  # llama.cpp's tiled K-quant kernel from 8 tokens up
# ggml types whose product with one token takes another kernel than with two (llamafile's sgemm)
ONE_TOKEN_TYPES = frozenset({"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q5_0", "IQ4_NL"})
# llama.cpp's switches for the tiled kernel (read once per process): off, every call takes the
# per-row kernel; forced, the tiled one. Either way each kind of call stays invariant; a saved
# prefix records them, since its numbers depend on them.
SWITCHES = ("GGML_CPU_TILED_MM", "GGML_CPU_TILED_MM_FORCE")


@dataclass(frozen=True)
class Rules:
    """Call sizes for one model and kernel placement."""

    narrow_min: int = 1  # 2 where a lone token would take another kernel
    narrow_max: int = WIDE_MIN - 1  # 3 with repacked weights
    wide_step: int = 1  # 4 with repacked weights

    @property
    def spare_cells(self) -> int:
        """The most padding tokens one call can add."""
        return max(WIDE_MIN, self.wide_step, self.narrow_min) - 1


def rules_for(weight_types: Iterable[str], *, repacked: bool) -> Rules:
    """The rules for a model whose matrix weights (the vocabulary's aside) have these ggml types."""
    one_token = any(t.upper() in ONE_TOKEN_TYPES for t in weight_types)
    return Rules(narrow_min=2 if one_token else 1, narrow_max=3 if repacked else WIDE_MIN - 1,
                 wide_step=4 if repacked else 1)


@dataclass(frozen=True)
class Piece:
    """One llama.cpp call: inputs ``start:stop`` of the flattened decode, ``pad`` padding tokens
    after them, and ``extra_output``: a row of the call (index into it) to output besides the
    wanted ones (-1: none)."""

    start: int
    stop: int
    pad: int = 0
    extra_output: int = -1

    @property
    def size(self) -> int:
        return self.stop - self.start + self.pad


def _equal(start: int, stop: int, cap: int) -> list[tuple[int, int]]:
    """``start:stop`` in the fewest pieces of at most ``cap``, of equal sizes (65 as 33 + 32)."""
    total = stop - start
    n = -(-total // cap)
    bounds = [start + total * i // n for i in range(n + 1)]
    return list(zip(bounds, bounds[1:]))


def plan(total: int, outputs: Sequence[bool] | None, *, wide: bool, n_batch: int,
         rules: Rules = Rules()) -> list[Piece]:
    """The calls that decode ``total`` flattened inputs. ``outputs``: per input whether its
    vocabulary row is read (logits mode), None in embeddings mode (every row is output)."""
    if total <= 0:
        return []
    out_max = rules.narrow_max
    step = rules.wide_step
    fits_wide = n_batch >= max(WIDE_MIN, step)  # a smaller batch never reaches the wide kernels
    if not wide:
        spans = _equal(0, total, min(rules.narrow_max, n_batch))
    else:
        cap = n_batch - n_batch % step if fits_wide else n_batch
        segments, start, seen = [], 0, 0
        if outputs is not None:
            for i, out in enumerate(outputs[:total]):
                seen += bool(out)
                if seen == out_max and i + 1 < total:
                    segments.append((start, i + 1))
                    start, seen = i + 1, 0
        segments.append((start, total))
        spans = [span for a, b in segments for span in _equal(a, b, cap)]
    pieces = []
    for a, b in spans:
        m = b - a
        if wide:
            size = max(WIDE_MIN, -(-m // step) * step) if fits_wide else m
        else:
            size = max(m, min(rules.narrow_min, n_batch))
        extra = -1
        if outputs is not None and sum(bool(o) for o in outputs[a:b]) == 1 and size > 1:
            extra = 1 if outputs[a] else 0
        pieces.append(Piece(a, b, size - m, extra))
    return pieces
