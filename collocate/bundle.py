"""The bundle: MTP heads (a drafter) + CLP (+ optional gates), saved as config.json + model.safetensors.

    bundle = MTPBundle.from_pretrained("runs/smollm2-k4", backbone=model)  # checks the fingerprint
    bundle.save_pretrained("out/")

config.json carries a fingerprint of the backbone (hidden size, vocab size, a hash of the LM-head
weights), so loading heads onto a model they were not trained for fails loudly instead of decoding
garbage. Format 2 adds the drafter type ("heads": independent heads; "tc-depth", "tc-shared":
token-conditioned, heads.TokenHeads), an optional draft vocabulary, and the draft tree: rank paths
best first, so its first N are the best N-node tree (`--tree-size N`). Format 3 adds `clp_variants`: CLPs
that read other features than the default one (`clp_features`), each with its own held-out calibration.
Format 4 adds the block drafter (drafter "block", its sizes in `block`: block.BlockConfig), whose `k` is
its block size (it drafts +2..+k in one pass).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .block import BlockConfig, BlockModel, check_taps
from .clp import CLP, CLP_FEATURES, Gates
from .errors import BundleError
from .heads import MTPHeads, TokenHeads

FORMAT_VERSION = 5  # the newest format this collocate reads; a bundle is written in the oldest that holds it
BLOCK_FORMAT = 4  # (so a collocate from before the block drafter still reads a heads bundle written now)
TOKEN_BLOCK_FORMAT = 5  # a block drafter whose slots follow the token drafted before them (token_cond)
DRAFTERS = ("heads",) + TokenHeads.DESIGNS + ("block",)
BUNDLED = Path(__file__).parent / "bundles"


@dataclass
class Fingerprint:
    hidden_size: int
    vocab_size: int
    lm_head_sha256: str


def lm_head_of(model: nn.Module) -> nn.Module:
    return model.get_output_embeddings()


def fingerprint(model: nn.Module) -> Fingerprint:
    """Identify a backbone by shape and by a hash of (a strided sample of) its LM-head rows.

    Rows are rounded to bf16 first, so the same weights loaded in float32 or bf16 match."""
    w = lm_head_of(model).weight.detach()
    rows = w[:: max(1, w.shape[0] // 4096)].to("cpu", torch.bfloat16).contiguous()
    digest = hashlib.sha256(rows.view(torch.int16).numpy().tobytes()).hexdigest()
    return Fingerprint(hidden_size=w.shape[1], vocab_size=w.shape[0], lm_head_sha256=digest)


@dataclass
class BundleConfig:
    k: int
    hidden_size: int
    vocab_size: int
    base_model: str
    layers: int = 1
    compete: bool = False
    clp_features: str = "hidden"  # what the default CLP reads
    clp_variants: list = field(default_factory=list)  # further CLPs, by the features they read
    has_gates: bool = False
    drafter: str = "heads"  # one of DRAFTERS
    draft_vocab: int = 0  # token-conditioned heads: draft over this many most-used tokens (0: all)
    tree: list = field(default_factory=list)  # rank paths, best first (DraftTree.from_paths of a prefix)
    block: dict = field(default_factory=dict)  # the block drafter's sizes (block.BlockConfig's fields)
    fingerprint: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        for name in ("k", "hidden_size", "vocab_size", "layers"):
            if getattr(self, name) < (2 if name == "k" else 1):
                raise BundleError(f"'{name}' must be at least {2 if name == 'k' else 1}, got {getattr(self, name)}")
        if self.draft_vocab < 0 or self.draft_vocab > self.vocab_size:
            raise BundleError(f"'draft_vocab' must lie in 0..{self.vocab_size}, got {self.draft_vocab}")
        if self.drafter not in DRAFTERS:
            raise BundleError(f"unknown drafter type '{self.drafter}' (this collocate knows {', '.join(DRAFTERS)}): "
                              "the bundle needs a newer collocate")
        if self.compete and self.drafter != "heads":
            raise BundleError("a +1 head (compete) exists for independent heads only, not for token-conditioned ones")
        self.tree = [list(p) for p in self.tree]
        if self.drafter == "block" and self.format_version < BLOCK_FORMAT:
            raise BundleError(f"a block drafter's bundle is format {BLOCK_FORMAT} or later, not {self.format_version}")
        if (self.drafter == "block") != bool(self.block):
            raise BundleError("a block drafter's bundle has its sizes in 'block', and only it has them")
        if self.block:
            try:
                c = BlockConfig(**self.block)
            except TypeError as e:
                raise BundleError(f"'block' is not a block drafter's sizes: {e}") from None
            if c.token_cond and self.format_version < TOKEN_BLOCK_FORMAT:
                raise BundleError(f"a token-conditioned block drafter's bundle is format {TOKEN_BLOCK_FORMAT} or "
                                  f"later, not {self.format_version}")
            if c.block_size != self.k or c.hidden_size != self.hidden_size or self.has_gates:
                raise BundleError(f"a block drafter drafts +2..+block_size with the backbone's width and no gates: "
                                  f"block_size {c.block_size}, k {self.k}, hidden {c.hidden_size} vs {self.hidden_size}")
        for f in [self.clp_features, *self.clp_variants]:
            if f not in CLP_FEATURES:
                raise BundleError(f"unknown CLP features '{f}' (this collocate knows {', '.join(CLP_FEATURES)})")


class MTPBundle(nn.Module):
    def __init__(self, config: BundleConfig):
        super().__init__()
        self.config = config
        if config.drafter == "heads":
            self.heads = MTPHeads(config.hidden_size, config.k, layers=config.layers, compete=config.compete)
        elif config.drafter == "block":
            self.heads = BlockModel(BlockConfig(**config.block))
        else:
            self.heads = TokenHeads(config.hidden_size, config.k, design=config.drafter)
        self.clp = CLP(config.hidden_size, config.k, features=config.clp_features)
        self.clp_variants = nn.ModuleDict({f: CLP(config.hidden_size, config.k, features=f)
                                           for f in config.clp_variants if f != config.clp_features})
        self.gates = Gates(config.hidden_size, self.heads.n_heads) if config.has_gates else None
        # token-conditioned drafts may read only the LM-head rows of these tokens (the most used first)
        self.register_buffer("draft_ids", torch.zeros(config.draft_vocab, dtype=torch.long)
                             if config.draft_vocab else None)
        self.heldout: dict = {}  # the training report's held-out accuracy per offset, when there is one
        self.calibrations: dict = {}  # per CLP features, the report's held-out table: threshold -> wrong share, ...

    @property
    def token_conditioned(self) -> bool:
        return self.config.drafter != "heads"

    def clp_for(self, features: str | None = None) -> CLP:
        """The CLP that reads these features (None: the default one)."""
        if features is None or features == self.config.clp_features:
            return self.clp
        if features not in self.clp_variants:
            have = ", ".join([self.config.clp_features, *self.clp_variants])
            raise BundleError(f"this bundle has no CLP that reads '{features}' (it has: {have}); "
                              "bundles trained by this collocate carry every variant")
        return self.clp_variants[features]

    def calibration(self, features: str | None = None) -> dict:
        """The held-out CLP table of these features: threshold -> wrong share and accepted length."""
        return self.calibrations.get(self.clp_for(features).features, {})

    def calibration_at(self, threshold: float, features: str | None = None) -> dict:
        """The held-out row of one threshold ({} where the table has none): wrong share, accepted length."""
        return self.calibration(features).get(str(float(threshold)), {})

    def threshold_for(self, max_wrong: float, features: str | None = None) -> float:
        """The lowest CLP threshold whose held-out wrong share is at most max_wrong (most tokens at that
        quality), from the training report's calibration table."""
        if not self.calibration(features):
            raise BundleError("--max-wrong reads the CLP's held-out calibration in train_report.json, and this "
                              "bundle has none: train it with `collocate train`, or give --threshold")
        table = sorted((float(t), row) for t, row in self.calibration(features).items())
        fit = [t for t, row in table if row["wrong_share"] <= max_wrong and row["mean_accepted"] > 0]
        if not fit:
            t, row = min(table, key=lambda x: x[1]["wrong_share"])
            raise BundleError(f"no calibrated CLP threshold keeps the wrong share at {max_wrong:.1%}: the lowest "
                              f"is {row['wrong_share']:.1%} (threshold {t}); use ar or verify for that quality")
        return fit[0]

    def safe_threshold(self, max_wrong: float, features: str | None = None) -> float | None:
        """clp's default: threshold_for(max_wrong), or where no threshold is that safe the most cautious one
        (the lowest held-out wrong share); None (argmax) for a bundle without a calibration table."""
        table = self.calibration(features)
        if not table:
            return None
        try:
            return self.threshold_for(max_wrong, features)
        except BundleError:
            some = {t: row for t, row in table.items() if row["mean_accepted"] > 0} or table
            return float(min(some, key=lambda t: (some[t]["wrong_share"], -float(t))))

    def rank_probs(self) -> list[list[float]]:
        """Per offset +2..+k, P(the backbone's token is the head's r-th guess), from the held-out report.
        A report from before rank statistics has top-1 and top-5 only: ranks 1-4 then share top5 - top1."""
        probs = []
        for offset in range(2, self.k + 1):
            acc = self.heldout.get(f"+{offset}")
            if acc is None:
                raise BundleError("--tree-size chooses its nodes from the bundle's held-out accuracy, and this bundle "
                                  "has no train_report.json: train it with `collocate train`, or use --candidates")
            probs.append(acc.get("rank_probs") or [acc["top1"]] + [(acc["top5"] - acc["top1"]) / 4] * 4)
        return probs

    @classmethod
    def for_backbone(cls, model: nn.Module, *, k: int, base_model: str, **kwargs) -> "MTPBundle":
        fp = fingerprint(model)
        block = kwargs.get("drafter") == "block"
        kwargs.setdefault("format_version", TOKEN_BLOCK_FORMAT if (kwargs.get("block") or {}).get("token_cond") else
                          BLOCK_FORMAT if block else BLOCK_FORMAT - 1)
        cfg = BundleConfig(k=k, hidden_size=fp.hidden_size, vocab_size=fp.vocab_size, base_model=base_model,
                           fingerprint=asdict(fp), **kwargs)
        return cls(cfg)

    @property
    def k(self) -> int:
        return self.config.k

    def param_counts(self) -> dict[str, int]:
        count = lambda m: sum(p.numel() for p in m.parameters()) if m is not None else 0  # noqa: E731
        return {"heads": count(self.heads), "clp": count(self.clp), "gates": count(self.gates)}

    def check_backbone(self, model: nn.Module, name: str = "the given backbone") -> None:
        """Raise BundleError unless this bundle was trained on `model`."""
        fp, want = fingerprint(model), self.config.fingerprint
        mine = f"bundle trained on '{self.config.base_model}'"
        if fp.hidden_size != self.config.hidden_size:
            raise BundleError(f"{mine} (hidden size {self.config.hidden_size}) cannot run on {name} "
                              f"(hidden size {fp.hidden_size})")
        if fp.vocab_size != self.config.vocab_size:
            raise BundleError(f"{mine} (vocabulary {self.config.vocab_size}) cannot run on {name} "
                              f"(vocabulary {fp.vocab_size})")
        if want and want.get("lm_head_sha256") != fp.lm_head_sha256:
            raise BundleError(f"{mine} cannot run on {name}: the LM-head weights differ "
                              f"(fingerprint {want.get('lm_head_sha256', '?')[:12]} vs {fp.lm_head_sha256[:12]})")
        if self.config.block:
            try:
                check_taps(self.config.block["taps"], model.config.num_hidden_layers)
            except ValueError as e:
                raise BundleError(f"{mine} cannot run on {name}: {e}") from None

    def save_pretrained(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        (path / "config.json").write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, *, backbone: nn.Module | None = None,
                        backbone_name: str = "the given backbone") -> "MTPBundle":
        path = resolve_bundle(path)
        config = read_config(path)
        bundle = cls(config)
        try:
            tensors = load_file(str(path / "model.safetensors"))
        except (SafetensorError, OSError, RuntimeError) as e:
            raise BundleError(f"{path / 'model.safetensors'} is corrupt or truncated: {e}") from None
        missing = set(bundle.state_dict()) - set(tensors)
        unexpected = set(tensors) - set(bundle.state_dict())
        if missing or unexpected:
            raise BundleError(f"{path} does not match its config.json: missing {sorted(missing)[:4]}, "
                              f"unexpected {sorted(unexpected)[:4]}")
        for name, t in bundle.state_dict().items():
            if tensors[name].shape != t.shape:
                raise BundleError(f"{path}: tensor {name} has shape {tuple(tensors[name].shape)}, config says {tuple(t.shape)}")
        bad = [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            raise BundleError(f"{path / 'model.safetensors'}: tensor {bad[0]} holds NaN or infinite values "
                              f"({len(bad)} such tensors); retrain or restore the bundle")
        bundle.load_state_dict(tensors)
        report = path / "train_report.json"
        if report.exists():
            rep = read_json(report)
            try:
                bundle.heldout = dict(rep.get("heldout_head_accuracy", {}))
                bundle.calibrations = {features: dict(clp.get("thresholds", {}))
                                       for features, clp in rep.get("clp", {}).items()}
            except (AttributeError, TypeError, ValueError) as e:
                raise BundleError(f"{report} is not a collocate training report: {e}") from None
        if backbone is not None:
            bundle.check_backbone(backbone, backbone_name)
        return bundle.eval().requires_grad_(False)


def resolve_bundle(path: str | Path) -> Path:
    """A folder, or the name of a bundle shipped inside the package."""
    p = Path(path)
    if not p.exists() and (BUNDLED / str(path)).exists():
        p = BUNDLED / str(path)
    if not (p / "config.json").exists():
        shipped = ", ".join(sorted(d.name for d in BUNDLED.glob("*") if d.is_dir())) or "none"
        raise BundleError(f"no MTP bundle at '{path}' (expected config.json + model.safetensors); "
                          f"bundles shipped with collocate: {shipped}")
    return p


def read_json(file: Path) -> dict:
    """A JSON object from a bundle file, or a one-line BundleError."""
    try:
        raw = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise BundleError(f"{file} must hold a JSON object, not {type(raw).__name__}")
    return raw


def check_types(raw: dict, file: Path) -> None:
    """Each field of a bundle config has its declared type (a JSON number where a number belongs, ...)."""
    kinds = {"int": int, "str": str, "bool": bool, "list": list, "dict": dict}
    for f in fields(BundleConfig):
        if f.name not in raw:
            continue
        declared = str(f.type).split(" | ")
        value = raw[f.name]
        ok = any(isinstance(value, kinds[k]) and not (k == "int" and isinstance(value, bool))
                 for k in declared if k in kinds) or (value is None and "None" in declared)
        if not ok:
            raise BundleError(f"{file}: '{f.name}' must be {' or '.join(declared)}, got {json.dumps(value)[:40]}")


def read_config(path: Path) -> BundleConfig:
    raw = read_json(path / "config.json")
    check_types(raw, path / "config.json")
    if raw.get("format_version", 0) > FORMAT_VERSION:
        raise BundleError(f"{path} uses bundle format {raw['format_version']}; this collocate reads up to "
                          f"{FORMAT_VERSION}. Upgrade collocate.")
    try:
        return BundleConfig(**raw)
    except TypeError as e:
        raise BundleError(f"{path / 'config.json'} is not a collocate bundle config: {e}") from None
    except BundleError as e:
        raise BundleError(f"{path}: {e}") from None


def default_bundle_for(model_name: str, *, block: bool = False) -> str | None:
    """Name of the bundle shipped for a zoo model, if any (largest k first): its heads, or (block) its block
    drafter (a name ending in "-block")."""
    # a name, not a glob: a folder or hub id ("/abs/path", "org/model") simply has no shipped bundle
    hits = sorted((d for d in BUNDLED.iterdir() if d.name.rpartition("-k")[0] == model_name
                   and d.name.endswith("-block") == block and (d / "config.json").exists()), reverse=True)
    return str(hits[0]) if hits else None
