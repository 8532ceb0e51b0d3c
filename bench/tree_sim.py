"""Acceptance of draft trees, simulated from one forward pass per answer: how many tokens a step of greedy
`verify` keeps with the bundle's static tree of N nodes, and with a dynamic tree chosen at every step from
the drafter's own scores (EAGLE-2's idea), on the backbone's greedy answers to real prompts.

    python bench/tree_sim.py --model qwen2.5-coder-1.5b --heads runs/q15-tcs6 --n 4 --sizes 16,32,48 \
        --out bench/results/x/tree_sim.json

Greedy `verify` keeps, at each step, the longest tree path that matches the backbone's own next tokens,
then the backbone's token after it, which is the next step's root. Given the backbone's answer and its
hidden states from one forward pass, every step's drafts and accepted length follow without a decode loop,
so tree shapes can be compared on a CPU; tau = tokens / steps, as `collocate bench` reports it (up to
bf16 rounding between a full forward and incremental steps).

Dynamic tree (token-conditioned heads): at depth 1 the K best tokens; at each further depth the M
likeliest nodes so far (by the product of their path's probabilities) are expanded into K children each;
then the N likeliest of all these nodes form the tree (a child is never likelier than its parent, so they
form a tree). A step then drafts M rows per depth, as a static tree of similar size does.
"""
import argparse
import json
import time
from pathlib import Path

import torch

from collocate import data
from collocate.bundle import MTPBundle
from collocate.draft import TokenDrafter
from collocate.rules import longest_accepted
from collocate.zoo import load_backbone


def answers(model, tokenizer, prompts, max_new: int):
    """(token ids of prompt + greedy answer, prompt length, final-norm hidden states) per prompt."""
    out = []
    for p in prompts:
        ids = torch.tensor([p.ids])
        seq = model.generate(ids, max_new_tokens=max_new, do_sample=False)[0].tolist()
        h = model.base_model(torch.tensor([seq])).last_hidden_state[0]  # (T, d)
        out.append((seq, len(p.ids), h))
    return out


def static_accepted(drafter, tree, h, root, truth) -> int:
    """Accepted drafts of a static tree, by the decoder's own rule: as if the backbone's token after every
    row at depth d were truth[d] (a row off the true path never has its children kept anyway)."""
    t = tree.tensors(h.device)
    draft = drafter.propose(t, h=h, root=root).tokens
    truth = torch.tensor((list(truth) + [-1] * (tree.max_depth + 1))[: tree.max_depth + 1])
    return int(longest_accepted(truth[t.depths], torch.cat([root.view(1), draft]), t).count)


def dynamic_accepted(drafter, h, root, truth, *, nodes: int, expand: int, width: int, depths: int) -> int:
    """Accepted drafts of the dynamic tree: nodes (token, log-prob of path, parent index, state)."""
    vocab = drafter.vocab
    cand = []  # (score, depth, token, parent candidate index or -1, state)
    frontier = [(0.0, -1, root, h)]  # expandable: score, candidate index, token, parent's state
    for d in range(depths):
        states = torch.stack([f[3] for f in frontier])
        toks = torch.tensor([int(f[2]) for f in frontier])
        s, logits, best = drafter.level(states, toks, d, width)  # one drafting depth, as the decoder drafts it
        values = logits.float().log_softmax(-1).gather(-1, best)  # (r, width) log-probs of the best guesses
        new = []
        for r, (score, idx, _, _) in enumerate(frontier):
            for lp, t in zip(values[r].tolist(), best[r].tolist()):
                tok = int(vocab.ids[t]) if vocab is not None else t
                cand.append((score + lp, d + 1, tok, idx, s[r]))
                new.append(len(cand) - 1)
        new.sort(key=lambda c: -cand[c][0])
        frontier = [(cand[c][0], c, cand[c][2], cand[c][4]) for c in new[:expand]]
    chosen = set(sorted(range(len(cand)), key=lambda c: (-cand[c][0], cand[c][1]))[:nodes])
    best = 0
    ok = {-1: True}
    for c in sorted(chosen, key=lambda c: cand[c][1]):  # parents before children
        score, d, tok, parent, _ = cand[c]
        ok[c] = parent in chosen | {-1} and ok.get(parent, False) and d <= len(truth) and tok == truth[d - 1]
        best = max(best, d if ok[c] else 0)
    return best


def walk(n_answer_rows: int, accepted_at) -> tuple[int, int]:
    """Tokens and steps of greedy verify over one answer: from each root, accept, then the next root."""
    t, tokens, steps = 0, 0, 0
    while t < n_answer_rows:
        a = accepted_at(t)
        tokens += a + 1
        steps += 1
        t += a + 1
    return tokens, steps


@torch.inference_mode()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--heads", required=True, help="a token-conditioned bundle")
    ap.add_argument("--suite", default="mtbench,gsm8k,humaneval")
    ap.add_argument("--n", type=int, default=4, help="prompts per suite")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--sizes", default="16,32,48", help="tree sizes N")
    ap.add_argument("--expand", default="4,8", help="dynamic trees: nodes expanded per depth (M)")
    ap.add_argument("--width", type=int, default=8, help="dynamic trees: children per expanded node (K)")
    ap.add_argument("--depths", default="", help="also the best N-node trees at most this deep (as "
                                                  "--tree-depth decodes), e.g. 3,4")
    ap.add_argument("--no-dynamic", action="store_true", help="static trees only")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--out")
    args = ap.parse_args()
    model, tokenizer = load_backbone(args.model, dtype=getattr(torch, args.dtype))
    bundle = MTPBundle.from_pretrained(args.heads, backbone=model).to(getattr(torch, args.dtype))
    drafter = TokenDrafter(bundle, model.get_output_embeddings(), model.get_input_embeddings())
    prompts = [p for s in args.suite.split(",") for p in data.prompts(s, tokenizer, n=args.n)]
    start = time.perf_counter()
    runs = answers(model, tokenizer, prompts, args.max_new_tokens)
    result = {"model": args.model, "heads": args.heads, "prompts": len(prompts), "dtype": args.dtype,
              "max_new_tokens": args.max_new_tokens, "k": bundle.k, "seconds_generating": 0.0, "tau": {}}
    result["seconds_generating"] = time.perf_counter() - start
    sizes = [int(x) for x in args.sizes.split(",")]
    configs = {"chain": lambda h, root, truth: static_accepted(drafter, drafter.tree(), h, root, truth)}
    for n in sizes:
        tree = drafter.tree(nodes=n)
        configs[f"static {n}"] = lambda h, root, truth, tree=tree: static_accepted(drafter, tree, h, root, truth)
        for depth in (int(x) for x in args.depths.split(",") if x):
            cut = drafter.tree(nodes=n, depth=depth)  # as `--tree-size n --tree-depth depth` decodes
            configs[f"static {n}, depth <= {depth}"] = (
                lambda h, root, truth, tree=cut: static_accepted(drafter, tree, h, root, truth))
        for m in (int(x) for x in args.expand.split(",") if not args.no_dynamic):
            configs[f"dynamic {n} (M={m}, K={args.width})"] = (
                lambda h, root, truth, n=n, m=m: dynamic_accepted(drafter, h, root, truth, nodes=n, expand=m,
                                                                  width=args.width, depths=bundle.k - 1))
    for name, accept in configs.items():
        tokens = steps = 0
        for seq, plen, h in runs:
            answer = seq[plen:]
            # root at answer row t: hidden state after token plen-1+t, root token answer[t] (the backbone's
            # own t+1); the drafts should spell answer[t+1..]
            a, s = walk(len(answer), lambda t: accept(h[plen - 1 + t], torch.tensor(answer[t]), answer[t + 1:]))
            tokens, steps = tokens + a, steps + s
        result["tau"][name] = tokens / steps
        print(f"{name:32s} tau {tokens / steps:.3f}", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
