"""The backbone's tapped layers for a training step's answers (random weights at the 1.5B shape, 9 answers)
with and without an attention mask, their ids copied plainly or through pinned memory: median ms of 10.

    cd bench && PYTHONPATH=.. python3 taps_mask.py
"""
import sys, time, statistics, torch
sys.path.insert(0, ".")
from step_cost import build
from collocate.train.features import padded
model = build("1.5b", "cuda")
g = torch.Generator().manual_seed(0)
taps = [1, 7, 13, 19, 25]
def seqs_of(lens):
    return [torch.randint(0, 151000, (n,), generator=g).tolist() for n in lens]
def run(seqs, mask, pinned):
    dev = "cuda"
    width = max(map(len, seqs))
    mk = lambda rows, v: torch.tensor([s + [v] * (width - len(s)) for s in rows])
    ids = mk(seqs, 0).pin_memory().to(dev, non_blocking=True) if pinned else mk(seqs, 0).to(dev)
    kw = {}
    if mask:
        m = mk([[1] * len(s) for s in seqs], 0)
        kw["attention_mask"] = m.pin_memory().to(dev, non_blocking=True) if pinned else m.to(dev)
    with torch.no_grad():
        out = model.base_model(input_ids=ids, output_hidden_states=True, use_cache=False, **kw)
        return torch.cat([out.hidden_states[t + 1] for t in taps], -1)
for name, lens in (("equal 9x420", [420] * 9), ("ragged 9 x 380..420", [380 + 5 * i for i in range(9)])):
    seqs = seqs_of(lens)
    for mask in (True, False):
        for pinned in (False, True):
            run(seqs, mask, pinned); torch.cuda.synchronize()
            ts = []
            for _ in range(10):
                t0 = time.perf_counter(); run(seqs, mask, pinned); torch.cuda.synchronize(); ts.append((time.perf_counter() - t0) * 1e3)
            print(f"{name}: mask={mask} pinned={pinned}: {statistics.median(ts):.1f} ms", flush=True)
print(model.config._attn_implementation, torch.cuda.get_device_name())
