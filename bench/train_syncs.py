"""Where a block-drafter training step (as train_cost.py builds one: random weights at the 1.5B shape, 9
answers) makes the host wait for the GPU: PyTorch's sync debug mode warns at each synchronising call, and
each site's stack (collocate's, transformers' and torch's frames) is printed with its count.

    cd bench && PYTHONPATH=.. python3 train_syncs.py
"""
import random
import traceback
import warnings

import torch

from collocate.block import BlockConfig, BlockModel
from collocate.heads import VocabSlice
from collocate.train.block import padded, step_anchors, step_terms, tapped_states
from step_cost import build

model = build("1.5b", "cuda")
block = BlockModel(BlockConfig.for_backbone(model)).to("cuda").init_from(model)
embed, full = model.get_input_embeddings(), model.get_output_embeddings()
lm_head = VocabSlice(full, torch.randperm(full.weight.shape[0])[:32768])
opt = torch.optim.AdamW(block.parameters(), lr=1e-4, fused=True)
g = torch.Generator().manual_seed(0)
seqs = [torch.randint(0, 151000, (400 + 3 * i,), generator=g).tolist() for i in range(9)]
rng = random.Random(0)


def step():
    with torch.no_grad():
        feats, _ = tapped_states(model, seqs, block.c.taps)
    tokens = padded(seqs, -100, feats.device)
    anchors = step_anchors([(s, 235) for s in seqs], 64, rng, feats.device)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        terms = step_terms(block, embed, lm_head, [(s, 235) for s in seqs], tokens, feats, anchors, together=True,
                           local=lm_head.local, fused=True)
    opt.zero_grad(set_to_none=True)
    terms.mean().backward()
    torch.nn.utils.clip_grad_norm_(block.parameters(), 1.0)
    opt.step()


step()
torch.cuda.synchronize()
seen = {}


def show(message, category, filename, lineno, file=None, line=None):
    st = "".join(f for f in traceback.format_stack()[:-2]
                 if any(k in f for k in ("collocate", "transformers", "torch/nn", "torch/optim")))[-900:]
    seen[st] = seen.get(st, 0) + 1


warnings.showwarning = show
torch.cuda.set_sync_debug_mode("warn")
step()
torch.cuda.set_sync_debug_mode(0)
for st, n in seen.items():
    print(f"== x{n}\n{st}")
print(len(seen), "sync sites")
