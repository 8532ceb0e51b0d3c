"""DecodeConfig: every decoding option, declared once. The command line's options, the server's request
fields and the bench's mode names are derived from its fields (name, default, type, range, help), as
TrainConfig does for training; which options a mode reads, and how they combine, is its rule's business
(modes.py).

    cfg = DecodeConfig(mode="verify", tree_size=48, tree_depth=3)
    parser = argparse.ArgumentParser(); add_arguments(parser); cfg = from_args(parser.parse_args())
    cfg = from_spec("verify-t48d3")                    # the bench's names for modes
"""
from __future__ import annotations

import typing
from dataclasses import MISSING, dataclass, field, fields, replace

from .clp import CLP_FEATURES
from .draft import MAX_TREE
from .errors import DecodeError
from .modes import EXACT_WIDTH, EXACT_WIDTHS, MAX_CANDIDATES, MODES, rule_class


def option(default=MISSING, help: str = "", *, lo=None, hi=None, open_lo: bool = False, open_hi: bool = False,
           noun: str | None = None, message: str | None = None, choices=None, api=True, api_default=MISSING,
           api_type=None, commands: tuple[str, ...] = ("generate",), flag: str | None = None):
    """A DecodeConfig field and what its checks, its command-line option and its request field need.
    lo/hi: the range (open_*: excluded), checked with a message naming `noun` (default: the field's name), or
    `message` ({value} filled in);
    api: a field of the server's requests (api_default, api_type where they differ from the library's);
    commands: the `collocate` commands that take it as an option."""
    meta = dict(help=help, lo=lo, hi=hi, open_lo=open_lo, open_hi=open_hi, noun=noun, message=message,
                choices=choices, api=api,
                api_default=api_default, api_type=api_type, commands=commands, flag=flag)
    return field(default=default, metadata=meta)


ALL = ("generate", "demo", "bench", "serve")


@dataclass
class DecodeConfig:
    mode: str = option("ar", "ar: plain decoding; verify: lossless drafts; clp, gate, compete: head tokens taken "
                       "unchecked (the paper's CLP and its baselines)", choices=MODES, api_default=None)
    max_new_tokens: int = option(256, "new tokens at most", lo=1, api=False, commands=ALL)  # (the server reads max_tokens)
    threshold: float | None = option(None, "clp: accept the longest span whose P(all right) reaches this; gate, "
                                     "compete: the gate threshold (default: clp calibrated, see --max-wrong; gate "
                                     "0.5; verify --adaptive: CLP's argmax); ar and verify read none", lo=0.0, hi=1.0,
                                     commands=("generate", "demo", "bench"))
    max_wrong: float | None = option(None, "clp: the threshold whose held-out wrong share (head tokens the backbone "
                                     "would not write) is at most this, e.g. 0.05 (default: the bundle's calibrated "
                                     "quality-safe threshold)", lo=0.0, hi=1.0, open_lo=True, open_hi=True,
                                     noun="max_wrong is a share of head tokens and",
                                     commands=("generate", "demo", "bench"))
    argmax: bool = option(False, "clp, verify --adaptive: accept the CLP's likeliest length (the paper's reading; "
                          "no quality bound)", commands=("generate", "demo"))
    clp_features: str | None = option(None, "clp, verify --adaptive: which of the bundle's CLPs (hidden: the "
                                      "paper's; default: the bundle's own)", choices=CLP_FEATURES,
                                      noun="CLP features", commands=("generate", "demo"))
    adaptive: bool = option(False, "verify: the CLP chooses how many drafts to feed")
    candidates: int = option(1, "verify: also check the +2 head's next best tokens in the same pass",
                             lo=1, hi=MAX_CANDIDATES)
    tree_size: int | None = option(None, f"verify: draft the bundle's best tree of this many nodes (1..{MAX_TREE}), "
                                   "chosen from its heads' held-out rank statistics; checked in one pass, lossless",
                                   lo=1, hi=MAX_TREE, noun="tree size counts draft nodes and")
    tree_depth: int | None = option(None, "with --tree-size: the best tree whose paths draft at most this many "
                                    "tokens (each depth of token-conditioned heads costs a sequential LM-head read)")
    exact: bool = option(False, "ar, verify: feed every step at one width (--exact-width) and one attention length, "
                         "each row reading its keys as ar would, so verify (chain or tree) is bitwise ar's at that "
                         "width in bf16 too (fast engine; costs grow with the width and the context)",
                         commands=("generate", "bench"))
    exact_width: int = option(EXACT_WIDTH, f"--exact: the rows every step feeds, ar's too: a multiple of 16 "
                              f"({', '.join(map(str, EXACT_WIDTHS))}) that holds the tree and its root; modes "
                              "compare bit for bit at one width", choices=EXACT_WIDTHS, commands=("generate", "bench"))
    temperature: float = option(0.0, "0: greedy; > 0: sample (ar, verify: the same distribution; unverified modes "
                                "sample t+1 and keep the heads' argmax)", lo=0.0, hi=100.0,
                                message="temperature must be >= 0 (0: greedy) and at most 100, got {value}",
                                api_default=1.0)  # OpenAI's default
    top_k: int = option(0, "sampling: keep the k likeliest tokens (0: all)", lo=0, noun="top_k (0: off)")
    top_p: float = option(1.0, "sampling: keep the smallest set of tokens whose mass reaches top_p", lo=0.0, hi=1.0,
                          open_lo=True)
    seed: int | None = option(None, "sampling: the same seed gives the same answer (default: a fresh one)",
                              lo=0, hi=2 ** 63, open_hi=True, noun="seed")
    stop: tuple[str, ...] = option((), "stop string (repeatable): the answer ends at the token that completes it, "
                                   "and its text before it", api_type=str | list[str] | None, flag="--stop")

    def __post_init__(self):
        self.stop = tuple(self.stop)
        if not all(isinstance(s, str) and s for s in self.stop):
            raise DecodeError(f"stop strings must be non-empty text, got {list(self.stop)}")
        for f in fields(self):
            check_range(f, getattr(self, f.name))
        rule = rule_class(self)
        for f in fields(self):  # an option that only some modes read is refused elsewhere, never ignored
            if f.name in APPLIES and getattr(self, f.name) != f.default and f.name not in rule.options:
                raise DecodeError(f"{flag_of(f)} applies to {APPLIES[f.name]}")
        if self.exact_width != EXACT_WIDTH and not self.exact:
            raise DecodeError(f"--exact-width applies to {APPLIES['exact_width']}")
        rule.check(self)

    @property
    def rule(self):
        """The rule class of this mode (modes.py): its options, checks and step."""
        return rule_class(self)


def flag_of(f) -> str:
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


# where an option applies, in the words of its error message (the rule classes hold the same facts as sets);
# a threshold given to ar or verify is let be (they read none), as in every release so far
APPLIES = {"adaptive": "mode 'verify' only", "candidates": "mode 'verify' without --adaptive only",
           "tree_size": "mode 'verify' without --adaptive or --candidates only",
           "tree_depth": "mode 'verify' with --tree-size only",
           "argmax": "CLP's rule (mode 'clp' or verify --adaptive), without --threshold or --max-wrong",
           "clp_features": "the CLP's modes: 'clp' or verify --adaptive (it picks the CLP)",
           "exact": "the lossless modes, ar and verify", "exact_width": "ar and verify with --exact",
           "max_wrong": "mode 'clp' (it picks clp's threshold)"}


def check_range(f, value) -> None:
    m = f.metadata
    if value is None or isinstance(value, (bool, str, tuple)) or m["choices"]:
        if m["choices"] and value is not None and value not in m["choices"]:
            what = m["noun"] or f.name.replace("_", " ")
            raise DecodeError(f"unknown {what} '{value}'; choose one of {', '.join(map(str, m['choices']))}")
        return
    lo, hi = m["lo"], m["hi"]
    low_ok = lo is None or (value > lo if m["open_lo"] else value >= lo)
    high_ok = hi is None or (value < hi if m["open_hi"] else value <= hi)
    if low_ok and high_ok:
        return
    if m["message"]:
        raise DecodeError(m["message"].format(value=value))
    noun = m["noun"] or f.name
    if hi is None:
        raise DecodeError(f"{noun} must be >= {lo}, got {value}")
    if isinstance(lo, int) and not m["open_lo"] and not m["open_hi"]:
        raise DecodeError(f"{noun} must lie in {lo}..{hi}, got {value}")
    span = ("(" if m["open_lo"] else "[") + f"{lo:g}, {'2^63' if hi == 2 ** 63 else f'{hi:g}'}" + (")" if m["open_hi"] else "]")
    raise DecodeError(f"{noun} must lie in {span}, got {value}")


def with_options(cfg: DecodeConfig, **values) -> DecodeConfig:
    """cfg with each of `values` (None: leave it) that its mode reads and that the rest allows, so that one
    set of options can go to several modes side by side (the demo's rows, the bench's modes). --exact and its
    width are never dropped: a mode that cannot take them is an error, not a row that is silently not exact."""
    applicable = {name: value for name, value in values.items() if value is not None and name in cfg.rule.options}
    try:
        return replace(cfg, **applicable)  # all together: some hold only side by side (--exact and its width)
    except DecodeError:
        pass
    for name, value in applicable.items():
        try:
            cfg = replace(cfg, **{name: value})
        except DecodeError:
            if name in ("exact", "exact_width"):
                raise
            # (e.g. --max-wrong beside a mode's own threshold: the mode's own setting stands)
    return cfg


# -- the command line -----------------------------------------------------------------------------------
def add_arguments(parser, command: str = "generate") -> None:
    """One option per DecodeConfig field that `command` takes: --name-with-dashes."""
    hints = typing.get_type_hints(DecodeConfig)
    for f in fields(DecodeConfig):
        m = f.metadata
        if command not in m["commands"]:
            continue
        if isinstance(f.default, bool):
            parser.add_argument(flag_of(f), dest=f.name, action="store_true", help=m["help"])
        elif isinstance(f.default, tuple):
            parser.add_argument(flag_of(f), dest=f.name, action="append", help=m["help"])
        else:
            kind = next(t for t in typing.get_args(hints[f.name]) or (hints[f.name],) if t is not type(None))
            default = "" if f.default is None else f" (default {f.default})"
            parser.add_argument(flag_of(f), dest=f.name, default=f.default, type=kind, choices=m["choices"],
                                help=m["help"] + default)


def given(args) -> dict:
    """The DecodeConfig fields among parsed options (a repeatable option never given: its default)."""
    values = {f.name: getattr(args, f.name) for f in fields(DecodeConfig) if hasattr(args, f.name)}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if v is not None}


def from_args(args, **overrides) -> DecodeConfig:
    """The DecodeConfig of parsed options (those the parser lacks keep their defaults)."""
    return DecodeConfig(**{**given(args), **overrides})


# -- the server ---------------------------------------------------------------------------------------
def api_fields() -> dict[str, tuple]:
    """The request fields the server takes from DecodeConfig: name -> (type, default), for pydantic."""
    hints = typing.get_type_hints(DecodeConfig)
    out = {}
    for f in fields(DecodeConfig):
        m = f.metadata
        if m["api"]:
            default = f.default if m["api_default"] is MISSING else m["api_default"]
            kind = m["api_type"] or hints[f.name]
            out[f.name] = (kind | None if default is None else kind, None if isinstance(default, tuple) else default)
    return out


def from_request(values: dict, **overrides) -> DecodeConfig:
    """The DecodeConfig of a request's DecodeConfig fields (None: the default)."""
    names = {f.name for f in fields(DecodeConfig)}
    picked = {k: v for k, v in values.items() if k in names and v is not None}
    if isinstance(picked.get("stop"), str):
        picked["stop"] = (picked["stop"],)
    return DecodeConfig(**{**picked, **overrides})


# -- the bench's mode names -----------------------------------------------------------------------------
SPEC_HELP = ("ar, clp, gate, compete, verify, verify-adaptive, verify-cN (N candidates for the first draft), "
             "verify-tN (an N-node tree), verify-tNdD (an N-node tree at most D deep), clp-hidden, clp-hidden+conf; "
             "@T sets a threshold, @argmax takes CLP's likeliest length")


def spec_options(spec: str) -> dict:
    """A bench mode name as DecodeConfig fields: verify-t48d3 -> mode verify, tree_size 48, tree_depth 3;
    clp@0.8 -> mode clp, threshold 0.8; clp-hidden@argmax -> that CLP at its argmax. ValueError if unknown."""
    name, _, at = spec.partition("@")
    out = {"argmax": True} if at == "argmax" else {"threshold": float(at)} if at else {}
    size, _, depth = name[len("verify-t"):].partition("d")
    if name.startswith("clp-") and name[len("clp-"):] in CLP_FEATURES:
        out.update(mode="clp", clp_features=name[len("clp-"):])
    elif name == "verify-adaptive":
        out.update(mode="verify", adaptive=True)
    elif name.startswith("verify-c") and name[len("verify-c"):].isdigit():
        out.update(mode="verify", candidates=int(name[len("verify-c"):]))
    elif name.startswith("verify-t") and size.isdigit() and (depth.isdigit() or not depth):
        out.update(mode="verify", tree_size=int(size), **({"tree_depth": int(depth)} if depth else {}))
    elif name in MODES:
        out["mode"] = name
    else:
        raise ValueError(f"unknown bench mode '{name}'; choose from {SPEC_HELP}")
    return out


def from_spec(spec: str, **defaults) -> DecodeConfig:
    """The DecodeConfig a bench mode name stands for, with `defaults` where that mode reads them."""
    try:
        return with_options(DecodeConfig(**spec_options(spec)), **defaults)
    except DecodeError as e:
        raise ValueError(f"'{spec}': {e}") from None
