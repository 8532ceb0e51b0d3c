"""TrainConfig: every training setting, named once. The `collocate train` options are derived from its
fields (name, default, type and help), and the data stage's identity from the fields marked `data`.

    cfg = TrainConfig(out="runs/x", k=4, samples=2000)
    parser = argparse.ArgumentParser(); add_arguments(parser); cfg = from_args(parser.parse_args())
"""
from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from ..block import DECAY, LAYERS
from ..clp import CLP_FEATURES
from ..data import MIXES
from ..heads import TokenHeads
from ..zoo import DEFAULT_MODEL


def setting(default=MISSING, help: str = "", *, data: bool = False, flag: str | None = None, type=None,
            choices=None):
    """A field with what its command-line option needs. data=True: a data-stage setting (a run started with
    other values of these refuses to resume)."""
    meta = {"help": help, "data": data, "flag": flag, "type": type, "choices": choices}
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    out: str = setting(help="run folder: the bundle, its report, and work/ (answers, features, checkpoints)")
    model: str = setting(DEFAULT_MODEL, "short name, hub id, local folder or .gguf file", data=True)
    k: int = setting(4, "heads predict t+2..t+k (a block drafter: its block size, e.g. 16)")
    drafter: str = setting("heads", "drafter type: independent heads, token-conditioned ones (+j sees the token "
                           "at +j-1; tc-depth: a block per offset, tc-shared: one block for all, tc-wide: that block 4x "
                           "wider), or a block drafter (a few layers reading several backbone layers draft t+2..t+k "
                           "in one pass, DFlash's design)", choices=("heads",) + TokenHeads.DESIGNS + ("block",))
    draft_vocab: int = setting(0, "token-conditioned heads and the block drafter: draft over the N tokens the answers "
                                  "use most (a smaller LM-head read; 0: the whole vocabulary)")
    block_layers: int = setting(LAYERS, "block drafter: its transformer layers")
    block_mlp: int = setting(0, "block drafter: its MLP width (0: the backbone's)")
    block_kv_heads: int = setting(0, "block drafter: its key/value heads, a divisor of the backbone's query heads (0: "
                                     "the backbone's; more widen what each layer reads of the context)")
    block_taps: tuple[int, ...] = setting((), "block drafter: the backbone layers it reads, 0-based, comma-separated "
                                              "(default: 5 spread from layer 1 to L-3)")
    block_init: str = setting("fresh", "block drafter: its layers' start, random ('fresh') or the backbone's last "
                                       "layers ('backbone', with fc reading the deepest tap)",
                              choices=("fresh", "backbone"))
    block_tc: bool = setting(False, "block drafter: each slot's state also follows the token drafted at the slot "
                                    "before it (a small update per slot; trees then draft one depth after another, "
                                    "and the bundle is format 5; not exportable to vLLM or SGLang)")
    init_from: str | None = setting(None, "start the drafter from a trained bundle's weights and draft vocabulary (the "
                                          "same drafter and sizes, for this backbone) and train on from there with a fresh "
                                          "optimiser: training spread over several sessions, or more answers", type=str)
    anchors: int = setting(64, "block drafter: blocks trained per answer and step (random answer positions)")
    block_attention: str = setting("sdpa", "block drafter training: each layer's attention in one kernel (PyTorch's "
                                           "scaled_dot_product_attention) or as scores, then softmax ('eager', as "
                                           "decoding runs it); the same attention", choices=("sdpa", "eager"))
    block_decay: float = setting(DECAY, "block drafter: slot j of a block weighs exp(-(j-1) / N) in the loss (DFlash: 7)")
    samples: int = setting(2000, "self-distilled answers", data=True)
    mix: tuple[str, ...] = setting((), "add prompt kinds to ShareGPT's, comma-separated, in equal shares: "
                                   + "; ".join(f"{k}: {v}" for k, v in MIXES.items()), data=True)
    max_new_tokens: int = setting(192, "answer length of the distilled data", data=True)
    max_prompt_tokens: int = setting(256, "longer prompts are skipped", data=True)
    gen_batch: int = setting(64, "answers generated at once")
    device_map: str | None = setting(None, "a backbone too big for one GPU: 'auto' spreads its layers over every "
                                           "visible GPU in one process (answers, features); heads train on the "
                                           "LM head's GPU", type=str)
    gen_static: bool = setting(False, "data stage: HF generate with a static cache, every prompt padded to "
                                      "max-prompt-tokens, so CUDA compiles it once; same answers")
    shard_size: int = setting(128, "answers per shard (the unit of resuming)", data=True)
    heldout_shards: int = setting(1, "last shards kept out of training, for the held-out reports")
    train_samples: int | None = setting(None, "train on the first N answers only, held out as before (for a "
                                              "curve of accuracy against data on one held-out set)", type=int)
    epochs: int = setting(2, "head-training epochs")
    lr: float = setting(1e-3, "learning rate of heads or a block drafter (AdamW, warm-up then cosine)")
    batch: int = setting(512, "positions per head-training batch, over all processes (N GPUs take 1/N each); a "
                              "block drafter's: anchors per step")
    grad_accum: int = setting(1, "batches per optimiser step")
    warmup: float = setting(0.05, "share of head-training steps spent warming up")
    kl_weight: float = setting(0.0, "weight of a KL term to the backbone's own distribution")
    clp_features: str = setting("hidden+conf", "what the default CLP reads (the bundle carries every variant; "
                                "hidden: the paper's)",
                                choices=CLP_FEATURES)
    clp_epochs: int = setting(4, "CLP and gate epochs")
    policy_positions: int = setting(100_000, "training positions sampled for CLP and gates")
    gates: bool = setting(True, "train the gate baseline (independent and token-conditioned heads)")
    compete: bool = setting(False, "also train a +1 head (head-competition baseline)")
    cache_hidden: bool = setting(True, "keep hidden states on disk between epochs")
    budget_minutes: float | None = setting(None, "stop head training after this many minutes (heads: after the epoch that "
                                              "passes it; a block drafter: its learning rate's schedule runs on the "
                                              "clock and ends then)", type=float)
    deterministic: bool = setting(False, "deterministic kernels only (torch.use_deterministic_algorithms, "
                                         "CUBLAS_WORKSPACE_CONFIG=:4096:8), for runs that must repeat bit for bit")
    seed: int = setting(0, "prompt sampling, data order and the drafter's initial weights", data=True)
    chat: bool = setting(True, "wrap prompts in the model's chat template", data=True)
    prompts_file: str | None = setting(None, 'JSONL of {"prompt": ...} lines instead of ShareGPT', data=True,
                                       flag="--prompts")
    answers_file: str | None = setting(None, "JSONL of answers made elsewhere (vLLM, SGLang, another machine) instead "
                                             'of generating them: {"prompt_token_ids": [...], "token_ids": [...]} or '
                                             '{"prompt": "...", "answer": "..."} lines, this backbone\'s greedy answers '
                                             "(checked on a sample); the first --samples usable lines are taken",
                                       data=True, flag="--answers")
    answers_from: str | None = setting(None, "base URL of an OpenAI-compatible server of this backbone (vLLM, SGLang, "
                                             "collocate serve), e.g. http://127.0.0.1:8000/v1: the data stage asks it "
                                             "for the greedy answers, --gen-batch at a time, instead of running HF "
                                             "generate (checked on the first batch as --answers is; a resumed run "
                                             "may ask another server)")
    only: str | None = setting(None, "stop after this stage (resume later)", choices=("data", "features"))

    def __post_init__(self):
        self.mix = tuple(self.mix)
        self.block_taps = tuple(int(t) for t in self.block_taps)
        if self.k < 2:
            raise ValueError(f"--k must be >= 2, got {self.k}")
        if self.samples < 2:
            raise ValueError("--samples must be at least 2")
        if self.only not in (None, "data", "features"):
            raise ValueError(f"--only takes 'data' or 'features', got {self.only!r}")
        if self.epochs < 1 or self.batch < 1 or self.grad_accum < 1:
            raise ValueError("--epochs, --batch and --grad-accum must be >= 1")
        if self.drafter != "heads" and self.compete:
            raise ValueError("--compete adds a +1 head to independent heads (--drafter heads) only")
        if self.draft_vocab < 0 or (self.draft_vocab and self.drafter == "heads"):
            raise ValueError("--draft-vocab N (N > 0) applies to token-conditioned drafters (--drafter tc-*) and block "
                             "drafters only")
        shaped = (self.block_layers != TrainConfig.block_layers or self.block_mlp or self.block_taps
                  or self.block_kv_heads or self.block_decay != TrainConfig.block_decay
                  or self.block_init != TrainConfig.block_init or self.block_attention != TrainConfig.block_attention
                  or self.block_tc)
        if self.drafter != "block" and shaped:
            raise ValueError("--block-layers, --block-mlp, --block-kv-heads, --block-taps, --block-decay, --block-init, "
                             "--block-attention and --block-tc shape a block drafter (--drafter block)")
        if (self.block_layers < 1 or self.block_mlp < 0 or self.block_kv_heads < 0 or self.anchors < 1
                or self.block_decay <= 0 or any(t < 0 for t in self.block_taps)):
            raise ValueError("--block-layers and --anchors must be >= 1, --block-decay > 0, --block-mlp, "
                             "--block-kv-heads and --block-taps >= 0")
        if self.answers_file and (self.prompts_file or self.mix):
            raise ValueError("--answers brings its own prompts: leave out --prompts and --mix")
        if self.answers_file and self.answers_from:
            raise ValueError("--answers reads answers made already, --answers-from asks a server for them: one of the two")
        if self.answers_from and not self.answers_from.startswith(("http://", "https://")):
            raise ValueError(f"--answers-from takes a server's base URL (http://host:port/v1), got {self.answers_from!r}")
        if self.answers_file and not Path(self.answers_file).is_file():
            raise ValueError(f"--answers {self.answers_file}: no such file")
        if self.drafter == "block":
            self.gates = False  # (the gate baseline reads independent heads' outputs)

    @property
    def n_shards(self) -> int:
        return math.ceil(self.samples / self.shard_size)

    def data_settings(self) -> dict:
        """What makes the answers what they are: a resumed run must have the same."""
        values = asdict(self)
        out = {f.name: values[f.name] for f in fields(self) if f.metadata["data"] and values[f.name] is not None}
        out["mix"] = list(out["mix"])
        return out


def add_arguments(parser) -> None:
    """One option per TrainConfig field: --name-with-dashes; a bool that defaults on gets --no-name."""
    for f in fields(TrainConfig):
        m, flag = f.metadata, f.metadata["flag"] or "--" + f.name.replace("_", "-")
        if f.default is MISSING:
            parser.add_argument(flag, dest=f.name, required=True, help=m["help"])
        elif isinstance(f.default, bool):
            off = f.default
            parser.add_argument(("--no-" + flag[2:]) if off else flag, dest=f.name, action="store_false" if off
                                else "store_true", help=("turn off: " if off else "") + m["help"])
        elif isinstance(f.default, tuple):
            parser.add_argument(flag, dest=f.name, default=f.default, help=m["help"],
                                type=lambda s: tuple(x for x in s.split(",") if x))
        else:
            kind = m["type"] or (str if f.default is None else type(f.default))
            parser.add_argument(flag, dest=f.name, default=f.default, type=kind, choices=m["choices"],
                                help=m["help"] + (f" (default {f.default})" if f.default is not None else ""))


def from_args(args) -> TrainConfig:
    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
