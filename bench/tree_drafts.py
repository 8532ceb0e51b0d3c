"""Draft trees chosen from counted rank paths against trees from products of per-slot rates, on held-out text.

    python bench/tree_drafts.py RUN                 # a trained run (bundle + work/): every tree size, both choices
    python bench/tree_drafts.py --report REPORT     # a report alone: the argmax chain, counted against the product

With a run, the drafter's outputs at every anchor of its held-out shards (train/policies.py `policy_data`,
or `block_policy_data` for a block drafter) give `path_shares` and `tree_drafts`: the drafts a step accepts
there by the tree of each size (and depth) chosen either way. With a report alone (train_report.json, e.g.
one brought home without its bundle), the share of held-out anchors whose argmax chain is right for its
first j drafts, from the CLP's held-out label distribution, beside the product of per-slot top-1 rates.
"""
import argparse
import json
from pathlib import Path


def from_report(path: str) -> dict:
    report = json.loads(Path(path).read_text())
    labels = report["clp"]["hidden"]["label_distribution"]  # held-out anchors by leading right drafts
    top1 = [v["top1"] for o, v in report["heldout_head_accuracy"].items() if int(o[1:]) >= 2]
    counted = [sum(labels[j:]) / sum(labels) for j in range(1, len(labels))]
    product, p = [], 1.0
    for t in top1:
        p *= t
        product.append(p)
    return {"chain_right_for_first_j": {"counted": counted, "per_slot_product": product},
            "chain_drafts": {"counted": sum(counted), "per_slot_product": sum(product)}}


def from_run(run: Path) -> dict:
    from collocate.bundle import MTPBundle
    from collocate.train.block import block_policy_data
    from collocate.train.config import TrainConfig
    from collocate.train.policies import path_shares, policy_data, tree_drafts
    from collocate.zoo import load_backbone

    report = json.loads((run / "train_report.json").read_text())
    cfg = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in report["config"].items()})
    bundle = MTPBundle.from_pretrained(str(run)).eval()
    bundle.heldout = report["heldout_head_accuracy"]
    held = list(range(cfg.n_shards - cfg.heldout_shards, cfg.n_shards))  # (as train/pipeline.py holds them out)
    outputs = block_policy_data if bundle.config.drafter == "block" else policy_data
    data = outputs(load_backbone(cfg.model).model, bundle, cfg, run / "work", held)
    return tree_drafts(path_shares(data, bundle.heads.offsets), bundle.rank_probs(), sizes=(8, 16, 32, 48, 64),
                       depths=(None, 3, 6))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run", nargs="?")
    ap.add_argument("--report")
    args = ap.parse_args()
    if not (args.run or args.report):
        ap.error("give a trained run folder or --report")
    print(json.dumps(from_report(args.report) if args.report else from_run(Path(args.run)), indent=1))


if __name__ == "__main__":
    main()
