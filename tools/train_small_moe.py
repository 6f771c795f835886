#!/usr/bin/env python
"""Train a small Qwen3-MoE causal LM on the Python standard library's own sources.

Why
---
The offloading code in ``moe_offload`` (expert caches, prefetch and eviction
policies) and its tests need a Mixture-of-Experts checkpoint whose *routing was
learned*: with random weights every expert is picked about equally often and
consecutive tokens pick unrelated experts, so cache hit rates, expert
popularity skew and routing locality are all meaningless.  Public MoE
checkpoints are gigabytes; this script produces a ~35 MB one of a real
``transformers`` architecture (``Qwen3MoeForCausalLM``) in a few minutes on one
GPU, from a corpus that exists on every machine without network access: the
``.py`` files of the running interpreter's standard library.

What it does
------------
1. Collects ``*.py`` under ``sysconfig.get_paths()["stdlib"]`` (site-packages
   skipped) and splits them BY FILE into train / held-out (~5%, decided by a
   hash of the relative path, so the split is deterministic).
2. Trains a byte-level BPE tokenizer (``tokenizers``) on the train split and
   saves it as a ``PreTrainedTokenizerFast`` (``AutoTokenizer`` loads it, as
   ``TokenizersBackend`` in transformers 5.x;
   decoding round-trips Python source exactly: whitespace and newlines kept).
   ``<|endoftext|>`` is bos = eos = pad.  The tokenizer adds no special tokens
   by itself; during training every file is followed by ``<|endoftext|>``, so
   prompts work best when prefixed with it (this script does that).
3. Tokenizes every file once, concatenates with ``<|endoftext|>`` separators
   and trains with random fixed-length windows: AdamW, linear warmup + cosine
   decay, bf16 autocast on CUDA, router load-balancing auxiliary loss on
   (per layer, coefficient 0.01, see ``load_balancing_loss``).
   The run lasts ``min(--max-steps, --epochs over the train tokens)`` steps
   and is cut short by the time budget; the LR schedule runs on
   ``max(step / total_steps, elapsed / time budget)``, so the cosine reaches
   its floor exactly when either limit is hit.
4. Reports held-out cross-entropy (nats/token) periodically and at the end,
   next to a unigram baseline (train-split token frequencies, add-one
   smoothing) on the very same held-out targets, plus per-layer expert load.
5. Saves bf16 safetensors + config + generation config + tokenizer +
   ``train_log.json`` into ``--out``, reloads the folder with
   ``AutoModelForCausalLM`` / ``AutoTokenizer`` and prints a greedy
   continuation of ``def fibonacci(n):``.

How to run
----------
Real run (one NVIDIA H200; the whole script takes ~2 minutes with the
defaults, and never more than --time-budget-s)::

    python tools/train_small_moe.py --out moe_offload/assets/small-moe --device cuda

The 128-expert top-8 model (Qwen3-30B-A3B's routing) with the shipped tokenizer, so both models see the same
token ids and the same held-out files; written to the git-ignored ``.models/small-moe-128`` (with it in git the
tree would pass what a GPU machine's call carries).  On one GPU (a few minutes)::

    python tools/train_small_moe.py --preset small-moe-128 --tokenizer moe_offload/assets/small-moe --device cuda

On the 2-core CPU machine (as shipped: one thread, since two threads that the scheduler does not give
both cores wait on each other; ~1k tokens/s, about 40 minutes)::

    OMP_NUM_THREADS=1 nice -n 19 python tools/train_small_moe.py --preset small-moe-128 \
        --tokenizer moe_offload/assets/small-moe --no-tests --device cpu --batch-size 8 --seq-len 256 \
        --lr 2e-3 --warmup-steps 50 --eval-every 400 --eval-batch-size 16 --log-every 25 \
        --time-budget-s 2500 --reserve-s 300 --gen-tokens 32

``--hidden-size``, ``--num-layers``, ``--num-experts``, ``--top-k``, ``--moe-intermediate-size`` (and heads)
override a preset's size.

Smoke run (tiny model, a handful of files, CPU, < 1 minute)::

    python tools/train_small_moe.py --smoke

Useful knobs: ``--time-budget-s`` (whole-script wall clock, default 540),
``--epochs`` (default 7: the corpus is only a few million tokens and the
model overfits it after ~7-10 passes), ``--max-steps``, ``--batch-size``,
``--seq-len``, ``--lr``, ``--compile``.

Note: the corpus is whatever stdlib the interpreter running this script has,
so a different Python version gives a (slightly) different corpus and split.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import tokenizers
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, Qwen3MoeConfig

EOS = "<|endoftext|>"
PROMPT = "def fibonacci(n):"
REPO_ROOT = Path(__file__).resolve().parent.parent
SIZE_LIMIT_BYTES = 40 * 1000 * 1000  # 40 MB for the whole output folder


# --------------------------------------------------------------------------- config


@dataclass
class ModelSize:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    max_position_embeddings: int = 2048


REAL_SIZE = ModelSize(
    vocab_size=8192,
    hidden_size=256,
    num_layers=6,
    num_heads=4,
    num_kv_heads=2,
    num_experts=16,
    top_k=2,
    moe_intermediate_size=192,
)

# Fine-grained routing as Qwen3-30B-A3B's (128 routed experts, top-8), small enough for the repo (~36 MB bf16) and
# for a CPU: narrow experts (moe_intermediate 32) keep the 128 x 8 layers of experts at ~16M parameters.
FINE_SIZE = replace(REAL_SIZE, hidden_size=160, num_layers=8, num_experts=128, top_k=8, moe_intermediate_size=32)

# --preset NAME: the model size, its default output folder and its router_aux_loss_coef (small-moe: 0.01;
# small-moe-128: 0.001, Qwen3-MoE's own value).
PRESETS = {
    "small-moe": (REAL_SIZE, 0.01),
    "small-moe-128": (FINE_SIZE, 0.001),
}
SIZE_FLAGS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "num_experts", "top_k",
              "moe_intermediate_size")

SMOKE_SIZE = ModelSize(
    vocab_size=512,
    hidden_size=64,
    num_layers=4,
    num_heads=2,
    num_kv_heads=1,
    num_experts=16,
    top_k=2,
    moe_intermediate_size=32,
    max_position_embeddings=512,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: moe_offload/assets/small-moe, or /tmp/small-moe-smoke with --smoke)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="tiny model, few files, few steps (CPU, < 60 s)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="small-moe",
                   help="model size, output folder and aux-loss coefficient (default small-moe: 16 experts top-2; "
                        "small-moe-128: 128 experts top-8, Qwen3-30B-A3B's routing)")
    for name in SIZE_FLAGS:
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                       help=f"override the preset's {name}")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="reuse this folder's tokenizer (e.g. moe_offload/assets/small-moe) instead of training one, "
                        "so two models share token ids and are traced on the same tokens")
    p.add_argument("--seed", type=int, default=1234)
    # data / tokenizer
    p.add_argument("--no-tests", action="store_true", help="skip test/tests/idle_test folders of the stdlib")
    p.add_argument("--max-files", type=int, default=None, help="cap on train files (held-out: a tenth of it)")
    p.add_argument("--heldout-per-mille", type=int, default=50, help="share of files held out, per mille")
    p.add_argument("--tokenizer-chars", type=int, default=40_000_000,
                   help="train the BPE on at most this many characters of the train split")
    # optimisation
    p.add_argument("--seq-len", type=int, default=512)
    # Data-limited regime (~2.7M train tokens on a python3.12 without tests): more, smaller steps beat big
    # batches.  Measured on one H200 (8 epochs): batch 64 / lr 2e-3 -> 2.98 nats held-out at ~450k tok/s;
    # batch 16 / lr 1e-3 -> 2.89 (2.79 at 6.2 epochs) at ~120k tok/s.  32 / 1.5e-3 / 7 epochs sits between.
    p.add_argument("--batch-size", type=int, default=32, help="sequences per step")
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=150)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--aux-coef", type=float, default=None,
                   help="router load-balancing loss coefficient (also saved as config.router_aux_loss_coef; "
                        "default: the preset's)")
    p.add_argument("--max-steps", type=int, default=100_000)
    p.add_argument("--epochs", type=float, default=7.0,
                   help="passes over the train tokens; the corpus is small (a few M tokens) and an H200 does ~0.5M "
                        "tok/s, so this, not the time budget, usually sets the length of the run")
    p.add_argument("--time-budget-s", type=float, default=540.0,
                   help="wall clock for the WHOLE script; training stops early enough to finish in it")
    p.add_argument("--reserve-s", type=float, default=30.0,
                   help="part of the budget kept for final eval, saving, reloading and generation")
    p.add_argument("--compile", action="store_true",
                   help="try torch.compile, eager if it fails (H200, torch 2.11 / transformers 5.17: works with "
                        "graph breaks in the experts, ~45 s to compile, no speed-up, so off by default)")
    # reporting
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--gen-tokens", type=int, default=64)
    args = p.parse_args(argv)

    if args.smoke:
        # Only override what the user did not set explicitly.
        given = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--")}
        smoke_defaults = dict(max_files=24, tokenizer_chars=400_000, seq_len=128, batch_size=8, max_steps=80,
                              warmup_steps=8, lr=3e-3, log_every=10, eval_every=40, eval_batch_size=16,
                              gen_tokens=24, time_budget_s=50.0, reserve_s=10.0, device="cpu")
        for k, v in smoke_defaults.items():
            if "--" + k.replace("_", "-") not in given:
                setattr(args, k, v)
    if args.aux_coef is None:
        args.aux_coef = PRESETS[args.preset][1]
    if args.out is None:
        # the shipped 16-expert model lives in the package; others (small-moe-128) in the git-ignored .models/
        shipped = args.preset == "small-moe"
        args.out = (Path("/tmp/small-moe-smoke") if args.smoke else
                    REPO_ROOT / ("moe_offload/assets" if shipped else ".models") / args.preset)
    return args


def model_size(args: argparse.Namespace) -> ModelSize:
    """The preset's size (SMOKE_SIZE with --smoke) with the --hidden-size etc. overrides applied."""
    base = SMOKE_SIZE if args.smoke else PRESETS[args.preset][0]
    overrides = {name: getattr(args, name) for name in SIZE_FLAGS if getattr(args, name) is not None}
    return ModelSize(**{**asdict(base), **overrides})


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


# --------------------------------------------------------------------------- corpus


@dataclass
class Corpus:
    train_paths: list[str]  # relative paths, sorted
    heldout_paths: list[str]
    train_texts: list[str]
    heldout_texts: list[str]
    skipped_undecodable: int


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def list_stdlib_py(root: Path, include_tests: bool) -> list[str]:
    """Relative POSIX paths of the stdlib's .py files, sorted (site-packages excluded)."""
    skip_dirs = {"site-packages", "dist-packages", "__pycache__"}
    if not include_tests:
        skip_dirs |= {"test", "tests", "idle_test"}
    rels = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs]
        for name in filenames:
            if name.endswith(".py"):
                rels.append((Path(dirpath) / name).relative_to(root).as_posix())
    return sorted(rels)


def is_heldout(rel_path: str, per_mille: int) -> bool:
    """Deterministic by-file split: a stable hash of the relative path."""
    h = int.from_bytes(hashlib.sha1(rel_path.encode("utf-8")).digest()[:8], "big")
    return h % 1000 < per_mille


def read_texts(root: Path, rels: list[str]) -> tuple[list[str], list[str], int]:
    """Read files as strict UTF-8; undecodable or empty files are skipped."""
    kept, texts, skipped = [], [], 0
    for rel in rels:
        try:
            text = (root / rel).read_bytes().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            skipped += 1
            continue
        if text.strip():
            kept.append(rel)
            texts.append(text)
    return kept, texts, skipped


def load_corpus(args: argparse.Namespace) -> Corpus:
    root = stdlib_root()
    rels = list_stdlib_py(root, include_tests=not args.no_tests)
    train = [r for r in rels if not is_heldout(r, args.heldout_per_mille)]
    heldout = [r for r in rels if is_heldout(r, args.heldout_per_mille)]
    if args.max_files is not None:
        train = train[: args.max_files]
        heldout = heldout[: max(1, args.max_files // 10)]
    train, train_texts, s1 = read_texts(root, train)
    heldout, heldout_texts, s2 = read_texts(root, heldout)
    return Corpus(train, heldout, train_texts, heldout_texts, s1 + s2)


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str], vocab_size: int, max_chars: int, seed: int) -> Tokenizer:
    """Byte-level BPE on (a deterministic subsample of) the train split."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    sample, n_chars = [], 0
    for i in order:
        if n_chars >= max_chars:
            break
        sample.append(texts[i])
        n_chars += len(texts[i])

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],  # id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
        show_progress=False,
    )
    tok.train_from_iterator(sample, trainer=trainer, length=len(sample))
    return tok


def wrap_tokenizer(tok: Tokenizer, max_len: int) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=None,
        model_max_length=max_len,
        clean_up_tokenization_spaces=False,  # must stay False: it would rewrite " ," etc. in code
    )


def encode_docs(tok: Tokenizer, texts: list[str], eos_id: int) -> np.ndarray:
    """All docs -> one int32 stream: doc0 <eos> doc1 <eos> ...   shape [n_tokens]"""
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    out = []
    for enc in encode(texts, add_special_tokens=False):
        out.append(np.asarray(enc.ids, dtype=np.int32))
        out.append(np.asarray([eos_id], dtype=np.int32))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int32)


def check_roundtrip(hf_tok: PreTrainedTokenizerFast, texts: list[str]) -> int:
    """Number of texts whose encode->decode is NOT the identity (should be 0)."""
    bad = 0
    for t in texts:
        ids = hf_tok.backend_tokenizer.encode(t, add_special_tokens=False).ids  # whole file, no length warning
        if hf_tok.decode(ids, skip_special_tokens=False) != t:
            bad += 1
    return bad


# --------------------------------------------------------------------------- model


def build_config(size: ModelSize, aux_coef: float, eos_id: int) -> Qwen3MoeConfig:
    return Qwen3MoeConfig(
        vocab_size=size.vocab_size,
        hidden_size=size.hidden_size,
        intermediate_size=4 * size.hidden_size,  # dense-MLP width; unused since every layer is MoE
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
        num_key_value_heads=size.num_kv_heads,
        head_dim=size.hidden_size // size.num_heads,
        max_position_embeddings=size.max_position_embeddings,
        num_experts=size.num_experts,
        num_experts_per_tok=size.top_k,
        moe_intermediate_size=size.moe_intermediate_size,
        decoder_sparse_step=1,
        mlp_only_layers=[],  # all layers MoE
        norm_topk_prob=True,
        output_router_logits=True,
        router_aux_loss_coef=aux_coef,
        tie_word_embeddings=True,
        use_cache=True,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


def count_params(model: torch.nn.Module) -> dict[str, int]:
    """Unique parameters (tied embedding counted once), split by role."""
    seen, counts = set(), {"total": 0, "experts": 0, "router": 0, "embedding": 0, "other": 0}
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        counts["total"] += n
        if ".experts." in name:
            counts["experts"] += n
        elif ".mlp.gate." in name:
            counts["router"] += n
        elif "embed_tokens" in name or "lm_head" in name:
            counts["embedding"] += n
        else:
            counts["other"] += n
    return counts


def active_params_per_token(size: ModelSize, counts: dict[str, int]) -> int:
    return counts["total"] - counts["experts"] + counts["experts"] * size.top_k // size.num_experts


def load_balancing_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Switch-Transformer balancing loss computed PER LAYER, then averaged over layers.

    router_logits: one [B*T, E] tensor per MoE layer.  Per layer:
    E * sum_e frac_e * prob_e, with frac_e the share of the B*T*k routed slots
    that went to expert e and prob_e its mean router probability; perfectly
    uniform routing gives top_k.  (transformers' load_balancing_loss_func pools
    the counts of all layers before multiplying, which only balances expert
    *index* e summed over layers and let single layers leave experts unused.)
    """
    losses = []
    for logits in router_logits:
        probs = logits.float().softmax(dim=-1)  # [B*T, E]
        num_experts = probs.size(-1)
        chosen = probs.topk(top_k, dim=-1).indices  # [B*T, k]
        frac = F.one_hot(chosen, num_experts).float().sum(dim=1).mean(dim=0)  # [E], sums to k (no grad)
        losses.append(num_experts * (frac * probs.mean(dim=0)).sum())
    return torch.stack(losses).mean()


def forward_losses(model, x: torch.Tensor, y: torch.Tensor, top_k: int):
    """x, y: [B, T] token ids (y = x shifted by one).  Returns (ce, aux) scalars.

    Both terms are computed here (no labels= passed), so the training loss
    ce + coef * aux does not depend on whether a given transformers version
    adds its own aux loss to outputs.loss (5.x does, when labels are given).
    """
    out = model(input_ids=x, output_router_logits=True, use_cache=False)
    logits = out.logits  # [B, T, V]
    ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))
    aux = load_balancing_loss(out.router_logits, top_k)
    return ce, aux


# --------------------------------------------------------------------------- data batches


def sample_batch(stream: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator):
    """Random windows of seq_len+1 tokens from the train stream -> x, y: [B, T]."""
    starts = torch.randint(0, stream.numel() - seq_len - 1, (batch,), generator=gen, device="cpu")
    idx = starts.to(stream.device)[:, None] + torch.arange(seq_len + 1, device=stream.device)[None, :]
    win = stream[idx].long()  # [B, T+1]
    return win[:, :-1], win[:, 1:]


def eval_windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Deterministic windows [N, T+1] with stride T: every token but the first is a target once."""
    n = (stream.numel() - 1) // seq_len
    return stream[: n * seq_len + 1].unfold(0, seq_len + 1, seq_len)


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch: int, autocast, num_experts: int, top_k: int,
             max_windows: int | None = None) -> tuple[float, np.ndarray]:
    """Held-out mean CE (nats/token) and expert load [layers, experts] (fraction of routed slots)."""
    model.eval()
    if max_windows is not None:
        windows = windows[:max_windows]
    total_nll, total_tok, load = 0.0, 0, None
    for i in range(0, windows.size(0), batch):
        win = windows[i: i + batch].long()
        x, y = win[:, :-1], win[:, 1:]
        with autocast():
            out = model(input_ids=x, output_router_logits=True, use_cache=False)
        logits = out.logits.float()  # [B, T, V]
        total_nll += F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum").item()
        total_tok += y.numel()
        counts = torch.stack([  # [L, E]
            torch.bincount(rl.float().topk(top_k, dim=-1).indices.reshape(-1), minlength=num_experts)
            for rl in out.router_logits
        ]).cpu().double()
        load = counts if load is None else load + counts
    model.train()
    load = (load / load.sum(dim=1, keepdim=True)).numpy()
    return total_nll / max(total_tok, 1), load


def unigram_ce(train_stream: np.ndarray, heldout_windows: torch.Tensor, vocab_size: int) -> float:
    """Add-one smoothed unigram model from train counts, scored on the held-out eval targets."""
    counts = np.bincount(train_stream, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    targets = heldout_windows[:, 1:].reshape(-1).cpu().numpy()
    return float(-logp[targets].mean())


# --------------------------------------------------------------------------- training


def lr_at(step: int, progress: float, args: argparse.Namespace) -> float:
    """Linear warmup over warmup_steps, then cosine from lr to lr*min_lr_ratio as progress goes 0 -> 1."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    cos = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return args.lr * (args.min_lr_ratio + (1.0 - args.min_lr_ratio) * cos)


def make_optimizer(model, args, device: torch.device) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kw = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8, **kw)


def maybe_compile(model, args, step_fn):
    """Return the module to call in training: compiled if --compile and a test step works."""
    if not args.compile:
        return model
    try:
        compiled = torch.compile(model)
        step_fn(compiled)  # trigger compilation (forward + backward), gradients discarded by caller
        print("torch.compile: ok", flush=True)
        return compiled
    except Exception as e:  # noqa: BLE001 - any compile failure means "use eager"
        print(f"torch.compile failed ({type(e).__name__}: {str(e)[:200]}); using eager", flush=True)
        return model


def train(model, args, train_stream: torch.Tensor, heldout_win: torch.Tensor, device, autocast,
          size: ModelSize, t_script_start: float) -> dict:
    opt = make_optimizer(model, args, device)
    gen = torch.Generator().manual_seed(args.seed)
    B, T = args.batch_size, args.seq_len

    def warm_step(m):
        x, y = sample_batch(train_stream, B, T, torch.Generator().manual_seed(args.seed + 1))
        with autocast():
            ce, aux = forward_losses(m, x, y, size.top_k)
        (ce + args.aux_coef * aux).backward()
        opt.zero_grad(set_to_none=True)

    model.train()
    fwd = maybe_compile(model, args, warm_step)

    t0 = time.time()
    deadline = t_script_start + args.time_budget_s - args.reserve_s
    train_window = max(deadline - t0, 1e-6)
    epoch_steps = math.ceil(args.epochs * train_stream.numel() / (B * T))
    total_steps = max(1, min(args.max_steps, epoch_steps))
    stop_reason = "max_steps" if args.max_steps <= epoch_steps else "epochs"
    print(f"schedule: {total_steps} steps (max_steps {args.max_steps}, {args.epochs} epochs = {epoch_steps} steps), "
          f"or until t={deadline - t_script_start:.0f}s", flush=True)
    curve, evals = [], []
    acc_ce, acc_aux, acc_n, t_log, tok_log = 0.0, 0.0, 0, time.time(), 0
    step = 0
    while step < total_steps:
        now = time.time()
        progress = max(step / total_steps, (now - t0) / train_window)
        if now >= deadline:
            stop_reason = "time_budget"
            break
        lr = lr_at(step, progress, args)
        for g in opt.param_groups:
            g["lr"] = lr

        x, y = sample_batch(train_stream, B, T, gen)  # [B, T]
        with autocast():
            ce, aux = forward_losses(fwd, x, y, size.top_k)
            loss = ce + args.aux_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        step += 1
        acc_ce += ce.detach()
        acc_aux += aux.detach()
        acc_n += 1
        tok_log += B * T

        if step % args.log_every == 0 or step == total_steps:
            tl = (acc_ce / acc_n).item()  # syncs the device
            ta = (acc_aux / acc_n).item()
            dt = time.time() - t_log
            rec = dict(step=step, tokens=step * B * T, elapsed_s=round(time.time() - t0, 2), train_loss=round(tl, 4),
                       aux_loss=round(ta, 4), lr=lr, tok_s=round(tok_log / dt, 1))
            curve.append(rec)
            print(f"step {step}  train_loss {tl:.4f}  lr {lr:.2e}  tok/s {tok_log / dt:,.0f}  aux {ta:.3f}",
                  flush=True)
            acc_ce, acc_aux, acc_n, t_log, tok_log = 0.0, 0.0, 0, time.time(), 0

        if step % args.eval_every == 0:
            t_eval = time.time()
            ce_h, _ = evaluate(model, heldout_win, args.eval_batch_size, autocast, size.num_experts, size.top_k,
                               max_windows=256)
            evals.append(dict(step=step, heldout_ce=round(ce_h, 4), elapsed_s=round(time.time() - t0, 2)))
            print(f"eval held-out CE {ce_h:.4f} nats/token  (step {step}, <=256 windows)", flush=True)
            t_log += time.time() - t_eval  # keep eval time out of the tok/s figure
    return dict(steps=step, stop_reason=stop_reason, train_time_s=round(time.time() - t0, 2),
                tokens_seen=step * B * T, curve=curve, evals=evals)


# --------------------------------------------------------------------------- save / reload


def folder_size(path: Path) -> dict[str, int]:
    return {f.name: f.stat().st_size for f in sorted(path.iterdir()) if f.is_file()}


def save_all(model, hf_tok, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16)
    model.generation_config.do_sample = False
    model.generation_config.eos_token_id = hf_tok.eos_token_id
    model.generation_config.bos_token_id = hf_tok.bos_token_id
    model.generation_config.pad_token_id = hf_tok.pad_token_id
    # Training passed output_router_logits=True explicitly; the shipped config leaves it off so plain inference
    # (and generate) does not compute router logits / aux loss unless asked.
    model.config.output_router_logits = False
    model.save_pretrained(out, safe_serialization=True)
    hf_tok.save_pretrained(out)
    for f in out.iterdir():  # safetensors may write 0600; the folder ships as package data
        if f.is_file():
            f.chmod(0o644)


@torch.no_grad()
def reload_and_generate(out: Path, device: torch.device, heldout_win: torch.Tensor, heldout_texts: list[str], args,
                        size: ModelSize) -> dict:
    tok = AutoTokenizer.from_pretrained(out)
    roundtrip_bad = check_roundtrip(tok, heldout_texts[:20])  # through the reloaded AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).to(device).eval()
    # Sanity: reloaded weights give the same held-out CE as the in-memory bf16 model did.
    no_autocast = lambda: torch.autocast(device.type, enabled=False)  # noqa: E731 - weights already bf16
    ce_reload, _ = evaluate(model, heldout_win, args.eval_batch_size, no_autocast, size.num_experts, size.top_k,
                            max_windows=32)
    ids = [tok.bos_token_id] + tok(PROMPT, add_special_tokens=False)["input_ids"]
    x = torch.tensor([ids], device=device)
    gen = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=args.gen_tokens, do_sample=False,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    continuation = tok.decode(gen[0, x.size(1):], skip_special_tokens=False)
    return dict(reloaded_class=type(model).__name__, tokenizer_class=type(tok).__name__,
                reloaded_tokenizer_roundtrip_failures=roundtrip_bad,
                reloaded_heldout_ce_32win=round(ce_reload, 4), prompt=PROMPT, continuation=continuation)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    t_start = time.time()
    args = parse_args(argv)
    seed_everything(args.seed)
    device = torch.device(args.device)
    size = model_size(args)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
            "cpu", enabled=False)

    print(f"torch {torch.__version__}  transformers {transformers.__version__}  tokenizers {tokenizers.__version__}"
          f"  python {sys.version.split()[0]}  device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""), flush=True)

    # ---- corpus
    corpus = load_corpus(args)
    n_chars_tr = sum(map(len, corpus.train_texts))
    n_chars_ho = sum(map(len, corpus.heldout_texts))
    print(f"corpus {stdlib_root()}: train {len(corpus.train_paths)} files / {n_chars_tr / 1e6:.1f}M chars, "
          f"held-out {len(corpus.heldout_paths)} files / {n_chars_ho / 1e6:.2f}M chars, "
          f"skipped (non-UTF-8) {corpus.skipped_undecodable}  [{time.time() - t_start:.1f}s]", flush=True)

    # ---- tokenizer
    t = time.time()
    if args.tokenizer is not None:
        hf_tok = AutoTokenizer.from_pretrained(args.tokenizer)
        tok = hf_tok.backend_tokenizer
        hf_tok.model_max_length = size.max_position_embeddings
    else:
        tok = train_tokenizer(corpus.train_texts, size.vocab_size, args.tokenizer_chars, args.seed)
        hf_tok = wrap_tokenizer(tok, size.max_position_embeddings)
    eos_id = tok.token_to_id(EOS)
    size.vocab_size = tok.get_vocab_size()  # == requested unless the corpus is tiny
    bad = check_roundtrip(hf_tok, corpus.heldout_texts[:50])
    print(f"tokenizer: byte-level BPE vocab {size.vocab_size}, eos id {eos_id}, "
          f"{'from ' + str(args.tokenizer) if args.tokenizer else 'trained'} in {time.time() - t:.1f}s; "
          f"round-trip failures on held-out files: {bad}", flush=True)

    t = time.time()
    train_np = encode_docs(tok, corpus.train_texts, eos_id)  # [N_train]
    heldout_np = encode_docs(tok, corpus.heldout_texts, eos_id)  # [N_heldout]
    print(f"tokens: train {train_np.size:,}  held-out {heldout_np.size:,}  "
          f"({n_chars_tr / max(train_np.size, 1):.2f} chars/token)  encoded in {time.time() - t:.1f}s", flush=True)
    train_stream = torch.from_numpy(train_np).to(device)
    heldout_win = eval_windows(torch.from_numpy(heldout_np), args.seq_len).to(device)  # [N_win, T+1]
    ce_unigram = unigram_ce(train_np, heldout_win, size.vocab_size)
    print(f"unigram baseline held-out CE {ce_unigram:.4f} nats/token  ({heldout_win.size(0)} windows x "
          f"{args.seq_len} targets)", flush=True)

    # ---- model
    seed_everything(args.seed)
    config = build_config(size, args.aux_coef, eos_id)
    model = AutoModelForCausalLM.from_config(config).to(device)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight, "embeddings not tied"
    counts = count_params(model)
    print(f"model {type(model).__name__}: {counts['total']:,} params "
          f"(experts {counts['experts']:,}, router {counts['router']:,}, embedding {counts['embedding']:,}, "
          f"other {counts['other']:,}); active/token {active_params_per_token(size, counts):,}; "
          f"bf16 weights ~{counts['total'] * 2 / 1e6:.1f} MB", flush=True)
    print(f"config: {asdict(size)}  experts_impl {getattr(model.config, '_experts_implementation', None)}  "
          f"attn_impl {model.config._attn_implementation}", flush=True)

    # ---- train
    print(f"training: batch {args.batch_size} x seq {args.seq_len} = {args.batch_size * args.seq_len:,} tok/step, "
          f"lr {args.lr}, budget {args.time_budget_s}s "
          f"(training until t={args.time_budget_s - args.reserve_s:.0f}s)", flush=True)
    result = train(model, args, train_stream, heldout_win, device, autocast, size, t_start)
    print(f"stopped after {result['steps']} steps ({result['stop_reason']}), {result['tokens_seen']:,} tokens "
          f"= {result['tokens_seen'] / max(train_np.size, 1):.2f} epochs, {result['train_time_s']}s", flush=True)

    # ---- final eval (full held-out split), bf16 weights as they will be saved
    model.to(torch.bfloat16)
    ce_final, load = evaluate(model, heldout_win, args.eval_batch_size, autocast, size.num_experts, size.top_k)
    print(f"eval held-out CE {ce_final:.4f} nats/token (final, bf16 weights, all {heldout_win.size(0)} windows)  "
          f"vs unigram {ce_unigram:.4f}", flush=True)
    ce_32, _ = evaluate(model, heldout_win, args.eval_batch_size, autocast, size.num_experts, size.top_k,
                        max_windows=32)  # reference for the reload check below
    rel = load * size.num_experts  # 1.0 = uniform
    for li, row in enumerate(rel):
        print(f"  layer {li} expert load / uniform: min {row.min():.2f}  max {row.max():.2f}  "
              f"[{' '.join(f'{v:.2f}' for v in row)}]", flush=True)

    # ---- save
    out = args.out.resolve()
    save_all(model, hf_tok, out)
    log = dict(
        seed=args.seed, device=str(device),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        versions=dict(torch=torch.__version__, transformers=transformers.__version__,
                      tokenizers=tokenizers.__version__, python=sys.version.split()[0]),
        args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        model_size=asdict(size), params=counts, active_params_per_token=active_params_per_token(size, counts),
        corpus=dict(stdlib=str(stdlib_root()), train_files=len(corpus.train_paths),
                    heldout_files=len(corpus.heldout_paths), heldout_paths=corpus.heldout_paths,
                    train_tokens=int(train_np.size), heldout_tokens=int(heldout_np.size),
                    skipped_undecodable=corpus.skipped_undecodable),
        unigram_heldout_ce=round(ce_unigram, 4), final_heldout_ce=round(ce_final, 4),
        expert_load_heldout=[[round(float(v), 4) for v in row] for row in load],
        **result,
    )
    log["wall_time_s"] = round(time.time() - t_start, 2)
    (out / "train_log.json").write_text(json.dumps(log, indent=1))

    # ---- reload from disk and generate
    gen = reload_and_generate(out, device, heldout_win, corpus.heldout_texts, args, size)
    print(f"reloaded {gen['reloaded_class']} + {gen['tokenizer_class']} from {out}; held-out CE on the first 32 "
          f"windows: reloaded {gen['reloaded_heldout_ce_32win']:.4f} vs in-memory {ce_32:.4f}; tokenizer round-trip "
          f"failures {gen['reloaded_tokenizer_roundtrip_failures']}", flush=True)
    print(f"greedy continuation of {PROMPT!r}:\n{PROMPT}{gen['continuation']}\n---", flush=True)

    sizes = folder_size(out)
    total = sum(sizes.values())
    log.update(generation=gen, output_files=sizes, output_bytes=total, wall_time_s=round(time.time() - t_start, 2))
    (out / "train_log.json").write_text(json.dumps(log, indent=1))
    print("output: " + ", ".join(f"{k} {v / 1e6:.2f}MB" for k, v in sizes.items())
          + f"  total {total / 1e6:.2f} MB" + ("" if total <= SIZE_LIMIT_BYTES else "  WARNING: over 40 MB"))
    print(f"done in {time.time() - t_start:.1f}s", flush=True)


if __name__ == "__main__":
    main()
